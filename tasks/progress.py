"""Progress of a running Celery task, and its cancel flag.

``CeleryProgress`` is the ``Progress`` (``tasks.executors.progress``) a task hands
its executor: reports go out at most about once a second as Celery state
``PROGRESS``, a ``task-progress`` event and ``TASK_PROGRESS`` on ``tasks.events``;
``cancelled()`` reads the task's Redis cancel flag, which ``tasks.control.request_cancel``
sets.

Flower turns the ``task-progress`` event into the task's state (PROGRESS) and shows its
``result`` field — the progress fields, as ``AsyncResult(id).result`` holds them while the
state is PROGRESS — in the task list's Result column and on the task's page.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import redis
from celery import states
from celery.utils.saferepr import saferepr

from app.celery import PROGRESS_STATE
from app.core import keys
from app.core.events import publish_task_event
from app.core.redis_client import get_redis
from app.worker.lease import TaskLease
from tasks.executors.progress import Progress

log = logging.getLogger(__name__)

MIN_PROGRESS_INTERVAL_S = 1.0
EVENT_RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}


class CeleryProgress(Progress):
    """Forwards progress of a running Celery task (rate-limited) and polls the cancel flag."""

    def __init__(self, task: Any, worker_id: str, task_type: str,
                 min_interval_s: float = MIN_PROGRESS_INTERVAL_S, also_cancelled_by: str | None = None) -> None:
        self.task = task
        self.task_id = task.request.id
        # A shard stops when the task it was split from is cancelled, too.
        self.cancel_keys = [keys.task_cancel(self.task_id)] + (
            [keys.task_cancel(also_cancelled_by)] if also_cancelled_by else [])
        self.worker_id = worker_id
        self.task_type = task_type
        self.min_interval_s = min_interval_s
        self._last_sent = 0.0
        self.last: dict[str, Any] = {}
        # The run's lease, once it holds it: every check is also the fence of the run
        # (``LeaseLost`` when another worker took the task over) and its sign of life.
        self.lease: TaskLease | None = None

    def __call__(self, force: bool = False, **fields: Any) -> None:
        self.last = fields
        now = time.monotonic()
        if not force and now - self._last_sent < self.min_interval_s:
            return
        self._last_sent = now
        self.cancelled()  # the fence: a run that lost its lease reports nothing more
        meta = {**fields, "worker_id": self.worker_id, "taskType": self.task_type}
        try:
            self.task.update_state(state=PROGRESS_STATE, meta=meta)
        except Exception as exc:  # the backend being briefly away must not kill the task
            log.warning("could not store progress of %s: %s", self.task_id, exc)
        try:
            # A few quick tries: a progress event is not worth holding the task up for
            # (Celery's default retries for ever while the broker is away).
            self.task.send_event("task-progress", retry_policy=EVENT_RETRY_POLICY, result=saferepr(fields), **meta)
        except Exception as exc:
            log.warning("could not send task-progress event for %s: %s", self.task_id, exc)
        publish_task_event("TASK_PROGRESS", self.worker_id, self.task_id, taskType=self.task_type,
                           **fields)

    def cancelled(self) -> bool:
        """Whether the user cancelled the task; raises ``LeaseLost`` when this run lost it."""
        try:
            if self.lease is not None:
                return self.lease.check(self.cancel_keys)
            return bool(get_redis().exists(*self.cancel_keys))
        except redis.RedisError:
            return False  # cannot tell: keep working rather than stop on a network blip


def announce_revoked(task: Any, reason: str) -> None:
    """Send Celery's ``task-revoked`` event for a task that stopped itself (``meshq cancel``),
    as Celery does for ``revoke``: monitors (Flower, ``/metrics``) then show it REVOKED.
    ``reason`` says why; ``terminated``/``signum``/``expired`` are Celery's own fields."""
    try:
        task.send_event("task-revoked", terminated=False, signum=None, expired=False, reason=reason)
    except Exception as exc:  # an event lost must not turn a cancellation into a failure
        log.warning("could not send task-revoked event for %s: %s", task.request.id, exc)


def encoded_started_meta(backend: Any, request: Any) -> str | bytes:
    """Celery's encoded STARTED meta for ``request`` (what ``task_track_started`` stores: pid
    and hostname, plus the extended fields under ``result_extended``), stored by the lease's
    start round trip as Celery itself would store it."""
    meta = backend._get_result_meta(result={"pid": os.getpid(), "hostname": request.hostname},
                                    state=states.STARTED, traceback=None, request=request)
    meta["task_id"] = request.id
    encoded: str | bytes = backend.encode(meta)
    return encoded
