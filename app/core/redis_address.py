"""Where meshq's Redis is: one ``redis://`` server, or a master found through Sentinel.

``REDIS_URL`` takes Celery's Sentinel form, the sentinels separated by ``;``::

    sentinel://host1:26379;sentinel://host2:26379;sentinel://host3:26379/0

(a password, if the master needs one, as ``sentinel://:password@host:26379``), with the
name the sentinels know the master by in ``MESHQ_REDIS_MASTER``. The broker, the result
backend and every meshq client (``app.core.redis_client``) ask the sentinels for the master,
and ask again when it changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from app.core.errors import ConfigError

SENTINEL_SCHEME = "sentinel://"
SEPARATOR = ";"
MASTER_VARIABLE = "MESHQ_REDIS_MASTER"


def is_sentinel_url(url: str) -> bool:
    return url.startswith(SENTINEL_SCHEME)


@dataclass(frozen=True)
class SentinelAddress:
    """The sentinels to ask (host, port), and the database, user and password on the master."""

    sentinels: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)


def parse_sentinel_url(url: str, variable: str = "REDIS_URL") -> SentinelAddress:
    """``sentinel://h1:26379;sentinel://h2:26379/0`` → its sentinels and database; ``ConfigError``
    naming ``variable`` for anything else. The first part that names a database, user or
    password gives it (Celery reads them from the first part alike)."""
    sentinels: list[tuple[str, int]] = []
    db: int | None = None
    username = password = None
    for part in url.split(SEPARATOR):
        part = part.strip()
        if not is_sentinel_url(part):
            raise ConfigError(variable, f"{part!r} is not a sentinel://host:port address "
                                        "(separate several sentinels with ';')")
        try:
            split = urlsplit(part)
            host, port = split.hostname, split.port or 26379
        except ValueError as exc:
            raise ConfigError(variable, f"{part!r}: {exc}") from None
        if not host:
            raise ConfigError(variable, f"{part!r} names no host")
        sentinels.append((host, port))
        path = split.path.strip("/")
        if path and db is None:
            if not path.isdigit():
                raise ConfigError(variable, f"{part!r}: the database must be a number, not {path!r}")
            db = int(path)
        if split.password is not None and password is None:
            username, password = unquote(split.username) if split.username else None, unquote(split.password)
    return SentinelAddress(tuple(sentinels), db or 0, username, password)
