"""Cancelling one task from Python (``meshq cancel TASK_ID`` does the same for a task id).

Cooperative: the Redis cancel flag makes a running executor stop at its next step
(training: the next optimiser step) and the task end REVOKED; a task still in a
queue is also revoked through Celery's control channel, so a worker that receives
it discards it. A running process is never terminated: the worker keeps serving.
"""

from __future__ import annotations

import logging

import redis

from app.celery import app
from app.core import keys
from app.core.redis_client import get_redis

log = logging.getLogger(__name__)


def request_cancel(task_id: str, client: redis.Redis | None = None, ttl_s: int = 7 * 24 * 3600) -> None:
    """Ask a running (or queued) task to stop at its next step."""
    (client or get_redis()).set(keys.task_cancel(task_id), "1", ex=ttl_s)


def cancel_task(task_id: str) -> None:
    """Ask ``task_id`` to stop: set its cancel flag and revoke it if still queued."""
    request_cancel(task_id)
    try:
        app.control.revoke(task_id, terminate=False)
    except Exception as exc:  # the flag alone still stops it when it runs
        log.warning("could not broadcast the revoke of %s: %s", task_id, exc)
