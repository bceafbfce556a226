"""Streamed downloads with retries, ``Range`` resume and sha256 verification.

The body goes to ``<dest>.part`` in 1 MiB chunks and is hashed as it arrives (in a
thread, so hashing overlaps the writes). A
connection that breaks half-way is retried; when the server answers the retry's
``Range`` request with 206 the download continues where it stopped, otherwise it
starts again. Only a complete, verified file is renamed to ``dest``.
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from app.artifacts.auth import auth_headers
from app.artifacts.retry import Retryable, RetryPolicy, is_retryable_status, with_retries
from app.artifacts.upload import BODY_EXCERPT_CHARS, CHECKSUM_HEADER, CONNECT_TIMEOUT_S, DEFAULT_TIMEOUT_S
from app.core.errors import ArtifactError
from app.core.redaction import redact

CHUNK_BYTES = 1024 * 1024
CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)\Z")


@dataclass(frozen=True)
class DownloadInfo:
    path: Path
    sha256: str
    bytes: int
    resumed: bool  # True when a retry continued with a Range request


@dataclass
class _Partial:
    """What is already in ``<dest>.part``: its size and the running hash of those bytes."""

    size: int = 0
    digest: Any = field(default_factory=hashlib.sha256)
    resumed: bool = False
    server_sha256: str = ""
    # The first reply's strong ETag (or Last-Modified): sent as If-Range when resuming,
    # so a file that changed meanwhile comes back whole instead of spliced.
    validator: str = ""

    def restart(self) -> None:
        self.size = 0
        self.digest = hashlib.sha256()


class ChunkHasher:
    """Feeds chunks to a hash object from a thread, in order.

    hashlib releases the GIL on large buffers, so hashing one chunk overlaps reading
    and writing the next; at most ``depth`` chunks wait. Leaving the ``with`` block
    waits until every chunk handed over is in the digest.
    """

    def __init__(self, digest: Any, depth: int = 8) -> None:
        self.digest = digest
        self._chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, name="meshq-hash", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        while (chunk := self._chunks.get()) is not None:
            if self.error is None:  # after an error, keep draining so update() never blocks
                try:
                    self.digest.update(chunk)
                except BaseException as exc:  # noqa: BLE001 - re-raised by __exit__
                    self.error = exc

    def __enter__(self) -> ChunkHasher:
        self._thread.start()
        return self

    def update(self, chunk: bytes) -> None:
        self._chunks.put(chunk)

    def __exit__(self, *exc: object) -> None:
        self._chunks.put(None)
        self._thread.join()
        if self.error is not None:
            raise self.error


def download_file(url: str, dest: str | os.PathLike[str], *, expected_sha256: str | None = None,
                  token: str = "", headers: dict[str, str] | None = None,
                  timeout_s: float = DEFAULT_TIMEOUT_S, policy: RetryPolicy | None = None) -> DownloadInfo:
    """Download ``url`` to ``dest``; verify ``expected_sha256`` (or the server's checksum header)."""
    target = Path(dest)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    part.unlink(missing_ok=True)  # never trust bytes from another process or an earlier run
    shown = redact(url)
    partial = _Partial()

    def attempt(_: int) -> None:
        offset = partial.size if part.exists() else 0
        request_headers = auth_headers(token, headers)
        request_headers["Accept-Encoding"] = "identity"  # byte offsets must mean file offsets
        if offset:
            request_headers["Range"] = f"bytes={offset}-"
            if partial.validator:
                request_headers["If-Range"] = partial.validator
        try:
            reply = requests.get(url, headers=request_headers, stream=True,
                                 timeout=(CONNECT_TIMEOUT_S, timeout_s))
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise Retryable(f"{type(exc).__name__}: {exc}"[:BODY_EXCERPT_CHARS]) from None
        with reply:
            status = reply.status_code
            if status == 416:
                part.unlink(missing_ok=True)
                partial.restart()
                raise Retryable("HTTP 416: range not satisfiable, starting again", status)
            if not reply.ok:
                body = reply.text[:BODY_EXCERPT_CHARS].strip()
                reason = f"HTTP {status}" + (f": {body}" if body else "")
                if is_retryable_status(status):
                    raise Retryable(reason, status)
                raise ArtifactError(f"download of {shown} failed: {reason}", url=shown, status=status)
            if status == 206 and offset:
                partial.resumed = True
            else:  # the server sent the whole file (first attempt, no Range support, or it changed)
                offset = 0
                partial.restart()
                etag = reply.headers.get("ETag", "")
                partial.validator = etag if etag and not etag.startswith("W/") else \
                    reply.headers.get("Last-Modified", "")
            total = _expected_total(reply, offset)
            partial.server_sha256 = reply.headers.get(CHECKSUM_HEADER, "") or partial.server_sha256
            with open(part, "ab" if offset else "wb") as fh, ChunkHasher(partial.digest) as hasher:
                try:
                    for chunk in reply.iter_content(CHUNK_BYTES):
                        fh.write(chunk)
                        hasher.update(chunk)  # only bytes that reached the file count
                        partial.size += len(chunk)
                except (requests.ConnectionError, requests.Timeout,
                        requests.exceptions.ChunkedEncodingError) as exc:
                    raise Retryable(f"connection broken after {partial.size} bytes ({type(exc).__name__})") from None
            if total is not None and partial.size != total:
                raise Retryable(f"body ended after {partial.size} of {total} bytes")

    with_retries("download of", url, attempt, policy)
    sha = partial.digest.hexdigest()
    expected = (expected_sha256 or partial.server_sha256 or "").lower()
    if expected and sha != expected:
        part.unlink(missing_ok=True)
        raise ArtifactError(f"download of {shown}: sha256 mismatch: expected {expected}, got {sha}", url=shown)
    os.replace(part, target)
    return DownloadInfo(target, sha, partial.size, partial.resumed)


def _expected_total(reply: requests.Response, offset: int) -> int | None:
    """The full file size the reply promises (from Content-Range or Content-Length)."""
    if reply.status_code == 206:
        match = CONTENT_RANGE_RE.match(reply.headers.get("Content-Range", "").strip())
        if not match or int(match.group(1)) != offset:
            raise Retryable("206 reply with a Content-Range that does not match the request", 206)
        return int(match.group(3)) if match.group(3) != "*" else None
    length = reply.headers.get("Content-Length", "")
    return int(length) if length.isdigit() else None
