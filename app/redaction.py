"""Keeping secrets out of messages and log lines."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def redact(url: str) -> str:
    """Drop credentials from a URL before it goes into a message or a log line:
    user:password, and the query string (presigned URLs carry tokens there)."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        parts = parts._replace(netloc=host + (f":{parts.port}" if parts.port else ""))
    if parts.query:
        parts = parts._replace(query="…")
    return urlunsplit(parts)
