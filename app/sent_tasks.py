"""A record of each meshq task published, so its id is known before any worker starts it.

Celery's result backend knows a task only once a worker stored something for it: until
then ``AsyncResult(any_id).state`` is PENDING, whether the task waits in a queue or never
existed. Pipelines (and single tasks submitted through meshq) have their pipeline record;
every other meshq task published — ``apply_async``, ``celery call``, a plain Celery
chain — gets ``meshq:task:<id>:sent`` (its queue), kept as long as results are.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import redis
from celery import current_app, signals

from app.core import keys
from app.core.redis_client import StaleMaster, add_replica_wait, confirm_replicated, get_redis

log = logging.getLogger(__name__)

MESHQ_TASK_PREFIX = "meshq."


def _record_ttl_s() -> int:
    expires = current_app.conf.result_expires
    if isinstance(expires, timedelta):
        return max(int(expires.total_seconds()), 1)
    return max(int(expires or 0), 1) if expires else 7 * 24 * 3600


@signals.after_task_publish.connect
def record_sent(sender: Any = None, headers: dict[str, Any] | None = None, body: Any = None,
                routing_key: str | None = None, **_: Any) -> None:
    if not str(sender or "").startswith(MESHQ_TASK_PREFIX) or not headers or not headers.get("id"):
        return
    kwargs = body[1] if isinstance(body, list | tuple) and len(body) > 1 else None
    if isinstance(kwargs, dict) and kwargs.get("pipeline"):
        return  # a stage: its pipeline record (written before the chain was sent) knows it
    try:
        client = get_redis()
        pipe = client.pipeline(transaction=False)
        pipe.set(keys.task_sent(str(headers["id"])), routing_key or "", ex=_record_ttl_s())
        # Behind Sentinel: this write comes after the message's, so a replica that has it has
        # the message too — a task the caller was told is queued survives a failover.
        add_replica_wait(pipe)
        confirm_replicated(client, pipe.execute()[-1], f"task {headers['id']} sent")
    except StaleMaster as exc:  # its message is on that old master too, dropped when it becomes a replica
        log.error("task %s may be lost: %s; send it again", headers["id"], exc)
    except redis.RedisError as exc:  # the task is queued all the same; only its lookup suffers
        log.warning("could not record that task %s was sent: %s", headers["id"], exc)


def sent_queue(task_id: str, client: redis.Redis | None = None) -> str | None:
    """The queue ``task_id`` was published to, or ``None`` if meshq never saw it sent."""
    value = (client or get_redis()).get(keys.task_sent(task_id))
    return None if value is None else str(value.decode() if isinstance(value, bytes) else value)
