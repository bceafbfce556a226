"""A record of each meshq task published, so its id is known before any worker starts it.

Celery's result backend knows a task only once a worker stored something for it: until
then ``AsyncResult(any_id).state`` is PENDING, whether the task waits in a queue or never
existed. Pipelines (and single tasks submitted through meshq) have their pipeline record;
every other meshq task published — ``apply_async``, ``celery call``, a plain Celery
chain — gets ``meshq:task:<id>:sent`` (its queue), kept as long as results are.

The record costs no round trip of its own: ``before_task_publish`` notes it, and the broker
channel (``RecordingChannel``, installed for ``redis://``, ``rediss://`` and ``sentinel://``
broker URLs) writes it in the same pipeline as the message, right after it. A publish that
does not go through that channel (another transport, a publish batch) gets it written by
``after_task_publish`` as before.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import redis
from celery import current_app, signals
from kombu import Connection
from kombu import transport as kombu_transports
from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps

from app.core import keys
from app.core.redis_client import StaleMaster, add_replica_wait, confirm_replicated, get_redis, replicated_writes
from app.core.sentinel_master import FailoverConnection

log = logging.getLogger(__name__)

MESHQ_TASK_PREFIX = "meshq."


_ttl_s: int | None = None


def record_ttl_s() -> int:
    """How long a task's records are kept (``result_expires``, as its results). Read once per
    process, as Celery's result backend reads it once: a lookup in the app's configuration on
    every send cost more than the rest of the record."""
    global _ttl_s
    if _ttl_s is None:
        expires = current_app.conf.result_expires
        if isinstance(expires, timedelta):
            _ttl_s = max(int(expires.total_seconds()), 1)
        else:
            _ttl_s = max(int(expires or 0), 1) if expires else 7 * 24 * 3600
    return _ttl_s


class _Pending(threading.local):
    # The record of the task being published by this thread: (task id, key, queue), or None.
    record: tuple[str, str, str] | None = None
    # What must be written before the next message this thread publishes (written_with_publish).
    before: Callable[[Any], None] | None = None


_pending = _Pending()


@functools.lru_cache(maxsize=4)
def _rides_with_messages(broker_url: str) -> bool:
    """Whether messages sent to ``broker_url`` go through ``RecordingChannel``."""
    return issubclass(Connection(broker_url).get_transport_cls(), RecordingTransport | RecordingSentinelTransport)


_broker_rides: bool | None = None


def _messages_ride() -> bool:
    """``_rides_with_messages`` of this process's broker, worked out on the first submission: the
    broker URL is set once the app is configured, and reading it from the app's configuration
    cost more than the rest of ``written_with_publish``."""
    global _broker_rides
    if _broker_rides is None:
        _broker_rides = _rides_with_messages(str(current_app.conf.broker_url))
    return _broker_rides


@contextmanager
def written_with_publish(write: Callable[[Any], None]) -> Iterator[None]:
    """Have ``write(pipe)`` (Redis commands added to a pipeline) sent in the same round trip
    as the next message this thread publishes, before it — a record every worker must find
    once it has the message costs no round trip of its own. Written at once, before the
    message, where messages do not go through ``RecordingChannel``; written on leaving
    when nothing was published. A ``write`` that fails fails the publish (the message,
    sent in the same round trip, may be queued all the same)."""
    if not _messages_ride():
        _write_now(write)
        yield
        return
    _pending.before = write
    try:
        yield
        if _pending.before is not None:  # nothing was published
            _write_now(write)
    finally:
        _pending.before = None


def _write_now(write: Callable[[Any], None]) -> None:
    """``write(pipe)`` in a round trip of its own."""
    pipe = get_redis().pipeline(transaction=False)
    write(pipe)
    pipe.execute()


@signals.before_task_publish.connect
def expect_sent(sender: Any = None, headers: dict[str, Any] | None = None, body: Any = None,
                routing_key: str | None = None, **_: Any) -> None:
    _pending.record = None
    if not str(sender or "").startswith(MESHQ_TASK_PREFIX) or not headers or not headers.get("id"):
        return
    kwargs = body[1] if isinstance(body, list | tuple) and len(body) > 1 else None
    if isinstance(kwargs, dict) and kwargs.get("pipeline"):
        return  # a stage: its pipeline record (written before the chain was sent) knows it
    task_id = str(headers["id"])
    _pending.record = (task_id, keys.task_sent(task_id), routing_key or "")


@signals.after_task_publish.connect
def record_sent(sender: Any = None, headers: dict[str, Any] | None = None, **_: Any) -> None:
    """Write the record the broker channel did not write with the message (its own round trip)."""
    record, _pending.record = _pending.record, None
    if record is None or not headers or record[0] != str(headers.get("id")):
        return
    task_id, key, queue = record
    client = get_redis()
    pipe = client.pipeline(transaction=False)
    pipe.set(key, queue, ex=record_ttl_s())
    # Behind Sentinel: this write comes after the message's, so a replica that has it has
    # the message too — a task the caller was told is queued survives a failover.
    add_replica_wait(pipe)
    try:
        _check_written(client, task_id, pipe.execute(raise_on_error=False))
    except redis.RedisError as exc:
        _check_written(client, task_id, [exc])


def _check_written(client: Any, task_id: str, replies: list[Any]) -> None:
    """Log what went wrong with a record's write (``replies``: the SET's, then WAIT's)."""
    try:
        if isinstance(replies[0], Exception):
            raise replies[0]
        confirm_replicated(client, replies[-1], f"task {task_id} sent")
    except StaleMaster as exc:  # its message is on that old master too, dropped when it becomes a replica
        log.error("task %s may be lost: %s; send it again", task_id, exc)
    except redis.RedisError as exc:  # the task is queued all the same; only its lookup suffers
        log.warning("could not record that task %s was sent: %s", task_id, exc)


