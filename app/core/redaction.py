"""Keeping secrets out of messages and log lines."""

from __future__ import annotations

import functools
import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit


def redact(url: str) -> str:
    """Drop credentials from a URL before it goes into a message or a log line:
    user:password, and the query string (presigned URLs carry tokens there). A Sentinel
    address (``sentinel://h1:26379;sentinel://h2:26379/0``) is redacted part by part."""
    if url.startswith("sentinel://") and ";" in url:
        return ";".join(redact(part) for part in url.split(";"))
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        parts = parts._replace(netloc=host + (f":{parts.port}" if parts.port else ""))
    if parts.query:
        parts = parts._replace(query="…")
    return urlunsplit(parts)


REDACTED = "[redacted]"
# Key segments (split at _ - . and spaces) that name a secret: ``access_token``, ``hf-token``,
# ``api_key``, ``Authorization``, ``password``... but not ``max_new_tokens`` or ``total_tokens``.
_SECRET_SEGMENTS = frozenset({"authorization", "token", "password", "passwd", "secret", "apikey", "cookie",
                              "credential", "credentials"})
_SEGMENT_SPLIT = re.compile(r"[_\-.\s]+")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://\S+\Z")


def is_secret_key(key: str) -> bool:
    # Key names are few and repeat on every send (each message is redacted): short ones are cached.
    return _is_secret_name(key) if len(key) <= 128 else _segments_name_a_secret(key)


@functools.lru_cache(maxsize=2048)
def _is_secret_name(key: str) -> bool:
    return _segments_name_a_secret(key)


def _segments_name_a_secret(key: str) -> bool:
    segments = [s for s in _SEGMENT_SPLIT.split(key.lower()) if s]
    return any(s in _SECRET_SEGMENTS for s in segments) or any(
        a == "api" and b == "key" for a, b in zip(segments, segments[1:], strict=False))


def redact_secrets(value: Any) -> Any:
    """A copy of JSON-like ``value`` safe to show or store outside the worker.

    Every value of a ``headers`` mapping (``output.destination.headers.Authorization``
    and friends) and every value whose key names a secret becomes ``[redacted]``; URLs
    lose their credentials and query string (``redact``). Everything else is kept, so a
    spec stays readable in Flower, events and stored results.
    """
    if isinstance(value, dict):
        out: dict[Any, Any] = {}
        for key, item in value.items():
            name = str(key)
            if name.lower() == "headers" and isinstance(item, dict):
                out[key] = {header: REDACTED for header in item}
            elif is_secret_key(name) and item not in (None, ""):
                out[key] = REDACTED
            else:
                out[key] = redact_secrets(item)
        return out
    if isinstance(value, list | tuple):
        return type(value)(redact_secrets(item) for item in value)
    if isinstance(value, str) and _URL.match(value):
        return redact(value)
    return value
