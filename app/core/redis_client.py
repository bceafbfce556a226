"""One Redis client per process for meshq's own keys (heartbeats, events, leases).

``get_redis`` is the only place meshq builds a client: a ``redis://`` URL gives a
client of that server; a ``sentinel://`` URL (``app.core.redis_address``) a client of the
master the sentinels name, which asks them again whenever its connection fails or the
server it reaches has become a replica (redis-py's ``SentinelConnectionPool``), so a
failover needs no restart; its connections share with the process's others where the master
is (``app.core.sentinel_master``).

redis-py's connection pool notices a fork and reconnects, so a client created in
the worker's parent is safe in its pool children too.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from app.core.redis_address import is_sentinel_url, parse_sentinel_url
from app.core.sentinel_master import FailoverConnection
from app.core.settings import get_settings

# Short timeouts: a heartbeat must notice a dead Redis quickly and try again later.
SOCKET_TIMEOUT_S = 5.0
# A sentinel that does not answer within this is skipped for the next one.
SENTINEL_TIMEOUT_S = 1.0
FAILOVER_RETRIES = 6  # 0.1, 0.2, 0.4, 0.8, 1, 1 s apart: about 3.5 s
# Writes that must survive a failover (a task's final result, its lease when it starts) wait
# this long for one replica to confirm them (Redis ``WAIT``). When none did, the master has
# no replica to wait for (it is away, or was promoted from the replica and has none yet):
# the process writes without waiting for REPLICA_RECHECK_S before it waits again, so a
# missing replica costs one wait every few seconds, not one per task.
REPLICA_WAIT_MS = 500
REPLICA_RECHECK_S = 10.0

log = logging.getLogger(__name__)

_clients: dict[tuple[str, str], redis.Redis] = {}


def get_redis(url: str | None = None, master: str | None = None) -> redis.Redis:
    settings = get_settings()
    url = url or settings.redis_url
    master = master or settings.redis_master
    client = _clients.get((url, master))
    if client is None:
        client = new_client(url, master)
        _clients[(url, master)] = client
    return client


def new_client(url: str, master: str = "", **options: Any) -> redis.Redis:
    """A client (decoding replies, short timeouts unless ``options`` say otherwise) of the
    server ``url`` names, or of the master ``master`` of the sentinels it names."""
    options = {"decode_responses": True, "socket_timeout": SOCKET_TIMEOUT_S,
               "socket_connect_timeout": SOCKET_TIMEOUT_S, "health_check_interval": 30, **options}
    if not is_sentinel_url(url):
        return redis.Redis.from_url(url, **options)
    address = parse_sentinel_url(url)
    # Just after a promotion the sentinels may for a moment name no master: a command retries
    # for a few seconds instead of failing at once — on connection errors only: a server that
    # does not answer (paused) already cost its timeout, and is not asked again.
    options.setdefault("retry", Retry(ExponentialBackoff(cap=1.0, base=0.1), FAILOVER_RETRIES,
                                      supported_errors=(redis.ConnectionError,)))
    # FailoverConnection: once one connection of the process finds the master replaced, the
    # others go to the new one without waiting out a timeout each (app.core.sentinel_master).
    sentinels = Sentinel(list(address.sentinels), sentinel_kwargs=sentinel_connection_options(),
                         db=address.db, username=address.username, password=address.password,
                         connection_class=FailoverConnection, **options)
    return sentinels.master_for(master)


def sentinel_connection_options() -> dict[str, Any]:
    """How to talk to the sentinels themselves (no password, as Celery): a dead or paused
    one costs a second, not five."""
    return {"socket_timeout": SENTINEL_TIMEOUT_S, "socket_connect_timeout": SENTINEL_TIMEOUT_S}


def replicated_writes(client: Any) -> bool:
    """Do writes that matter through ``client`` (or pipeline) wait for a replica? Only on a
    master found through Sentinel (any such client: meshq's, Celery's result backend): a
    lone server has no replica to wait for."""
    return isinstance(getattr(client, "connection_pool", None), SentinelConnectionPool)


_no_replica_until = 0.0  # monotonic time until which writes do not wait (see REPLICA_RECHECK_S)


def add_replica_wait(pipe: Any) -> None:
    """End a pipeline with ``WAIT 1 REPLICA_WAIT_MS`` (when ``replicated_writes``): its
    reply is how many replicas have everything written so far on that connection. Without
    the wait (a replica was missing a moment ago) the reply is ``None``: not checked."""
    if not replicated_writes(pipe):
        return
    if time.monotonic() < _no_replica_until:
        pipe.execute_command("ECHO", "")  # keeps the reply's place: the caller reads the last reply
    else:
        pipe.execute_command("WAIT", 1, REPLICA_WAIT_MS)


class StaleMaster(redis.ConnectionError):
    """A write went to a server that is no longer the master: the sentinels have promoted
    another since (the old one was paused or cut off). What it wrote there is lost when
    it becomes a replica, so the writer writes it again, on the new master."""


def confirm_replicated(client: redis.Redis, replicas: Any, what: str) -> None:
    """Check the reply of ``add_replica_wait``: raise ``StaleMaster`` if no replica has
    ``what`` and the sentinels name another master than the one the client last wrote to
    (it reconnects to the new one); only warn when the master is the same (its replica is
    away: ``what`` is kept unless this master dies before a replica has it)."""
    global _no_replica_until
    if not replicated_writes(client) or not isinstance(replicas, (int, Exception)) or \
            (isinstance(replicas, int) and replicas >= 1):
        return  # replicated, or not waited for
    pool: Any = client.connection_pool  # a SentinelConnectionPool (replicated_writes)
    written_to = pool.master_address
    try:
        master = pool.get_master_address()  # also drops the pool's idle connections when it changed
    except redis.ConnectionError:
        master = written_to
    if written_to is not None and master is not None and master != written_to:
        raise StaleMaster(f"{what} went to {_address(written_to)}, no longer the master ({_address(master)} is)")
    _no_replica_until = time.monotonic() + REPLICA_RECHECK_S
    log.warning("%s is not on a replica yet (%s within %d ms): a failover before it gets there "
                "would lose it; not waiting for a replica for %.0f s", what,
                replicas if isinstance(replicas, Exception) else "none answered", REPLICA_WAIT_MS,
                REPLICA_RECHECK_S)


def _address(address: Any) -> str:
    host, port = address
    return f"{host}:{port}"
