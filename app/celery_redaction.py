"""What Celery shows and stores of a meshq task's arguments: specs with secrets redacted.

A spec may carry ``output.destination.headers.Authorization`` (a bearer token) or a
presigned URL. Celery copies the arguments into three places outside the worker, and
each gets ``app.core.redaction.redact_secrets`` applied:

* the message's ``argsrepr``/``kwargsrepr`` (``RedactingAMQP``): what the ``task-sent``
  and ``task-received`` events, Flower and the worker's log lines show;
* the result backend's extended fields (``result_extended`` stores ``args``/``kwargs``
  with every state: STARTED, PROGRESS, SUCCESS, FAILURE, REVOKED):
  ``RedactingRedisBackend``, installed by ``app.celeryconfig.result_backend``; arguments
  past ``MAX_RESULT_BYTES`` are not stored there at all (a note says how big they were);
* ``celery inspect active/reserved/scheduled`` (Flower's worker page): ``RedactingRequest``
  answers with the redacted representation, as Celery's ``safe=True`` does.

The task itself still receives its real arguments.

The texts Celery shows of arguments and results (``saferepr``'s) are built by
``app.core.plain_repr`` where that gives the same text faster: at every send
(``argsrepr``/``kwargsrepr``) and for every result's ``task-succeeded`` event in the pool
process (``celery.app.trace`` formats it there), which ``shown_repr`` replaces.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import states
from celery.app import trace as celery_trace
from celery.app.amqp import AMQP
from celery.backends.redis import RedisBackend, SentinelBackend
from celery.exceptions import BackendStoreError
from celery.utils.saferepr import saferepr
from celery.worker.request import Request
from kombu.utils.encoding import bytes_to_str

from app.core.limits import json_bytes
from app.core.plain_repr import plain_repr
from app.core.redaction import redact_secrets
from app.core.redis_client import add_replica_wait, confirm_replicated, replicated_writes
from app.core.sentinel_master import FailoverConnection
from app.core.settings import get_settings
from app.worker.outage import REDIS_OUTAGE_S, RETRY_INTERVAL_S

log = logging.getLogger(__name__)


def shown_repr(value: Any, maxlen: int | None = None, maxlevels: int = 3, seen: Any = None) -> str:
    """``saferepr(value, maxlen, maxlevels)``: the same text, built directly for plain data."""
    if maxlen is not None:
        text = plain_repr(value, maxlen, maxlevels)
        if text is not None:
            return text
    return saferepr(value, maxlen, maxlevels, seen)


# Celery's tracer formats each task's return value with ``saferepr`` (a module global it looks
# up at every call) for the task-succeeded event: ~190 µs for a meshq result, ~30 µs this way.
celery_trace.saferepr = shown_repr


class RedactingAMQP(AMQP):
    """Messages whose ``argsrepr``/``kwargsrepr`` are the redacted arguments (unless the
    caller gave its own): every way of sending a task (``apply_async``, canvas, ``send_task``,
    ``celery call``) builds its message here."""

    def as_task_v2(self, task_id: str, name: str, args: Any = None, kwargs: Any = None, *positional: Any,
                   argsrepr: str | None = None, kwargsrepr: str | None = None, **options: Any) -> Any:
        levels = self.app.conf.task_repr_maxlevels
        if argsrepr is None:
            argsrepr = shown_repr(redact_secrets(args or ()), self.argsrepr_maxsize, maxlevels=levels)
        if kwargsrepr is None:
            kwargsrepr = shown_repr(redact_secrets(kwargs or {}), self.kwargsrepr_maxsize, maxlevels=levels)
        return super().as_task_v2(task_id, name, args, kwargs, *positional, argsrepr=argsrepr,
                                  kwargsrepr=kwargsrepr, **options)


# Celery's rule "a stored SUCCESS is never overwritten" (a lost worker's late copy must not
# replace the result) as one script: Celery reads the stored meta in one round trip, then
# writes and publishes in another, and another worker can store in between.
STORE_UNLESS_SUCCESS = """
local current = redis.call('GET', KEYS[1])
if current then
  local ok, meta = pcall(cjson.decode, current)
  if ok and type(meta) == 'table' and meta['status'] == 'SUCCESS' then return 0 end
end
if tonumber(ARGV[2]) > 0 then
  redis.call('SETEX', KEYS[1], ARGV[2], ARGV[1])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""


