"""Submitting one task: validate, route by tags (or pin to a worker), warn if nobody listens."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import redis

from app import keys, routing
from app.celery import app
from app.redis_client import get_redis
from app.settings import get_settings
from app.spec import TaskSpec, parse_task_spec
from tasks import definitions  # noqa: F401  (registers every meshq task)


@dataclass
class Submission:
    task_id: str
    task_name: str
    queue: str
    warnings: list[str] = field(default_factory=list)


def task_for_type(task_type: str) -> Any:
    """The registered Celery task that runs ``task_type``."""
    return app.tasks[f"meshq.{task_type}"]


def target_queue(spec: TaskSpec, worker_id: str | None = None) -> str:
    topic = get_settings().task_topic
    if worker_id:
        return routing.queue_for_worker(topic, worker_id)
    return routing.queue_for_tags(topic, spec.tags)


def live_queues(client: redis.Redis | None = None) -> set[str]:
    """Every queue consumed by a worker whose heartbeat key is alive."""
    client = client or get_redis()
    queues: set[str] = set()
    for worker_id in map(str, client.smembers(keys.WORKERS_SET)):
        if client.exists(keys.worker_heartbeat(worker_id)):
            raw = client.hget(keys.worker_hash(worker_id), "queues_json")
            queues.update(json.loads(raw) if raw else [])
    return queues


def queue_warning(queue: str) -> str | None:
    try:
        if queue in live_queues():
            return None
    except redis.RedisError as exc:
        return f"could not check live workers: {exc}"
    return f"no live worker consumes queue {queue!r}; the task waits until one starts"


def submit_task(raw_spec: Any, *, worker_id: str | None = None, task_id: str | None = None,
                **options: Any) -> Submission:
    """Validate ``raw_spec`` and enqueue it; raises ``SpecError`` for a bad spec."""
    spec = parse_task_spec(raw_spec)
    queue = target_queue(spec, worker_id)
    task = task_for_type(spec.taskType)
    result = task.apply_async(args=[raw_spec], queue=queue, task_id=task_id, **options)
    warning = queue_warning(queue)
    return Submission(result.id, task.name, queue, [warning] if warning else [])
