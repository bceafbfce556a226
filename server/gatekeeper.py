"""The server's front door: bearer token, URL path checks and one access-log line per request."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import Any
from urllib.parse import unquote_to_bytes

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.limits import BODY_IDLE_TIMEOUT_S

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
    The ``Authorization`` header is never logged. A request body that stops arriving for
    ``BODY_IDLE_TIMEOUT_S`` ends the request: the route sees a disconnect (an upload
    removes its temporary file) and the client gets 408 with the connection closed.
    """

    def __init__(self, app: ASGIApp, token: str, signs_in_itself: str | None = None) -> None:
        self.app = app
        self.token = token.encode()
        # A path prefix whose routes check the token themselves (the web view's sign-in cookie).
        self.signs_in_itself = signs_in_itself

    def _own_sign_in(self, path: str) -> bool:
        prefix = self.signs_in_itself
        return prefix is not None and (path == prefix or path.startswith(prefix + "/"))

    def _refusal(self, scope: Scope) -> JSONResponse | None:
        path = scope["path"]
        if self.token and path != "/healthz" and not self._own_sign_in(path):
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
        state = {"status": 0, "in": 0, "out": 0, "gone": False, "body_done": False, "stalled": False}

        async def counting_receive() -> Message:
            if state["body_done"]:
                return await receive()
            try:  # the client must keep sending its body; waiting on our disk does not count
                message = await asyncio.wait_for(receive(), BODY_IDLE_TIMEOUT_S)
            except TimeoutError:
                state["stalled"] = state["body_done"] = True
                access_log.info("request body stalled for %.0f s; ending the request", BODY_IDLE_TIMEOUT_S)
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                state["in"] += len(message.get("body", b""))
                state["body_done"] = not message.get("more_body", False)
            elif message["type"] == "http.disconnect":
                state["body_done"] = True
                if not state["status"]:
                    state["gone"] = True
            return message

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                if state["stalled"]:  # whatever the route answered: 408, and the connection closed
                    message = {**message, "status": 408,
                               "headers": [*message.get("headers", []), (b"connection", b"close")]}
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
        except Exception:
            if not state["stalled"] or state["status"]:
                raise
            # The route gave up on the stalled body (ClientDisconnect): answer for it.
            await error_response(408, f"body: nothing received for {BODY_IDLE_TIMEOUT_S:.0f} s "
                                      f"(BODY_IDLE_TIMEOUT_S={BODY_IDLE_TIMEOUT_S:.0f})", "body",
                                 {"Connection": "close"})(scope, counting_receive, counting_send)
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
