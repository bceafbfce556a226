"""The Celery application (``celery -A app worker`` finds ``app.celery.app``)."""

from __future__ import annotations

import sys

from celery import Celery, states

from app.celery_redaction import RedactingAMQP
from app.errors import ConfigError
from app.settings import get_settings

try:
    get_settings()
except ConfigError as exc:  # bad environment: stop with a message naming the variable
    print(f"meshq: configuration error: {exc}", file=sys.stderr)
    raise SystemExit(2) from None  # the exit status of every meshq usage/configuration error

# Messages carry argsrepr/kwargsrepr with secrets redacted (app.celery_redaction).
app = Celery("meshq", amqp=RedactingAMQP)
app.config_from_object("celeryconfig")

# A running task's custom state: the result backend's state while a task reports progress
# (``update_state``), and the state monitors derive from its ``task-progress`` events.
PROGRESS_STATE = "PROGRESS"


def rank_progress_as_running() -> None:
    """Rank PROGRESS between STARTED and REVOKED in Celery's state precedence.

    Celery's event state (what Flower, ``celery events`` and ``/metrics`` are built on)
    merges a task's events by precedence and ranks any state it does not know above
    REVOKED: after a ``task-progress`` event a ``task-revoked`` (``meshq cancel``,
    ``celery control terminate``) counted as an older event, and the task stayed PROGRESS
    for ever. Celery has no API to rank a custom state, so its own list gets PROGRESS
    inserted where a running state belongs; every process that loads this app (the
    worker, Flower, ``celery events``) merges events that way.
    """
    if PROGRESS_STATE not in states.PRECEDENCE:
        states.PRECEDENCE.insert(states.PRECEDENCE.index(states.STARTED), PROGRESS_STATE)
        states.PRECEDENCE_LOOKUP.clear()
        states.PRECEDENCE_LOOKUP.update(zip(states.PRECEDENCE, range(len(states.PRECEDENCE)), strict=True))


rank_progress_as_running()

from app import sent_tasks  # noqa: E402,F401  (records each published meshq task)

# Worker behaviour, connected to Celery's signals on import: the meshq shim (signals), the
# start-up checks, one task at a time, and the worker record kept true to the consumer.
from app.worker import (  # noqa: E402,F401
    concurrency,
    consumer_state,
    signals,
    startup,
)
