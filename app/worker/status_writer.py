"""Task-end status writes of a pool child, in order, from one background thread."""

from __future__ import annotations

import concurrent.futures
import logging
import os
from collections.abc import Callable
from typing import Any

log = logging.getLogger("meshq.worker")

STATUS_WRITE_WARN_S = 30.0


class StatusWriter:
    """Task-end status writes, in order, from one background thread of the pool child.

    The end of a task (IDLE, ``TASK_SUCCEEDED``/``FAILED``, lease release) then costs
    the task no Redis round trip: the child reports its result and takes the next
    task while the write goes out. The next task's start waits for it first, so a
    worker's status changes reach Redis in the order they happened.
    """

    def __init__(self) -> None:
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._pid = 0
        self._last: concurrent.futures.Future[Any] | None = None

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        if self._executor is None or self._pid != os.getpid():  # first use in this process
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="meshq-status")
            self._pid = os.getpid()
        self._last = self._executor.submit(fn, *args, **kwargs)

    def wait(self) -> None:
        """Block until every submitted write is done (or failed) — however long Redis's
        retries take, so a late IDLE can never overwrite the next task's RUNNING."""
        last = self._last
        if last is None or self._pid != os.getpid():
            return
        while True:
            try:
                last.result(timeout=STATUS_WRITE_WARN_S)
                return
            except concurrent.futures.TimeoutError:
                log.warning("the previous task's status write is still retrying; the next task waits")
            except Exception as exc:  # noqa: BLE001 - a lost status write must not fail the next task
                log.warning("status write failed: %s", exc)
                return
