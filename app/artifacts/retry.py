"""Retries with exponential backoff for artifact transfers (pure policy + one loop).

An attempt raises ``Retryable`` for a transient problem (connection refused or
reset, timeout, HTTP 5xx/408/429, a truncated body) and ``ArtifactError`` for a
permanent one (HTTP 4xx, checksum mismatch). Expected retries log at INFO with
the delay; only the final failure becomes an error, naming the URL and status.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from app.core.errors import ArtifactError
from app.core.redaction import redact
from app.core.settings import DEFAULT_UPLOAD_BACKOFF_S, DEFAULT_UPLOAD_RETRIES, get_settings

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_BACKOFF_S = 60.0
RETRYABLE_STATUSES = frozenset({408, 429})


class Retryable(Exception):
    """A transient failure of one attempt; ``status`` is the HTTP status when there was one."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason, status)
        self.reason = reason
        self.status = status

    def __str__(self) -> str:
        return self.reason


@dataclass(frozen=True)
class RetryPolicy:
    """``retries`` attempts after the first; waits ``backoff_s``, then doubles, capped."""

    retries: int = DEFAULT_UPLOAD_RETRIES
    backoff_s: float = DEFAULT_UPLOAD_BACKOFF_S
    max_backoff_s: float = MAX_BACKOFF_S

    def delay_s(self, retry: int) -> float:
        """Wait before retry number ``retry`` (1-based)."""
        return min(self.backoff_s * 2 ** (retry - 1), self.max_backoff_s)

    def window_s(self) -> float:
        """Total time spent waiting if every attempt fails."""
        return sum(self.delay_s(i) for i in range(1, self.retries + 1))

    @classmethod
    def from_settings(cls) -> RetryPolicy:
        settings = get_settings()
        return cls(retries=settings.upload_retries, backoff_s=settings.upload_backoff_s)


def is_retryable_status(status: int) -> bool:
    return status >= 500 or status in RETRYABLE_STATUSES


def with_retries(what: str, url: str, attempt: Callable[[int], T], policy: RetryPolicy | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> T:
    """Run ``attempt(n)`` (n = 0, 1, ...) until it returns; retry ``Retryable`` with backoff."""
    policy = policy or RetryPolicy.from_settings()
    shown = redact(url)
    for n in range(policy.retries + 1):
        try:
            return attempt(n)
        except Retryable as exc:
            if n >= policy.retries:
                status = f" (last status {exc.status})" if exc.status else ""
                raise ArtifactError(f"{what} {shown} failed after {n + 1} attempt(s){status}: {exc.reason}",
                                    url=shown, status=exc.status) from None
            delay = policy.delay_s(n + 1)
            log.info("%s %s: %s; retry %d/%d in %.1fs", what, shown, exc.reason, n + 1, policy.retries, delay)
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover
