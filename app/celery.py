"""The Celery application (``celery -A app worker`` finds ``app.celery.app``).

Configured from ``app.celeryconfig`` (meshq's settings), then from the module named by
``MESHQ_CELERY_CONFIG``, if any: the documented way to add Celery settings of your
own (``beat_schedule``, ``task_annotations``, ``task_routes``, ``broker_pool_limit``...)
without wrapping the app. Its public lowercase names must be Celery settings (a
misspelt one is an error, not ignored); imports and underscore names are skipped.
Its ``task_routes`` are consulted before meshq's router, its ``include``/``imports``
add to meshq's, and the serialisers stay JSON (meshq never accepts pickle).
"""

from __future__ import annotations

import importlib
import inspect
import sys
from typing import Any

from celery import Celery, states
from celery.app.defaults import DEFAULTS

from app.celery_redaction import RedactingAMQP
from app.core.errors import ConfigError
from app.core.settings import get_settings

USER_CONFIG_VARIABLE = "MESHQ_CELERY_CONFIG"
JSON_ONLY = ("task_serializer", "result_serializer", "event_serializer", "accept_content",
             "result_accept_content")
ADDED_TO_MESHQS = ("include", "imports")


def user_settings(module_name: str, base: Any) -> dict[str, Any]:
    """The settings of module ``module_name`` merged with meshq's ``base`` configuration;
    ``ConfigError`` naming ``MESHQ_CELERY_CONFIG`` for anything meshq cannot apply."""
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(USER_CONFIG_VARIABLE, f"cannot import {module_name!r}: {type(exc).__name__}: {exc}") \
            from None
    found: dict[str, Any] = {}
    for name, value in vars(module).items():
        if name.startswith("_") or inspect.ismodule(value) or inspect.isclass(value) \
                or inspect.isfunction(value) or type(value).__name__ == "_Feature":
            continue  # imports (a function, class, module or __future__ feature) are not settings
        if name not in DEFAULTS:
            raise ConfigError(USER_CONFIG_VARIABLE, f"{module_name}.{name} is not a Celery setting "
                                                    "(lowercase names, as in Celery's documentation)")
        found[name] = value
    for name in JSON_ONLY:
        if name in found:
            value = found[name]
            values = [value] if isinstance(value, str) else list(value or [])
            if values != ["json"]:
                raise ConfigError(USER_CONFIG_VARIABLE, f"{module_name}.{name} = {value!r}: meshq accepts "
                                                        "JSON only (never pickle)")
    for name in ADDED_TO_MESHQS:
        if name in found:
            found[name] = [*base.get(name, ()), *[v for v in found[name] if v not in base.get(name, ())]]
    if "task_routes" in found:
        routes = found["task_routes"]
        routes = list(routes) if isinstance(routes, list | tuple) else [routes]
        found["task_routes"] = (*routes, *base["task_routes"])
    return found


try:
    _settings = get_settings()
except ConfigError as exc:  # bad environment: stop with a message naming the variable
    print(f"meshq: configuration error: {exc}", file=sys.stderr)
    raise SystemExit(2) from None  # the exit status of every meshq usage/configuration error

# Messages carry argsrepr/kwargsrepr with secrets redacted (app.celery_redaction).
app = Celery("meshq", amqp=RedactingAMQP)
app.config_from_object("app.celeryconfig")
if _settings.celery_config_module:
    try:
        from app import celeryconfig

        app.conf.update(user_settings(_settings.celery_config_module, vars(celeryconfig)))
    except ConfigError as exc:
        print(f"meshq: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None

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
# start-up checks, one task at a time, the worker record kept true to the consumer, and
# acknowledgements that free the consumer even when Redis does not answer (broker_qos).
from app.worker import (  # noqa: E402,F401
    broker_qos,
    concurrency,
    consumer_state,
    signals,
    startup,
)