class RedactingRedisBackend(RedisBackend):
    """Celery's Redis result backend, storing the extended ``args``/``kwargs`` redacted.

    A task's final state (its result, its failure) is stored through a Redis outage of
    up to ``REDIS_OUTAGE_S`` (``app.worker.outage``): a finished task is not lost, nor run
    again, because Redis restarted as it ended. Other states (PROGRESS) keep the short
    retry of ``result_backend_transport_options`` so a running task is not held up.

    Every store is one round trip (``STORE_UNLESS_SUCCESS``) instead of Celery's two: on
    a fleet of short tasks that round trip is a tenth of a task's cost on the worker.
    """

    _store_script: Any = None

    def store_result(self, task_id: Any, result: Any, state: str, *args: Any, **kwargs: Any) -> Any:
        if state not in states.READY_STATES:
            return super().store_result(task_id, result, state, *args, **kwargs)
        deadline = time.monotonic() + REDIS_OUTAGE_S
        while True:
            try:
                return super().store_result(task_id, result, state, *args, **kwargs)
            except Exception as exc:
                if not self.exception_safe_to_retry(exc) or time.monotonic() > deadline:
                    raise
                log.warning("storing the %s result of task %s failed (%s); retrying for up to %.0fs",
                            state, task_id, exc, max(deadline - time.monotonic(), 0))
                time.sleep(RETRY_INTERVAL_S)

    def _store_result(self, task_id: Any, result: Any, state: str, traceback: Any = None, request: Any = None,
                      **kwargs: Any) -> Any:
        if self.compression:  # the script reads the stored meta as JSON: keep Celery's way
            return super()._store_result(task_id, result, state, traceback, request, **kwargs)
        meta = self._get_result_meta(result=result, state=state, traceback=traceback, request=request)
        meta["task_id"] = bytes_to_str(task_id)
        value = self.encode(meta)
        if len(value) > self._MAX_STR_VALUE_SIZE:
            raise BackendStoreError("value too large for Redis backend", state=state, task_id=task_id)
        expires = self.failure_expires if state == states.FAILURE else self.expires
        if self._store_script is None:
            self._store_script = self.client.register_script(STORE_UNLESS_SUCCESS)
        key = self.get_key_for_task(task_id)
        # Given the current client on each call: Celery may replace it (after a fork). Not
        # wrapped in ``self.ensure``: like Celery's own read before the write, a Redis that is
        # away fails the store at once — ``store_result`` above retries a final state through
        # an outage, and a PROGRESS report is skipped rather than holding the task up.
        client = self.client
        # The worker's task-end commands of a success (app.worker.signals) ride in this round trip.
        end_in = getattr(request, "meshq_end_in", None) \
            if state == states.SUCCESS and getattr(request, "id", None) == meta["task_id"] else None
        replicated = state in states.READY_STATES and replicated_writes(client)
        if end_in is None and not replicated:
            self._store_script(keys=[key], args=[value, int(expires or 0)], client=client)
            return result
        pipe = client.pipeline(transaction=False)
        # EVAL, not the registered script: redis-py asks Redis which scripts it has (SCRIPT EXISTS, a
        # round trip) before every pipeline holding one, and a NOSCRIPT here would leave the end
        # commands after it (the lease's release) done without the result stored.
        pipe.eval(STORE_UNLESS_SUCCESS, 1, key, value, int(expires or 0))
        if end_in is not None:
            end_in(pipe)
        # Behind Sentinel a final state waits (bounded) for a replica to have it, so a failover
        # right after does not lose it; one stored on a master that was replaced meanwhile is
        # stored again (StaleMaster, retried by ``store_result``) on the new one.
        if replicated:
            add_replica_wait(pipe)
        replies = pipe.execute(raise_on_error=False)
        if isinstance(replies[0], Exception):  # the store itself failed; the end commands' errors are logged
            raise replies[0]
        if replicated:
            confirm_replicated(client, replies[-1], f"the {state} result of task {meta['task_id']}")
        if end_in is not None:
            errors = [reply for reply in replies[1:] if isinstance(reply, Exception)]
            if errors:
                log.warning("task %s: its end status was not all recorded: %s", meta["task_id"], errors[0])
            request.meshq_end_written = True
        return result

    def _get_result_meta(self, result: Any, state: str, traceback: Any, request: Any, format_date: bool = True,
                         encode: bool = False) -> dict[str, Any]:
        meta: dict[str, Any] = super()._get_result_meta(result, state, traceback, request, format_date=format_date,
                                                        encode=encode)
        for field in ("args", "kwargs"):
            if meta.get(field) is not None:
                meta[field] = stored_arguments(request, field, meta[field])
        return meta


def stored_arguments(request: Any, field: str, value: Any) -> Any:
    """``value`` (a request's ``args`` or ``kwargs``) as the result backend stores it: redacted,
    and past ``MAX_RESULT_BYTES`` (a sharded task's merge is called with every shard's result)
    a note of its size. ``args`` (the spec) is worked out once per request: its STARTED,
    PROGRESS and final states all store the same one. ``kwargs`` is not kept: a pipeline
    stage edits its own ``pipeline`` keyword while it runs (the next stage's routing)."""
    cache: dict[str, tuple[Any, Any]] | None = getattr(request, "meshq_stored_arguments", None)
    if cache is not None and field in cache and cache[field][0] is value:
        return cache[field][1]
    limit = get_settings().max_result_bytes
    redacted = redact_secrets(value)
    size = json_bytes(redacted)
    stored = redacted if size <= limit else f"<{size} bytes, not stored: more than MAX_RESULT_BYTES={limit}>"
    if request is not None and field == "args":
        try:
            if cache is None:
                cache = request.meshq_stored_arguments = {}
            cache[field] = (value, stored)  # the object itself is kept: an identity check, never a stale id
        except AttributeError:  # a request that takes no attributes: worked out each time
            pass
    return stored


class RedactingSentinelBackend(RedactingRedisBackend, SentinelBackend):
    """``RedactingRedisBackend`` on the master the sentinels name (``REDIS_URL=sentinel://...``),
    whose connections go to the master the process last heard of (``app.core.sentinel_master``)."""

    def _get_pool(self, **params: Any) -> Any:
        params.setdefault("connection_class", FailoverConnection)  # unless TLS chose its own
        return super()._get_pool(**params)


class RedactingRequest(Request):
    """A task request that reports its arguments redacted to ``inspect`` (Flower's worker page)."""

    def info(self, safe: bool = False) -> dict[str, Any]:
        info: dict[str, Any] = super().info(safe=True)
        return info
