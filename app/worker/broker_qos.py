"""The consumer's count of unacknowledged messages survives a Redis that does not answer.

Kombu's Redis transport (pinned in setup.cfg; checked against kombu 5.7) counts the
messages a consumer holds (its ``QoS``) and sends no BRPOP while it holds its prefetch
count — one message for a meshq worker. An acknowledgement first removes the message
from Redis (``unacked``/``unacked_index``) and only then from that count; when Redis
does not answer, the removal raises, Celery logs "Couldn't ack" and goes on, and the
message stays counted for ever: the worker never asks for a task again. A dead master
resets the consumer's connections, so Celery reconnects and starts a fresh count; a
*paused* one (SIGSTOP, a frozen VM) leaves them open: behind Sentinel the worker stayed
idle after the replica was promoted, however many tasks waited.

So, in the worker, an acknowledgement or rejection that meets a connection error is
tried once more — on a new connection, for which the sentinels name the master again —
and then leaves the count whatever Redis said. A message whose removal was lost stays
unacknowledged in Redis: it comes back after the visibility timeout, finds its task's
stored result and is dropped (``tasks/base.py``), as an acknowledgement lost in a
failover is (docs/RELIABILITY.md, "Redis failover"). Recording a delivery
(``append``) is tried twice too: the message is already popped from its queue, and
without that record nothing would ever hand it out again.

The consumer's BRPOP connection is held by the channel, outside the connection pool, so
nothing checks where it points: after a task that ran through a failover, the next BRPOP
went to the paused master and waited there for kombu's BRPOP health check (5 s). Before
the consumer asks for a task, a connection that points at another server than the master
the process last heard of (``app.core.sentinel_master``) is dropped, and the BRPOP goes to
the new master.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import signals
from kombu.transport import redis as redis_transport
from kombu.transport import virtual

from app.core.sentinel_master import points_at_old_master

log = logging.getLogger("meshq.worker")


class FailoverQoS(redis_transport.QoS):
    """Kombu's Redis ``QoS``, whose acknowledgements free the consumer even when Redis is away."""

    def can_consume(self) -> bool:
        if not super().can_consume():
            return False
        connection = self._idle_brpop_connection()  # the consumer is about to send its BRPOP
        if points_at_old_master(connection):
            log.info("the consumer's connection points at a replaced master: its next BRPOP goes to the new one")
            connection.disconnect()
        return True

    def append(self, message: Any, delivery_tag: Any) -> None:
        self._twice(lambda: super(FailoverQoS, self).append(message, delivery_tag))

    def ack(self, delivery_tag: Any) -> None:
        self._settle(delivery_tag, lambda: super(FailoverQoS, self).ack(delivery_tag), "acknowledgement")

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        self._settle(delivery_tag, lambda: super(FailoverQoS, self).reject(delivery_tag, requeue=requeue),
                     "requeue" if requeue else "rejection")

    def _twice(self, write: Callable[[], None]) -> None:
        """``write`` (idempotent), again on a new connection if Redis did not answer the first time
        (the failed connection is dropped: the next one asks the sentinels for the master)."""
        try:
            write()
        except self.channel.connection_errors as exc:
            log.warning("the broker did not answer (%s: %s); trying once more on a new connection",
                        type(exc).__name__, exc)
            self._drop_idle_brpop_connection()
            write()

    def _settle(self, delivery_tag: Any, write: Callable[[], None], what: str) -> None:
        try:
            self._twice(write)
        except self.channel.connection_errors as exc:
            virtual.QoS.ack(self, delivery_tag)  # not counted any more: the consumer asks for the next task
            log.warning("the %s of message %s did not reach the broker (%s: %s): the message comes back "
                        "after the visibility timeout (a copy of a task whose result is stored is dropped then)",
                        what, delivery_tag, type(exc).__name__, exc)

    def _drop_idle_brpop_connection(self) -> None:
        """The consumer's next BRPOP would go to the server that just did not answer, and wait
        there for kombu's BRPOP health check (seconds): on a new connection it goes to the
        master the sentinels name now."""
        connection = self._idle_brpop_connection()
        if connection is not None:
            connection.disconnect()

    def _idle_brpop_connection(self) -> Any:
        """The consumer's BRPOP connection, only when no BRPOP waits for its reply (that reply
        may hold a message already popped: it must be read, not dropped); else ``None``."""
        channel = self.channel
        client = channel.__dict__.get("client")  # only if the channel ever consumed
        connection = getattr(client, "connection", None)
        return connection if connection is not None and not channel._in_poll else None


@signals.worker_init.connect
def use_failover_qos(**_: Any) -> None:
    """Every Redis channel the worker opens (``sentinel://`` ones are a subclass) counts with
    ``FailoverQoS``; set before the consumer connects."""
    redis_transport.Channel.QoS = FailoverQoS
