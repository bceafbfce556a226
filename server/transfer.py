"""Streaming HTTP transfers for the orchestrator server: multipart uploads and ranged downloads.

Uploads are parsed from the raw request stream, never held whole in memory: the
multipart parser hands file bytes over in batches to two threads, one hashing and
one writing them (both release the GIL), while the event loop receives the next batch.
Downloads read the next 1 MiB chunk in a thread while the current one is sent.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import ctypes.util
import logging
import os
import re
from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.types import Receive, Scope, Send

from app.core.errors import MeshqError
from server.result_store import OpenFile, ResultStore, UploadSink, checked

UPLOAD_BATCH_BYTES = 4 * 1024 * 1024  # file bytes handed to the hash and write threads at a time
DOWNLOAD_CHUNK_BYTES = 1024 * 1024
MULTIPART_ALLOWANCE_BYTES = 64 * 1024  # boundaries, part headers and small fields on top of the file
MAX_FIELD_BYTES = 1024  # a non-file form field (``sha256``)
MAX_PART_HEADERS_BYTES = 8 * 1024

# Hashing, disk writes and reads run here, off the event loop.
io_pool = concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="meshq-io")

log = logging.getLogger(__name__)

# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's maximum on 64-bit
TRIM_THRESHOLD_BYTES = 256 * 1024 * 1024


def tune_allocator_for_streaming() -> bool:
    """Keep freed receive buffers in the heap instead of handing them back to the kernel.

    The event loop receives a request body in fresh 256 KiB ``bytes`` objects, above
    glibc's default mmap threshold: each one was mapped, faulted in page by page and
    unmapped again — tens of thousands of page faults per GiB uploaded. With a higher
    mmap threshold and trim threshold the same heap memory serves every chunk
    (measured: minor page faults per 1 GiB upload 34,000–50,000 → about 0; server RSS
    stays near 70 MB). Returns False where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        mallopt = None
    if mallopt is None:
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD,
                                                                                 TRIM_THRESHOLD_BYTES))
    if not ok:
        log.warning("mallopt refused the streaming settings; uploads will run slower")
    return ok


