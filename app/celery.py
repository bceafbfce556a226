"""The Celery application (``celery -A app worker`` finds ``app.celery.app``)."""

from __future__ import annotations

import sys

from celery import Celery

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

from app import sent_tasks  # noqa: E402,F401  (records each published meshq task)
from app.worker import (  # noqa: E402,F401  (worker start-up checks, pool_grow refused)
    concurrency,
    signals,  # noqa: E402,F401  (connects the worker signals)
    startup,
)
