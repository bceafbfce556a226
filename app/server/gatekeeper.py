"""The server's front door: bearer token, URL path checks and one access-log line per request."""

from __future__ import annotations

import hmac
import logging
import time
from typing import Any
from urllib.parse import unquote_to_bytes

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

access_log = logging.getLogger("meshq.server.access")


def error_body(detail: str, field: str | None) -> dict[str, Any]:
    return {"detail": detail, **({"field": field} if field else {})}


def error_response(status: int, detail: str, field: str | None = None,
                    headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(detail, field), status_code=status, headers=headers)


class Gatekeeper:
    """Checks the bearer token and URL path segments, and writes one access line per request.

    Path segments under ``/api/`` are checked before routing, on the raw path, so a
    percent-encoded separator (``a%2Fb``), a dot segment (``%2e%2e``), a NUL or an
    empty segment is refused with 400 instead of being routed somewhere else.
    The ``Authorization`` header is never logged.
    """

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    def _refusal(self, scope: Scope) -> JSONResponse | None:
        path = scope["path"]
        if self.token and path != "/healthz":
            header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
            scheme, _, credentials = (header or b"").partition(b" ")
            if header is None or scheme.lower() != b"bearer" or not credentials.strip():
                return error_response(401, "Authorization: a bearer token is required",
                                       "Authorization", {"WWW-Authenticate": "Bearer"})
            if not hmac.compare_digest(credentials.strip(), self.token):
                return error_response(403, "Authorization: the bearer token is not valid",
                                       "Authorization")
        if path.startswith("/api/"):
            raw = scope.get("raw_path") or path.encode()
            for segment in raw.split(b"/")[1:]:
                decoded = unquote_to_bytes(segment)
                if not decoded:
                    return error_response(400, "path: empty path segment", "path")
                if decoded in (b".", b"..") or any(c in decoded for c in (b"/", b"\\", b"\x00")):
                    return error_response(
                        400, f"path: segment {segment.decode('latin-1')!r} is a path separator, "
                             "a dot segment or contains NUL", "path")
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state = {"status": 0, "in": 0, "out": 0, "gone": False}

        async def counting_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                state["in"] += len(message.get("body", b""))
            elif message["type"] == "http.disconnect" and not state["status"]:
                state["gone"] = True
            return message

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            elif message["type"] == "http.response.body":
                state["out"] += len(message.get("body", b""))
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal(scope, counting_receive, counting_send)
            else:
                await self.app(scope, counting_receive, counting_send)
        finally:
            status = 499 if state["gone"] else (state["status"] or 500)
            client = scope.get("client") or ("-", 0)
            access_log.info("%s %s %s %d in=%dB out=%dB %.3fs", client[0], scope["method"],
                            _printable(scope.get("raw_path") or scope["path"].encode()), status,
                            state["in"], state["out"], time.perf_counter() - started)


def _printable(raw: bytes) -> str:
    """The request path for the log: no query string, non-printable bytes escaped."""
    text = raw.decode("latin-1")
    return text if text.isprintable() and len(text) <= 512 else ascii(text[:512])