class RecordingChannel(kombu_redis.Channel):
    """kombu's Redis channel, writing in the round trip of the message it publishes what
    must be written with it: a write that must come first (``written_with_publish``), then
    the message, then the task's ``:sent`` record (a replica that has the record has the
    message too)."""

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        before, record = _pending.before, _pending.record
        headers = message.get("headers") or {}
        if record is not None and record[0] != str(headers.get("id")):
            record = None
        if (before is None and record is None) or kwargs.get("_publish_batch") is not None:
            return super()._put(queue, message, **kwargs)  # type: ignore[no-any-return]
        with self.conn_or_acquire() as client:
            pipe = client.pipeline(transaction=False)
            if before is not None:
                before(pipe)
            first = len(pipe)  # the reply of the message
            pipe.lpush(self._q_for_pri(queue, self._get_message_priority(message, reverse=False)), dumps(message))
            if self._expires and queue in self._expires:
                for priority in self.priority_steps:
                    pipe.pexpire(self._q_for_pri(queue, priority), self._expires[queue])
            if record is not None:
                pipe.set(record[1], record[2], ex=record_ttl_s())
            add_replica_wait(pipe)
            replies = pipe.execute(raise_on_error=False)  # a lost connection raises: kombu retries
            failed = [reply for reply in replies[:first + 1] if isinstance(reply, Exception)]
            _pending.before = None  # sent: not again with a later message
            if failed:
                raise failed[0]  # the first write or the message failed: so does the publish
            if record is not None:
                _pending.record = None  # written (or its failure logged): not again after the publish
                _check_written(client, record[0], replies[-2:] if replicated_writes(pipe) else replies[-1:])
        return None


class RecordingSentinelChannel(RecordingChannel, kombu_redis.SentinelChannel):
    """``RecordingChannel`` on a master found through Sentinel, whose connections go to the
    master the process last heard of (``app.core.sentinel_master``)."""

    connection_class = FailoverConnection


class RecordingTransport(kombu_redis.Transport):
    Channel = RecordingChannel


class RecordingSentinelTransport(kombu_redis.SentinelTransport):
    Channel = RecordingSentinelChannel


# Celery resolves the broker URL's scheme through kombu's aliases when it first connects,
# after this module is imported (by app.celery).
kombu_transports.TRANSPORT_ALIASES.update({
    "redis": f"{__name__}:RecordingTransport", "rediss": f"{__name__}:RecordingTransport",
    "sentinel": f"{__name__}:RecordingSentinelTransport"})


def sent_queue(task_id: str, client: redis.Redis | None = None) -> str | None:
    """The queue ``task_id`` was published to, or ``None`` if meshq never saw it sent."""
    value = (client or get_redis()).get(keys.task_sent(task_id))
    return None if value is None else str(value.decode() if isinstance(value, bytes) else value)
