"""One Redis client per process for meshq's own keys (heartbeats, events, leases).

redis-py's connection pool notices a fork and reconnects, so a client created in
the worker's parent is safe in its pool children too.
"""

from __future__ import annotations

import redis

from app.settings import get_settings

# Short timeouts: a heartbeat must notice a dead Redis quickly and try again later.
SOCKET_TIMEOUT_S = 5.0

_clients: dict[str, redis.Redis] = {}


def get_redis(url: str | None = None) -> redis.Redis:
    url = url or get_settings().redis_url
    client = _clients.get(url)
    if client is None:
        client = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=SOCKET_TIMEOUT_S,
            health_check_interval=30,
        )
        _clients[url] = client
    return client
