"""Uploads to the orchestrator: a file as a streamed multipart body, or a JSON envelope.

The multipart body is produced from the open file as the socket asks for it
(``MultipartFileBody``, in 1 MiB reads), so a 20 GiB archive costs about 1 MiB of
memory. The expected sha256 travels as form field ``sha256`` and
header ``X-Checksum-Sha256`` so the server can refuse a corrupted upload. The
uploading run of the task goes in ``X-Meshq-Run``. The token goes in
``Authorization: Bearer`` and never into a log line.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urljoin

import requests

from app.artifacts.auth import auth_headers
from app.artifacts.retry import Retryable, RetryPolicy, is_retryable_status, with_retries
from app.core.errors import ArtifactError
from app.core.redaction import redact

CONNECT_TIMEOUT_S = 10.0
DEFAULT_TIMEOUT_S = 300.0
CHECKSUM_HEADER = "X-Checksum-Sha256"
RUN_HEADER = "X-Meshq-Run"  # the uploading run of the task: the server refuses an earlier run's (409)
BODY_EXCERPT_CHARS = 300


def _check_reply(reply: requests.Response, what: str, url: str) -> None:
    """Raise ``Retryable`` for 5xx/408/429 and ``ArtifactError`` for other non-2xx replies."""
    if reply.ok:
        return
    body = reply.text[:BODY_EXCERPT_CHARS].strip()
    reason = f"HTTP {reply.status_code}" + (f": {body}" if body else "")
    if is_retryable_status(reply.status_code):
        raise Retryable(reason, reply.status_code)
    raise ArtifactError(f"{what} {redact(url)} failed: {reason}", url=redact(url), status=reply.status_code)


def _json_reply(reply: requests.Response, what: str, url: str) -> dict[str, Any]:
    try:
        data = reply.json()
    except ValueError:
        raise ArtifactError(f"{what} {redact(url)}: the server did not answer with JSON",
                            url=redact(url), status=reply.status_code) from None
    return data if isinstance(data, dict) else {"reply": data}


UPLOAD_CHUNK_BYTES = 1024 * 1024


class MultipartFileBody:
    """A ``multipart/form-data`` body (text fields, then one file) read from disk on demand.

    ``len()`` gives the exact size, so requests sends a ``Content-Length``. ``read``
    hands out 1 MiB at a time whatever size http.client asks for (8 KiB): the
    per-call overhead of small reads, not the network, limited throughput.
    """

    def __init__(self, fields: list[tuple[str, str]], file_field: str, filename: str, fh: BinaryIO,
                 size: int) -> None:
        self.boundary = secrets.token_hex(16)
        head = b"".join(
            f'--{self.boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
            for name, value in fields)
        head += (f'--{self.boundary}\r\nContent-Disposition: form-data; name="{file_field}"; '
                 f'filename="{filename.replace(chr(34), "%22")}"\r\nContent-Type: application/octet-stream\r\n\r\n').encode()
        self._parts: list[bytes | BinaryIO] = [head, fh, f"\r\n--{self.boundary}--\r\n".encode()]
        self._length = len(head) + size + len(self._parts[2])  # type: ignore[arg-type]

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def __len__(self) -> int:
        return self._length

    def read(self, size: int = -1) -> bytes:
        while self._parts:
            part = self._parts[0]
            if isinstance(part, bytes):
                self._parts.pop(0)
                if part:
                    return part
                continue
            chunk = part.read(UPLOAD_CHUNK_BYTES)
            if chunk:
                return chunk
            self._parts.pop(0)
        return b""


def upload_file(url: str, path: str | os.PathLike[str], *, sha256: str | None = None, token: str = "",
                headers: dict[str, str] | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                policy: RetryPolicy | None = None, filename: str | None = None,
                run: int | None = None) -> dict[str, Any]:
    """POST ``path`` as multipart field ``file`` to ``url``; return the server's JSON reply.

    The reply's ``url`` (if any) is made absolute against ``url``. ``run`` (the task's run
    doing the upload) goes in ``X-Meshq-Run``: the orchestrator answers 409 to a run
    earlier than the one it stored for the task.
    """
    file = Path(path)
    name = filename or file.name
    if not file.is_file():
        raise ArtifactError(f"{file}: no such file to upload", path=str(file), url=redact(url))

    def attempt(_: int) -> dict[str, Any]:
        with open(file, "rb") as fh:
            body = MultipartFileBody([("sha256", sha256)] if sha256 else [], "file", name, fh,
                                     os.fstat(fh.fileno()).st_size)
            request_headers = auth_headers(token, headers)
            request_headers["Content-Type"] = body.content_type
            if sha256:
                request_headers[CHECKSUM_HEADER] = sha256
            if run is not None:
                request_headers[RUN_HEADER] = str(run)
            try:
                reply = requests.post(url, data=body, headers=request_headers,
                                      timeout=(CONNECT_TIMEOUT_S, timeout_s))
            except (requests.ConnectionError, requests.Timeout) as exc:
                raise Retryable(f"{type(exc).__name__}: {_short(exc)}") from None
        with reply:
            _check_reply(reply, "upload of " + name + " to", url)
            data = _json_reply(reply, "upload to", url)
        if isinstance(data.get("url"), str):
            data["url"] = urljoin(url, data["url"])
        return data

    return with_retries(f"upload of {name} to", url, attempt, policy)


def post_json(url: str, payload: dict[str, Any], *, token: str = "", headers: dict[str, str] | None = None,
              timeout_s: float = DEFAULT_TIMEOUT_S, policy: RetryPolicy | None = None,
              method: str = "POST") -> dict[str, Any]:
    """Send ``payload`` as JSON (``method``: POST or PUT) with retries; return the JSON reply
    (``{}`` if none)."""

    def attempt(_: int) -> dict[str, Any]:
        try:
            reply = requests.request(method, url, json=payload, headers=auth_headers(token, headers),
                                     timeout=(CONNECT_TIMEOUT_S, timeout_s))
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise Retryable(f"{type(exc).__name__}: {_short(exc)}") from None
        with reply:
            _check_reply(reply, method, url)
            return _json_reply(reply, method, url) if reply.content else {}

    return with_retries(method, url, attempt, policy)


def _short(exc: BaseException) -> str:
    """The innermost reason of a requests error, without urllib3's long wrapper text."""
    text = str(exc)
    marker = "Caused by "
    if marker in text:
        text = text.split(marker, 1)[1]
    return text[:BODY_EXCERPT_CHARS]
