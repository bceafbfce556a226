"""Every Sentinel-managed connection of a process goes to the master the sentinels named last.

redis-py asks the sentinels for the master only when one of its connections (re)connects,
and drops only that pool's idle connections when the answer changed. A process holds many
pools — meshq's clients, Celery's result backend, kombu's broker channels — each with
connections opened to the master before it stopped answering. A *paused* master (SIGSTOP, a
frozen VM) never closes them: every one of them cost its own socket timeout (5 s) after the
sentinels had promoted the replica — three in a row for a task's start, progress and
result, two for one ``POST /api/v1/tasks``, one more for the worker's next BRPOP — and a
task sent after the failover did not run within 30 s (the split-brain test, issue 30).

``FailoverConnection`` shares what the sentinels say within the process:

* a command that gets no answer within the socket timeout asks the sentinels at once;
* every master a connection is pointed at by the sentinels is remembered, per deployment
  (its sentinels) and master name;
* a connection handed out by a pool (``connect``) that still points at another server is
  dropped first and reconnects to the master remembered: it costs no timeout of its own.

A connection held outside a pool (kombu's BRPOP connection) is checked by its owner
(``app.worker.broker_qos``) with ``points_at_old_master`` before its next command.
"""

from __future__ import annotations

import logging
from typing import Any

from redis.exceptions import ConnectionError, TimeoutError
from redis.sentinel import SentinelManagedConnection

log = logging.getLogger(__name__)

Address = tuple[str, int]

# (sentinels, master name) → the master those sentinels named last in this process. A fork
# (the worker's pool child) starts from its parent's knowledge.
_masters: dict[tuple[tuple[Address, ...], str], Address] = {}


class FailoverConnection(SentinelManagedConnection):
    """A connection to the master of a Sentinel deployment that shares with the process's other
    connections where the master is (module docstring)."""

    def connect_to(self, address: Any) -> None:
        self._remember(address)
        super().connect_to(address)

    def connect(self) -> Any:
        if self._sock is not None and points_at_old_master(self):
            log.info("dropping a connection to %s:%s: the sentinels now name %s:%s as the master",
                     self.host, self.port, *_masters[self._deployment()])
            self.disconnect()
        return super().connect()

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)
        except TimeoutError:
            # No answer: paused, or cut off. If the sentinels promoted another server, every
            # connection of the process learns it now, not from a timeout of its own.
            self.ask_sentinels()
            raise

    def ask_sentinels(self) -> None:
        try:
            address = self.connection_pool.get_master_address()  # drops this pool's idle ones on a change
        except ConnectionError:
            return  # no master named just now: the next connect asks again
        self._remember(address)

    def _remember(self, address: Any) -> None:
        """``address``, named by the sentinels, is the master now (a replica pool's is not)."""
        if self.connection_pool.is_master:
            _masters[self._deployment()] = (str(address[0]), int(address[1]))

    def _deployment(self) -> tuple[tuple[Address, ...], str]:
        key = self.__dict__.get("_meshq_deployment")
        if key is None:
            pool = self.connection_pool
            sentinels = tuple(sorted((str(s.connection_pool.connection_kwargs.get("host")),
                                      int(s.connection_pool.connection_kwargs.get("port", 0)))
                                     for s in pool.sentinel_manager.sentinels))
            key = self.__dict__["_meshq_deployment"] = (sentinels, pool.service_name)
        return key  # type: ignore[no-any-return]


def points_at_old_master(connection: Any) -> bool:
    """Whether ``connection`` (connected) talks to another server than the master its sentinels
    named last in this process; ``False`` for any connection that is not a ``FailoverConnection``."""
    if not isinstance(connection, FailoverConnection) or connection._sock is None \
            or not connection.connection_pool.is_master:
        return False
    master = _masters.get(connection._deployment())
    return master is not None and (str(connection.host), int(connection.port)) != master
