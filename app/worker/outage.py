"""Riding out a Redis outage at the end of a task (a restart, a failover).

A task that finished must not be lost, nor run again, because Redis was away when it
ended. Everything written at the end — the result (``app.celery_redaction``), the next
chain step's message (``task_publish_retry_policy`` of the worker) and the worker's
status writes (``app.worker.signals``) — retries for ``REDIS_OUTAGE_S``, about what a
production Redis failover takes, at short intervals so the write lands within a second
of Redis coming back (before a redelivered copy elsewhere could take the task over).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("meshq.worker")

REDIS_OUTAGE_S = 90.0
RETRY_INTERVAL_S = 1.0

# Kombu's ``Connection.ensure`` (publishing a chain's next step) knows no timeout: as many
# one-second retries as fit in REDIS_OUTAGE_S.
PUBLISH_RETRY_POLICY: dict[str, Any] = {"max_retries": int(REDIS_OUTAGE_S / RETRY_INTERVAL_S), "interval_start": 0,
                                        "interval_step": 0.5, "interval_max": RETRY_INTERVAL_S}


def write_with_retry(write: Callable[..., Any], *args: Any, what: str = "status write", **kwargs: Any) -> Any:
    """Call ``write`` (which returns ``None`` when Redis failed) until it succeeds or
    ``REDIS_OUTAGE_S`` passed; returns its last answer."""
    deadline = time.monotonic() + REDIS_OUTAGE_S
    warned = False
    while True:
        answer = write(*args, **kwargs)
        if answer is not None or time.monotonic() > deadline:
            if answer is None:
                log.error("%s given up after %.0fs of Redis outage", what, REDIS_OUTAGE_S)
            elif warned:
                log.info("%s done: Redis is back", what)
            return answer
        if not warned:
            log.warning("%s failed (Redis away?); retrying every %.0fs for up to %.0fs", what, RETRY_INTERVAL_S,
                        REDIS_OUTAGE_S)
            warned = True
        time.sleep(RETRY_INTERVAL_S)
