"""A local Sentinel deployment: a master, a replica and three sentinels on loopback ports
(``meshq redis --sentinel``, and the failover tests), all from the ``redis-server`` binary
the embedded Redis uses.

The sentinels watch the master under ``MASTER_NAME`` with a quorum of two: when the
master stops answering for ``down_after_ms`` they promote the replica, and a master
that comes back is made a replica of the new one. Point meshq at them with ``url``
and ``MESHQ_REDIS_MASTER=meshq``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import redis

from app.core.errors import ConfigError
from app.core.redis_address import SENTINEL_SCHEME, SEPARATOR
from cli.embedded_redis import EmbeddedRedis, free_port, redis_server_binary

MASTER_NAME = "meshq"
SENTINELS = 3
QUORUM = 2
DEFAULT_DOWN_AFTER_MS = 5000
DEFAULT_FAILOVER_TIMEOUT_MS = 60000
READY_TIMEOUT_S = 30.0
PORT_ATTEMPTS = 5

N = TypeVar("N", bound=EmbeddedRedis)


class RedisNode(EmbeddedRedis):
    """A data node: the master, or (``replica_of`` its port) a replica of it."""

    def __init__(self, port: int | None, data_dir: Path | None, replica_of: int | None = None) -> None:
        super().__init__(port=port, data_dir=data_dir)
        self.replica_of = replica_of

    def command(self) -> list[str]:
        command = super().command()
        if self.replica_of is not None:
            command += ["--replicaof", "127.0.0.1", str(self.replica_of)]
        return command


class SentinelNode(EmbeddedRedis):
    """A sentinel (``redis-server <conf> --sentinel``), watching the master at ``master_port``.
    Its configuration file is its own to rewrite (sentinels record what they learn there)."""

    def __init__(self, port: int | None, data_dir: Path | None, master_port: int, down_after_ms: int,
                 failover_timeout_ms: int) -> None:
        super().__init__(port=port, data_dir=data_dir)
        self.master_port = master_port
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms

    def command(self) -> list[str]:
        directory = self.directory()
        conf = directory / "sentinel.conf"
        if not conf.exists():  # a restart keeps what the sentinel learnt (the current master)
            conf.write_text(f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master_port} {QUORUM}\n"
                            f"sentinel down-after-milliseconds {MASTER_NAME} {self.down_after_ms}\n"
                            f"sentinel failover-timeout {MASTER_NAME} {self.failover_timeout_ms}\n"
                            f"sentinel parallel-syncs {MASTER_NAME} 1\n")
        return [redis_server_binary(), str(conf), "--sentinel", "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(directory), "--loglevel", "notice", "--logfile", self.server_log()]


class SentinelCluster:
    """``with SentinelCluster() as cluster: cluster.url``; the nodes are ``master``,
    ``replica`` and ``sentinels`` (their roles as started: after a failover the replica
    is the master).

    Given a ``data_dir`` (``meshq redis --sentinel``), each node keeps its data (AOF) and
    its port from one start to the next: the master on ``master_port``, the replica on the
    port after it, the sentinels on the three after that. A start after a failover starts
    the node the sentinels last named master as the master, so the other one takes its
    data rather than the other way round. Without a ``data_dir`` (tests) every port is free
    and chosen at start, and nothing is kept.
    """

    def __init__(self, data_dir: str | Path | None = None, *, master_port: int | None = None,
                 down_after_ms: int = DEFAULT_DOWN_AFTER_MS,
                 failover_timeout_ms: int = DEFAULT_FAILOVER_TIMEOUT_MS) -> None:
        self.base = Path(data_dir) if data_dir is not None else None
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        first = master_port or (free_port() if self.base is not None else None)
        self.ports = [first, first + 1, *(first + 2 + n for n in range(SENTINELS))] if first and self.base \
            else [master_port, None, *(None for _ in range(SENTINELS))]
        first_dir, second_dir = self._sub("master"), self._sub("replica")
        if self.ports[1] is not None and self._recorded_master_port() == self.ports[1]:
            # The replica was promoted last time: it is the master, the first node its replica.
            self.master = RedisNode(self.ports[1], second_dir)
            self.replica = RedisNode(self.ports[0], first_dir, replica_of=self.ports[1])
        else:
            self.master = RedisNode(self.ports[0], first_dir)
            self.replica = RedisNode(self.ports[1], second_dir, replica_of=self.master.port)
        self.sentinels = [self._sentinel(n) for n in range(SENTINELS)]

    def _sub(self, name: str) -> Path | None:
        return self.base / name if self.base is not None else None

    def _recorded_master_port(self) -> int | None:
        """The master the sentinels named when they last ran (they rewrite their configuration)."""
        conf = self._sub("sentinel-1")
        try:
            text = (conf / "sentinel.conf").read_text() if conf is not None else ""
        except OSError:
            return None
        found = re.search(rf"^sentinel monitor {MASTER_NAME} \S+ (\d+)", text, re.MULTILINE)
        return int(found.group(1)) if found else None

    def _replica(self) -> RedisNode:
        return RedisNode(None, self._sub("replica"), replica_of=self.master.port)

    def _sentinel(self, n: int) -> SentinelNode:
        return SentinelNode(self.ports[2 + n], self._sub(f"sentinel-{n + 1}"), self.master.port,
                            self.down_after_ms, self.failover_timeout_ms)

    @property
    def url(self) -> str:
        """``REDIS_URL`` for meshq: every sentinel, database 0."""
        return SEPARATOR.join(f"{SENTINEL_SCHEME}127.0.0.1:{s.port}" for s in self.sentinels) + "/0"

    @property
    def master_name(self) -> str:
        return MASTER_NAME

    def start(self) -> SentinelCluster:
        try:
            self.master.start()
            self.replica = self._start_on_a_free_port(self.replica, self._replica)
            for n in range(SENTINELS):
                self.sentinels[n] = self._start_on_a_free_port(self.sentinels[n], partial(self._sentinel, n))
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_on_a_free_port(self, node: N, again: Callable[[], N]) -> N:
        """Start ``node``; on a port taken since it was chosen (the nodes' own connections
        take ephemeral ports too), start a new one from ``again`` on another port. Ports
        that are kept from one start to the next are not moved: their conflict is an error."""
        if self.base is not None:
            node.start()
            return node
        for _attempt in range(PORT_ATTEMPTS - 1):
            try:
                node.start()
                return node
            except ConfigError as exc:
                if exc.variable != "port":
                    raise
                node = again()
        node.start()
        return node

    def wait_ready(self) -> None:
        """Until the replica is in sync and every sentinel knows the replica and the others."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self._ready():
            if time.monotonic() > deadline:
                raise ConfigError("REDIS_URL", f"the sentinels did not see master and replica within "
                                               f"{READY_TIMEOUT_S:.0f}s")
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:
            replication: dict[str, Any] = _ask(self.replica.port).info("replication")
            if replication.get("master_link_status") != "up":
                return False
            for sentinel in self.sentinels:
                state: dict[str, Any] = _ask(sentinel.port).sentinel_master(MASTER_NAME)  # type: ignore[assignment]
                if int(state.get("num-slaves", 0)) < 1 or int(state.get("num-other-sentinels", 0)) < SENTINELS - 1:
                    return False
        except redis.RedisError:
            return False
        return True

    def master_port(self) -> int | None:
        """The port of the master the sentinels name now (None if none answers)."""
        for sentinel in self.sentinels:
            try:
                address: Any = _ask(sentinel.port).sentinel_get_master_addr_by_name(MASTER_NAME)
                return int(address[1])
            except (redis.RedisError, TypeError):
                continue
        return None

    def stop(self) -> None:
        for node in [*self.sentinels, self.replica, self.master]:
            node.stop()

    def __enter__(self) -> SentinelCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _ask(port: int) -> redis.Redis:
    """A short-lived client of a node on loopback (one question, then garbage)."""
    return redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1, single_connection_client=True)
