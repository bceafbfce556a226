"""JSON events on the ``workers.events`` and ``tasks.events`` channels (DESIGN §3)."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

import redis

from app.core import keys
from app.core.redis_client import get_redis

log = logging.getLogger(__name__)


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat()


def worker_event(type_: str, worker_id: str, **fields: Any) -> str:
    """Serialise a worker event: ``type, ts, worker_id`` plus ``status, tags, metrics, payload``."""
    event: dict[str, Any] = {"type": type_, "ts": utc_now_iso(), "worker_id": worker_id}
    event.update({k: v for k, v in fields.items() if v is not None})
    event.setdefault("metrics", {})
    event.setdefault("payload", {})
    return json.dumps(event)


def task_event(type_: str, worker_id: str, task_id: str, error: str | None = None,
               **payload: Any) -> str:
    """Serialise a task event: ``type, ts, worker_id, task_id, error?, payload{}``."""
    event: dict[str, Any] = {"type": type_, "ts": utc_now_iso(), "worker_id": worker_id,
                             "task_id": task_id, "payload": payload}
    if error is not None:
        event["error"] = error
    return json.dumps(event)


def publish_task_event(type_: str, worker_id: str, task_id: str, error: str | None = None,
                       **payload: Any) -> None:
    """Best effort: a task must not fail because Redis missed one event."""
    try:
        get_redis().publish(keys.TASKS_CHANNEL, task_event(type_, worker_id, task_id, error, **payload))
    except redis.RedisError as exc:
        log.warning("could not publish %s for task %s: %s", type_, task_id, exc)
