"""The stuck-task watchdog of the worker's main process.

A pool child that stops making progress while its parent keeps beating (stopped with
SIGSTOP, deadlocked, hung in a driver call) would otherwise hold its task for ever: the
parent's heartbeat renews the lease and keeps the message invisible. Every run records
its last sign of life (``meshq:task:<id>:alive``, written by each step/batch/progress
check, ``app.worker.lease``); the heartbeat reads it for the tasks the parent holds, and
a task with no sign of life for ``MESHQ_STUCK_TASK_S`` has its pool child killed. Celery
then hands the message back (``task_reject_on_worker_lost``): the task runs again, as
after any lost worker, counted by the run cap.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

from celery.worker import state as worker_state

from app.core import keys
from app.core.redis_client import get_redis
from app.worker.lease import record_last_error

log = logging.getLogger("meshq.worker")


class StuckTaskWatchdog:
    def __init__(self, stuck_after_s: float) -> None:
        self.stuck_after_s = stuck_after_s
        self._first_seen: dict[str, float] = {}  # task id → when the parent first saw it run

    def add_to_beat(self, pipe: Any, _running: list[str]) -> Any:
        """Read the sign of life of every running task in the heartbeat's round trip."""
        if self.stuck_after_s <= 0:
            return None
        requests = [r for r in list(worker_state.active_requests) if getattr(r, "worker_pid", None)]
        now = time.time()
        self._first_seen = {r.id: self._first_seen.get(r.id, now) for r in requests}
        if not requests:
            return None
        for request in requests:
            pipe.get(keys.task_alive(request.id))
        return lambda replies: self.check(requests, replies, now)

    def check(self, requests: list[Any], replies: list[Any], now: float) -> None:
        for request, alive in zip(requests, replies, strict=False):
            try:
                last = float(alive.decode() if isinstance(alive, bytes) else alive) if alive else 0.0
            except ValueError:
                last = 0.0
            last = max(last, self._first_seen.get(request.id, now))
            if now - last > self.stuck_after_s:
                self.kill(request, now - last)

    def kill(self, request: Any, silent_s: float) -> None:
        pid = int(request.worker_pid)
        if pid == os.getpid() or pid <= 1:
            return
        error = (f"StuckTask: no progress for {silent_s:.0f}s (MESHQ_STUCK_TASK_S={self.stuck_after_s:g}); "
                 f"its pool process {pid} was killed")
        log.error("task %s: %s; the task will run again", request.id, error)
        try:
            pipe = get_redis().pipeline(transaction=False)
            record_last_error(pipe, request.id, error)
            pipe.execute()
        except Exception as exc:  # the kill matters more than the record
            log.warning("could not record why task %s was stopped: %s", request.id, exc)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._first_seen.pop(request.id, None)
