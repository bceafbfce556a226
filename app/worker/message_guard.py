"""A poison message never kills a worker: every meshq task message is checked before the pool.

Celery hands a received message to the pool from the worker's main process. A message
that breaks on the way (its body does not decode, it is past ``app.core.limits`` — a spec
nested 480 levels deep made ``pickle`` raise ``RecursionError`` there — or anything
else raises before the task body runs) used to stop the whole worker with
"Unrecoverable error"; the message went back to the queue and stopped the next worker
too. This strategy (``MeshqTask.Strategy``) checks each message first and wraps
Celery's own handling: such a message ends its task as FAILURE with the reason
(stored in the result backend, a ``task-failed`` event), is acknowledged, and the
worker goes on with the next one.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker import state as worker_state
from celery.worker.strategy import default as default_strategy

from app.core.errors import LimitExceeded, SpecError
from app.core.limits import check_document, check_size
from app.core.settings import get_settings

log = logging.getLogger(__name__)


def message_problem(message: Any, body: Any) -> Exception | None:
    """Why ``message`` must not reach the pool (an exception naming the limit), or None."""
    raw = message.body
    try:
        check_size(len(raw) if isinstance(raw, bytes | str) else 0, get_settings().max_message_bytes,
                   "MAX_MESSAGE_BYTES", "message")
        if body is None and "args" not in message.payload:
            payload = message.decode()  # protocol 2: [args, kwargs, embed]
            args, kwargs = (payload[0], payload[1]) if isinstance(payload, list | tuple) else ((), {})
        else:
            payload = body if body is not None else message.payload
            args, kwargs = payload.get("args") or (), payload.get("kwargs") or {}
        for index, arg in enumerate(args if isinstance(args, list | tuple) else [args]):
            check_document(arg, "spec" if index == len(args) - 1 else f"args[{index}]")
        if isinstance(kwargs, dict):
            for key, value in kwargs.items():
                check_document(value, f"kwargs.{key}")
    except LimitExceeded as exc:
        return exc
    except Exception as exc:  # undecodable, not JSON, not what a task message looks like
        return SpecError("message", f"cannot be read: {type(exc).__name__}: {exc}")
    return None


def guarded_strategy(task: Any, app: Any, consumer: Any, **options: Any) -> Any:
    """Celery's default strategy for ``task``, behind ``message_problem`` and a safety net."""
    handler = default_strategy(task, app, consumer, **options)
    eventer = consumer.event_dispatcher
    semaphore = getattr(consumer.controller, "semaphore", None)

    def refuse(message: Any, exc: Exception, *, where: str) -> None:
        headers = getattr(message, "headers", None) or {}
        task_id = headers.get("id") or (message.payload.get("id") if isinstance(message.payload, dict) else None)
        log.error("task %s (%s) refused %s: %s", task_id, task.name, where, exc)
        if task_id:
            try:
                task.backend.mark_as_failure(task_id, exc, request=None, call_errbacks=False)
            except Exception as store_exc:  # the backend being away must not stop the worker either
                log.error("could not store the failure of %s: %s", task_id, store_exc)
            if eventer is not None and eventer.enabled:
                eventer.send("task-failed", uuid=task_id, exception=f"{type(exc).__name__}: {exc}", traceback="")
        if not message.acknowledged:  # as Celery acknowledges an invalid task: at once
            message.ack_log_error(log, consumer.connection_errors)

    def guarded_handler(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **kwargs: Any) -> Any:
        problem = message_problem(message, body)
        if problem is not None:
            refuse(message, problem, where="before it ran")
            return None
        free_slots = semaphore.value if semaphore is not None else None
        try:
            return handler(message, body, ack, reject, callbacks, **kwargs)
        except Exception as exc:  # RecursionError or PicklingError sending it to the pool, ...
            task_id = (getattr(message, "headers", None) or {}).get("id")
            for request in [r for r in worker_state.reserved_requests if r.id == task_id]:
                worker_state.task_ready(request)  # not left "reserved" for ever
            if semaphore is not None and free_slots is not None and semaphore.value < free_slots:
                semaphore.release()  # the pool slot taken for it was never used
            refuse(message, SpecError("message", f"could not be handed to the pool: "
                                                      f"{type(exc).__name__}: {exc}"), where="on its way to the pool")
            return None

    return guarded_handler
