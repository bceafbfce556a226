"""The Celery application (``celery -A app worker`` finds ``app.celery.app``)."""

from __future__ import annotations

from celery import Celery

from app.errors import ConfigError
from app.settings import get_settings

try:
    get_settings()
except ConfigError as exc:  # bad environment: stop with a message naming the variable
    raise SystemExit(f"meshq: configuration error: {exc}") from None

app = Celery("meshq")
app.config_from_object("celeryconfig")

from app import worker_shim  # noqa: E402,F401  (connects the worker signals)