class ApiError(MeshqError):
    """An HTTP error reply: ``{"detail": ..., "field": ...}`` with ``status``."""

    def __init__(self, status: int, detail: str, field: str | None = None, *,
                 close: bool = False, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.field = field
        self.headers = dict(headers or {})
        if close:  # the request body was not read to its end: do not reuse the connection
            self.headers["Connection"] = "close"


# -- multipart upload ------------------------------------------------------------
class MultipartUpload:
    """Streams one ``multipart/form-data`` body into an ``UploadSink``.

    Field ``file`` (with a filename) is the artifact; an optional field ``sha256`` is
    the expected checksum. Other fields are ignored (bounded). At most one batch of
    file bytes is being hashed and written (in two threads) while the next is parsed.
    """

    def __init__(self, store: ResultStore, task_id: str, boundary: bytes, max_file_bytes: int,
                 run: int | None = None) -> None:
        self.store = store
        self.task_id = task_id
        self.run = run  # the uploading worker's run (``X-Meshq-Run``), None for a plain upload
        self.max_file_bytes = max_file_bytes
        self.sink: UploadSink | None = None
        self.fields: dict[str, bytearray] = {}
        self.file_bytes = 0
        self.finished = False
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers_bytes = 0
        self._part: str | None = None  # "file", a field name, or None (ignored part)
        self._file_done = False
        self._pending: list[memoryview | bytes] = []
        self._pending_bytes = 0
        self._inflight: list[concurrent.futures.Future[Any]] = []
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self._on_part_begin,
            "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value,
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
            "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
            "on_end": self._on_end,
        })

    # parser callbacks (synchronous, inside ``feed``)
    def _on_part_begin(self) -> None:
        self._headers = []
        self._headers_bytes = 0
        self._part = None

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]
        self._count_header(end - start)

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]
        self._count_header(end - start)

    def _count_header(self, n: int) -> None:
        self._headers_bytes += n
        if self._headers_bytes > MAX_PART_HEADERS_BYTES:
            raise ApiError(400, "body: multipart part headers are too long", "body", close=True)

    def _on_header_end(self) -> None:
        self._headers.append((bytes(self._header_field).lower(), bytes(self._header_value)))
        self._header_field.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        disposition = next((v for k, v in self._headers if k == b"content-disposition"), b"")
        kind, params = parse_options_header(disposition)
        name = params.get(b"name", b"").decode("latin-1")
        if name != "file":
            if name in self.fields or len(self.fields) >= 16:
                raise ApiError(400, f"{name or 'body'}: repeated or too many form fields", name or "body",
                               close=True)
            self._part = name
            self.fields[name] = bytearray()
            return
        if self.sink is not None or self._file_done:
            raise ApiError(400, "file: only one file per upload", "file", close=True)
        if b"filename" not in params:
            raise ApiError(400, "filename: the 'file' part has no filename", "filename", close=True)
        if b"\\" in disposition:
            raise ApiError(400, "filename: must not contain a path separator", "filename", close=True)
        try:
            filename = params[b"filename"].decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "filename: not valid UTF-8", "filename", close=True) from None
        self.sink = self.store.new_upload(self.task_id, checked(filename, "filename"), self.run)
        self._part = "file"

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part == "file":
            self.file_bytes += end - start
            if self.file_bytes > self.max_file_bytes:
                raise ApiError(413, f"file: larger than the limit of {self.max_file_bytes} bytes "
                                    "(MESHQ_MAX_UPLOAD_BYTES)", "file", close=True)
            # Chunks from the request are immutable bytes: keep a view, no copy.
            piece = memoryview(data)[start:end] if type(data) is bytes else bytes(data[start:end])
            self._pending.append(piece)
            self._pending_bytes += end - start
        elif self._part is not None:
            value = self.fields[self._part]
            value += data[start:end]
            if len(value) > MAX_FIELD_BYTES:
                raise ApiError(400, f"{self._part}: form field longer than {MAX_FIELD_BYTES} bytes",
                               self._part, close=True)

    def _on_part_end(self) -> None:
        if self._part == "file":
            self._file_done = True
        self._part = None

    def _on_end(self) -> None:
        self.finished = True

    # driving the parser and the writer thread
    def feed(self, chunk: bytes) -> None:
        try:
            self.parser.write(chunk)
        except MultipartParseError as exc:
            raise ApiError(400, f"body: malformed multipart data ({exc})", "body", close=True) from None

    @property
    def batch_ready(self) -> bool:
        return self._pending_bytes >= UPLOAD_BATCH_BYTES

    async def flush(self) -> None:
        """Wait for the batch in the hash and write threads, then hand them the pending one."""
        for future in self._inflight:
            await asyncio.wrap_future(future)
        self._inflight = []
        if self._pending and self.sink is not None:
            batch, self._pending, self._pending_bytes = self._pending, [], 0
            self._inflight = [io_pool.submit(self.sink.hash, batch),  # type: ignore[arg-type]
                              io_pool.submit(self.sink.write, batch)]  # type: ignore[arg-type]

    async def finish(self) -> None:
        self.parser.finalize()
        if not self.finished:
            raise ApiError(400, "body: the multipart body ended before its closing boundary", "body")
        if self.sink is None:
            raise ApiError(400, "file: the multipart form has no 'file' part", "file")
        await self.flush()
        await self.flush()

    async def commit(self) -> tuple[int, str]:
        """Rename the finished upload into place (in a thread); returns (bytes, sha256).

        Tracked like a batch, so an ``abort`` while it runs (the request cancelled at
        shutdown) waits for it instead of closing the file under it.
        """
        assert self.sink is not None
        future = io_pool.submit(self.sink.commit)
        self._inflight = [future]
        result = await asyncio.wrap_future(future)
        self._inflight = []
        return result

    def abort(self) -> None:
        """Remove the temporary file, once the hash and write threads are done with it."""
        sink = self.sink
        if sink is None:
            return
        running = [f for f in self._inflight if not f.done()]
        if not running:
            sink.abort()
            return

        def abort_when_done() -> None:
            concurrent.futures.wait(running)
            sink.abort()

        io_pool.submit(abort_when_done)


