"""The Celery router of meshq tasks (``task_routes`` in app.celeryconfig).

A meshq task sent without a queue — ``celery call meshq.echo --args '[{...}]'``,
``tasks.echo.apply_async([spec])``, a plain canvas chain — goes where its spec's
``tags`` and ``resources`` say, exactly as ``meshq submit`` would send it. A queue
given explicitly (``apply_async(queue=...)``, meshq's own submissions) is left as
it is. A routing field that is invalid raises ``SpecError`` naming it at send time
(under ``celery call``, one line on stderr instead of a traceback). A task whose queue no
live worker consumes, or whose requirement no live worker meets, is sent all the same
(it waits) and a warning is logged, as ``meshq submit`` prints one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import click

from app.core.errors import SpecError
from app.core.routing import is_capability_queue
from app.core.settings import get_settings
from tasks.placement import queue_for, queue_warning, record_queue, requirement_for

log = logging.getLogger(__name__)

MESHQ_TASK_PREFIX = "meshq."


def spec_argument(args: Any) -> Mapping[str, Any] | None:
    """The spec of ``task(spec)`` or, in a chain, ``task(previous_result, spec)``."""
    if isinstance(args, list | tuple) and args and isinstance(args[-1], Mapping) and "taskType" in args[-1]:
        return args[-1]
    return None


def route_task(name: str, args: Any, kwargs: Any, options: Mapping[str, Any], task: Any = None,
               **_: Any) -> dict[str, Any] | None:
    """``{"queue": ...}`` for a meshq task without an explicit queue; ``None`` otherwise."""
    if not name.startswith(MESHQ_TASK_PREFIX) or options.get("queue"):
        return None
    spec = spec_argument(args)
    if spec is None:
        return None  # not a spec: the worker refuses it with a message naming the problem
    try:
        requirement = requirement_for(spec)  # the spec's one parse on this send
        queue = queue_for(requirement)
    except SpecError as exc:
        raise for_the_command_line(exc, name) from None
    if is_capability_queue(get_settings().task_topic, queue):
        record_queue(queue, requirement)
    # A served queue is found in the live workers read at most once a second
    # (tasks.placement), so a send stays about as cheap as Celery's own.
    warning = queue_warning(queue, requirement)
    if warning:
        log.warning("%s: %s", name, warning)
    return {"queue": queue}


def for_the_command_line(exc: SpecError, name: str) -> Exception:
    """``exc`` as ``celery call`` should show it: a ``ClickException`` is printed by click as
    one ``Error: ...`` line (exit status 1), where any other exception is a long traceback.
    Anywhere else (``apply_async`` in a program, a worker) the ``SpecError`` itself."""
    context = click.get_current_context(silent=True)
    if context is not None and context.info_name == "call":
        return click.ClickException(f"{exc} ({name} was not sent)")
    return exc
