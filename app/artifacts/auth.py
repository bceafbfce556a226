"""Who gets the orchestrator's bearer token: only the orchestrator.

A URL in a spec is chosen by whoever submits the task; it must never receive the
token. ``token_for`` gives the token for ``ORCHESTRATOR_BASE_URL``'s origin only;
``auth_headers`` adds it to a request unless the spec set its own ``Authorization``.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from app.core.settings import get_settings


def auth_headers(token: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """``extra`` plus the bearer token, unless the spec set its own ``Authorization``."""
    headers = dict(extra or {})
    if token and not any(name.lower() == "authorization" for name in headers):
        headers["Authorization"] = f"Bearer {token}"
    return headers


def token_for(url: str) -> str:
    """The orchestrator token, sent only to ``ORCHESTRATOR_BASE_URL``'s origin.

    A URL in a spec is chosen by whoever submits the task; it must never receive
    the token. Without ``ORCHESTRATOR_BASE_URL`` the token goes nowhere.
    """
    settings = get_settings()
    if not settings.orchestrator_token or not settings.orchestrator_base_url:
        return ""
    mine, theirs = urlsplit(settings.orchestrator_base_url), urlsplit(url)
    same = (mine.scheme, mine.hostname, mine.port) == (theirs.scheme, theirs.hostname, theirs.port)
    return settings.orchestrator_token if same else ""