# -- downloads -------------------------------------------------------------------
RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d{0,18})-(\d{0,18})\s*\Z", re.ASCII | re.IGNORECASE)
DIGITS_RE = re.compile(r"^\d{1,18}\Z", re.ASCII)


class RangeNotSatisfiable(Exception):
    pass


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """One ``bytes=`` range → ``(start, end_exclusive)``; None means "send the whole file".

    Several ranges, other units and malformed headers are ignored (RFC 9110 allows a
    server to ignore ``Range``); a well-formed range outside the file raises
    ``RangeNotSatisfiable``.
    """
    match = RANGE_RE.match(header or "")
    if match is None:
        return None
    first, last = match.group(1), match.group(2)
    if not first:  # suffix: the last N bytes
        if not last:
            return None
        n = int(last)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable()
        return max(0, size - n), size
    start = int(first)
    end = int(last) + 1 if last else size
    if last and end <= start:
        return None  # last < first: syntactically invalid, ignore
    if start >= size:
        raise RangeNotSatisfiable()
    return start, min(end, size)


def declared_length(request: Request) -> int | None:
    """The request's ``Content-Length`` as a number, or None (absent or not a plain number)."""
    match = DIGITS_RE.match(request.headers.get("content-length", ""))
    return int(match.group(0)) if match else None


class FileStream(Response):
    """Streams ``length`` bytes of an open file from ``start`` in 1 MiB chunks.

    The next chunk is read in a thread while the current one is sent; a client that
    goes away stops the reading. The file descriptor is closed at the end.
    """

    def __init__(self, opened: OpenFile, start: int, length: int, status_code: int,
                 headers: dict[str, str], on_done: Callable[[int, bool], None]) -> None:
        super().__init__(status_code=status_code, headers=headers)
        self.opened = opened
        self.start = start
        self.length = length
        self.on_done = on_done

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sent = 0
        pending: concurrent.futures.Future[bytes] | None = None
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.ensure_future(watch())
        fd = self.opened.fd
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            if scope["method"] == "HEAD" or self.length == 0:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            offset, remaining = self.start, self.length
            pending = io_pool.submit(os.pread, fd, min(DOWNLOAD_CHUNK_BYTES, remaining), offset)
            while remaining > 0 and pending is not None and not gone.is_set():
                chunk = await asyncio.wrap_future(pending)
                pending = None
                if not chunk:
                    raise OSError(f"{self.opened.path} shrank while being sent")
                offset += len(chunk)
                remaining -= len(chunk)
                if remaining > 0:
                    pending = io_pool.submit(os.pread, fd, min(DOWNLOAD_CHUNK_BYTES, remaining), offset)
                await send({"type": "http.response.body", "body": chunk, "more_body": remaining > 0})
                sent += len(chunk)
        finally:
            watcher.cancel()
            if pending is not None and not pending.done():
                pending.add_done_callback(lambda _f: os.close(fd))
            else:
                os.close(fd)
            self.on_done(sent, sent == self.length)


# -- request bodies ----------------------------------------------------------------
async def read_body(request: Request, limit: int, name: str = "limit") -> bytes:
    """The whole request body, refused with 413 past ``limit`` bytes (``name`` says which limit)."""
    declared = declared_length(request)
    if declared is not None and declared > limit:
        raise ApiError(413, f"body: larger than {limit} bytes ({name}={limit})", "body", close=True)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"body: larger than {limit} bytes ({name}={limit})", "body", close=True)
    return bytes(body)


