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

import logging
import threading
from datetime import timedelta
from typing import Any

import redis
from celery import current_app, signals
from kombu import transport as kombu_transports
from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps

from app import keys
from app.redis_client import StaleMaster, add_replica_wait, confirm_replicated, get_redis, replicated_writes

log = logging.getLogger(__name__)

MESHQ_TASK_PREFIX = "meshq."


def _record_ttl_s() -> int:
    expires = current_app.conf.result_expires
    if isinstance(expires, timedelta):
        return max(int(expires.total_seconds()), 1)
    return max(int(expires or 0), 1) if expires else 7 * 24 * 3600


class _Pending(threading.local):
    # The record of the task being published by this thread: (task id, key, queue), or None.
    record: tuple[str, str, str] | None = None


_pending = _Pending()


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
    pipe.set(key, queue, ex=_record_ttl_s())
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
    """kombu's Redis channel, writing the ``:sent`` record of the task it publishes in the
    message's own round trip (after the message: a replica that has the record has it too)."""

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        record = _pending.record
        headers = message.get("headers") or {}
        if record is None or kwargs.get("_publish_batch") is not None or record[0] != str(headers.get("id")):
            return super()._put(queue, message, **kwargs)  # type: ignore[no-any-return]
        task_id, key, routing_key = record
        with self.conn_or_acquire() as client:
            pipe = client.pipeline(transaction=False)
            pipe.lpush(self._q_for_pri(queue, self._get_message_priority(message, reverse=False)), dumps(message))
            if self._expires and queue in self._expires:
                for priority in self.priority_steps:
                    pipe.pexpire(self._q_for_pri(queue, priority), self._expires[queue])
            pipe.set(key, routing_key, ex=_record_ttl_s())
            add_replica_wait(pipe)
            replies = pipe.execute(raise_on_error=False)  # a lost connection raises: kombu retries
            if isinstance(replies[0], Exception):
                raise replies[0]  # the message was not queued: the publish fails as kombu's would
            _pending.record = None  # written (or its failure logged): not again after the publish
            _check_written(client, task_id, replies[-2:] if replicated_writes(pipe) else replies[-1:])
        return None


class RecordingSentinelChannel(RecordingChannel, kombu_redis.SentinelChannel):
    """``RecordingChannel`` on a master found through Sentinel."""


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
