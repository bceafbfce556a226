"""Progress reporting and cooperative cancellation, as seen by an executor.

Executors receive a ``Progress`` and call ``progress(done=..., total=...)`` as often
as they like; the Celery implementation forwards at most about once a second as
Celery state ``PROGRESS``, a ``task-progress`` event (Flower shows it as the task's
state) and ``TASK_PROGRESS`` on ``tasks.events``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis

from app import keys
from app.errors import TaskCancelled
from app.events import publish_task_event
from app.redis_client import get_redis

log = logging.getLogger(__name__)

PROGRESS_STATE = "PROGRESS"
MIN_PROGRESS_INTERVAL_S = 1.0


class Progress:
    """What executors talk to. This base records nothing and is never cancelled."""

    task_id = "local"

    def __call__(self, force: bool = False, **fields: Any) -> None:
        """Report progress; ``force`` bypasses rate limiting (first/last report)."""

    def cancelled(self) -> bool:
        return False

    def check_cancelled(self, where: str = "") -> None:
        """Raise ``TaskCancelled`` if the user asked to stop."""
        if self.cancelled():
            raise TaskCancelled(self.task_id, where)


class RecordingProgress(Progress):
    """Keeps every report; for running executors without Celery (tests, scripts)."""

    def __init__(self, cancel_after: int | None = None) -> None:
        self.reports: list[dict[str, Any]] = []
        self.cancel_after = cancel_after

    def __call__(self, force: bool = False, **fields: Any) -> None:
        self.reports.append(fields)

    def cancelled(self) -> bool:
        return self.cancel_after is not None and len(self.reports) >= self.cancel_after


class CeleryProgress(Progress):
    """Forwards progress of a running Celery task (rate-limited) and polls the cancel flag."""

    def __init__(self, task: Any, worker_id: str, task_type: str,
                 min_interval_s: float = MIN_PROGRESS_INTERVAL_S) -> None:
        self.task = task
        self.task_id = task.request.id
        self.worker_id = worker_id
        self.task_type = task_type
        self.min_interval_s = min_interval_s
        self._last_sent = 0.0
        self.last: dict[str, Any] = {}

    def __call__(self, force: bool = False, **fields: Any) -> None:
        self.last = fields
        now = time.monotonic()
        if not force and now - self._last_sent < self.min_interval_s:
            return
        self._last_sent = now
        meta = {**fields, "worker_id": self.worker_id, "taskType": self.task_type}
        try:
            self.task.update_state(state=PROGRESS_STATE, meta=meta)
        except Exception as exc:  # the backend being briefly away must not kill the task
            log.warning("could not store progress of %s: %s", self.task_id, exc)
        try:
            self.task.send_event("task-progress", **meta)
        except Exception as exc:
            log.warning("could not send task-progress event for %s: %s", self.task_id, exc)
        publish_task_event("TASK_PROGRESS", self.worker_id, self.task_id, taskType=self.task_type,
                           **fields)

    def cancelled(self) -> bool:
        try:
            return bool(get_redis().exists(keys.task_cancel(self.task_id)))
        except redis.RedisError:
            return False  # cannot tell: keep working rather than stop on a network blip


def request_cancel(task_id: str, client: redis.Redis | None = None, ttl_s: int = 7 * 24 * 3600) -> None:
    """Ask a running (or queued) task to stop at its next step."""
    (client or get_redis()).set(keys.task_cancel(task_id), "1", ex=ttl_s)
