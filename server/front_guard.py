"""The HTTP connection's own limits, below the application: header bytes and slow clients.

uvicorn's C parser (httptools) buffers a request's headers without limit and waits for
them for ever: one client without a token could make the server hold 300 MB of header,
or keep connections open by sending nothing. ``GuardedHttpToolsProtocol`` is uvicorn's
httptools protocol with

* at most ``MAX_HEADER_BYTES`` of request line and headers: more is answered 431 and the
  connection closed, before the parser has buffered more than the limit;
* ``HEADER_TIMEOUT_S`` to send them, counted from the connection (or the end of the
  previous response): a client that sends nothing, or its headers a byte at a time, is
  answered 408 (nothing at all: just closed).

The request body's pace is watched by the application (``server.gatekeeper``):
only there is it known whether the server is waiting for the client or the client for
the server (a slow disk pauses reading on purpose).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.core.limits import HEADER_TIMEOUT_S, MAX_HEADER_BYTES

log = logging.getLogger("meshq.server")

REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header size limit and a header timeout."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_headers = True
        self._header_bytes = 0
        self._header_timer: asyncio.TimerHandle | None = None

    # -- waiting for a request's headers ----------------------------------------------------

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self._in_headers or self.transport.is_closing():
            return
        if self._header_bytes:
            log.info("closing a connection from %s: headers not complete after %.0f s",
                     self.client[0] if self.client else "?", HEADER_TIMEOUT_S)
            self._refuse(408, f"the request headers took longer than {HEADER_TIMEOUT_S:.0f} s "
                              f"(HEADER_TIMEOUT_S={HEADER_TIMEOUT_S:.0f})")
        else:
            self.transport.close()  # an idle connection: nothing to answer

    def _refuse(self, status: int, detail: str) -> None:
        body = json.dumps({"detail": detail, "field": "headers"}).encode()
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n%s" % (status, REASONS[status], len(body), body))
        self.transport.close()

    # -- uvicorn's protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer = self.loop.call_later(HEADER_TIMEOUT_S, self._headers_too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # While a request's headers are being read they are fed at most up to the limit, so
        # the parser never buffers more than that.
        while data:
            if not self._in_headers:
                super().data_received(data)  # a body; its end may begin the next request
                return
            room = MAX_HEADER_BYTES - self._header_bytes
            if room <= 0:
                self._cancel_header_timer()
                log.info("refusing a request from %s: headers over %d bytes",
                         self.client[0] if self.client else "?", MAX_HEADER_BYTES)
                self._refuse(431, f"request line and headers over {MAX_HEADER_BYTES} bytes "
                                  f"(MAX_HEADER_BYTES={MAX_HEADER_BYTES})")
                return
            piece, data = data[:room], data[room:]
            self._header_bytes += len(piece)
            super().data_received(piece)
            if self.transport.is_closing():
                return

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self._in_headers:  # the next request on a kept-alive connection: the same limits
            self._in_headers = True
            self._header_bytes = 0
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(HEADER_TIMEOUT_S, self._headers_too_slow)

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._cancel_header_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self._in_headers:
            # Idle until the next request (uvicorn's keep-alive timeout closes it); once that
            # request begins, its headers must be complete within the timeout from here.
            self._cancel_header_timer()
            self._header_timer = self.loop.call_later(HEADER_TIMEOUT_S, self._headers_too_slow)
