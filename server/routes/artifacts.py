"""A task's files (``/api/v1/results/{task_id}/files``): streamed uploads, the listing and
downloads with checksums and ranges.

Uploads and downloads stream (``server.transfer``); files live in the ``ResultStore``
(``server.result_store``): an upload is made current only when complete and verified,
together with its checksum, so a broken one never leaves a partial file under the real
name and a reader never sees one upload's bytes with another's checksum.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import mimetypes
import os
import re
import time
from email.utils import formatdate
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from python_multipart.multipart import parse_options_header
from starlette.requests import ClientDisconnect

from app.core.settings import Settings
from server.gatekeeper import error_response
from server.openapi import CHECKSUM_HEADER, RUN_HEADER, UPLOAD_OPENAPI
from server.result_store import StaleRun, checked
from server.routes.dependencies import SettingsDep, StoreDep
from server.routes.run_checks import upload_run, verify_run
from server.transfer import (
    MULTIPART_ALLOWANCE_BYTES,
    ApiError,
    FileStream,
    MultipartUpload,
    RangeNotSatisfiable,
    declared_length,
    io_pool,
    parse_range,
)

log = logging.getLogger("meshq.server")

SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}\Z")

router = APIRouter()


def url_for(settings: Settings, request: Request, task_id: str, filename: str) -> str:
    """The download URL of a task's file (``ORCHESTRATOR_BASE_URL``, else the request's own)."""
    base = settings.orchestrator_base_url or str(request.base_url).rstrip("/")
    return f"{base}/api/v1/results/{quote(task_id)}/files/{quote(filename)}"


@router.post("/api/v1/results/{task_id}/files", status_code=201, tags=["artifacts"],
             openapi_extra=UPLOAD_OPENAPI,
             responses={413: {"description": "larger than MESHQ_MAX_UPLOAD_BYTES"},
                        409: {"description": "X-Meshq-Run is earlier than the task's stored run"},
                        415: {"description": "not multipart/form-data"},
                        422: {"description": "checksum mismatch"}})
async def upload_file(task_id: str, request: Request, settings: SettingsDep, store: StoreDep) -> Response:
    """Upload one artifact (multipart field ``file``), streamed to disk and renamed
    into place when complete; returns its name, size, sha256 and download URL.
    A worker names its run in ``X-Meshq-Run``: an upload from an earlier run than the
    task's stored one (a late run of a paused worker) is refused with 409."""
    max_upload = settings.max_upload_bytes
    checked(task_id, "task_id")
    run = upload_run(request)
    kind, params = parse_options_header(request.headers.get("content-type"))
    boundary = params.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise ApiError(415, "Content-Type: must be multipart/form-data with a boundary", "Content-Type",
                       close=True)
    declared = declared_length(request)
    if declared is not None and declared > max_upload + MULTIPART_ALLOWANCE_BYTES:
        raise ApiError(413, f"file: larger than the limit of {max_upload} bytes (MESHQ_MAX_UPLOAD_BYTES)",
                       "file", close=True)
    expected = {request.headers.get(CHECKSUM_HEADER, "").strip().lower()} - {""}
    if any(not SHA256_RE.match(e) for e in expected):
        raise ApiError(422, f"{CHECKSUM_HEADER}: must be 64 hexadecimal digits", CHECKSUM_HEADER, close=True)

    if run is not None:
        try:
            await run_in_threadpool(verify_run, settings, task_id, run, RUN_HEADER)
            await run_in_threadpool(store.check_run, task_id, run)  # before receiving the body
        except StaleRun as exc:
            raise ApiError(409, str(exc), RUN_HEADER, close=True) from None

    started = time.perf_counter()
    upload = MultipartUpload(store, task_id, boundary, max_upload, run)
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_upload + MULTIPART_ALLOWANCE_BYTES:
                raise ApiError(413, f"file: larger than the limit of {max_upload} bytes "
                                    "(MESHQ_MAX_UPLOAD_BYTES)", "file", close=True)
            upload.feed(chunk)
            if upload.batch_ready:
                await upload.flush()
        await upload.finish()
        sink = upload.sink
        assert sink is not None
        field_sha = bytes(upload.fields.get("sha256", b"")).decode("latin-1").strip().lower()
        if field_sha:
            if not SHA256_RE.match(field_sha):
                raise ApiError(422, "sha256: must be 64 hexadecimal digits", "sha256")
            expected.add(field_sha)
        actual = sink.digest.hexdigest()
        for want in expected:
            if want != actual:
                raise ApiError(422, f"sha256: the upload's checksum is {actual}, expected {want}; "
                                    "nothing was kept", "sha256")
        size, sha256 = await upload.commit()
    except StaleRun as exc:  # a later run stored the task's outputs while this one was received
        upload.abort()
        raise ApiError(409, str(exc), RUN_HEADER) from None
    except ClientDisconnect:
        upload.abort()
        log.info("upload %s/%s abandoned by the client after %d bytes", task_id,
                 upload.sink.filename if upload.sink else "?", received)
        return Response(status_code=400)
    except OSError as exc:
        upload.abort()
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ApiError(507, f"file: no space left for the upload ({exc.strerror})", "file",
                           close=True) from None
        raise
    except BaseException:
        upload.abort()
        raise
    elapsed = time.perf_counter() - started
    log.info("upload %s/%s: %d bytes in %.3fs (%.1f MB/s), sha256 %s", task_id, sink.filename, size,
             elapsed, size / 1e6 / max(elapsed, 1e-9), sha256)
    return JSONResponse({"task_id": task_id, "filename": sink.filename, "bytes": size, "sha256": sha256,
                         "url": url_for(settings, request, task_id, sink.filename)}, status_code=201)


@router.get("/api/v1/results/{task_id}/files", tags=["artifacts"])
def list_files(task_id: str, request: Request, settings: SettingsDep, store: StoreDep) -> dict[str, Any]:
    """The artifacts uploaded for a task (name, size, download URL)."""
    files = store.list_artifacts(task_id)
    for item in files:
        item["url"] = url_for(settings, request, task_id, item["filename"])
    return {"task_id": task_id, "files": files}


async def download_file(task_id: str, filename: str, request: Request, store: StoreDep) -> Response:
    """Download an artifact (or a file of the task directory such as ``responses.json``).
    ``Content-Length``, ``ETag`` and ``X-Checksum-Sha256`` (the sha256), one ``Range``."""
    checked(task_id, "task_id")
    checked(filename, "filename")
    opened = await run_in_threadpool(store.open_file, task_id, filename)
    if opened is None:
        raise ApiError(404, f"filename: no file {filename!r} for task {task_id!r}", "filename")
    try:
        sha256 = await asyncio.wrap_future(io_pool.submit(store.sha256_of, opened))
        etag = f'"{sha256}"'
        headers = {"ETag": etag, CHECKSUM_HEADER: sha256, "Accept-Ranges": "bytes",
                   "Last-Modified": formatdate(opened.mtime, usegmt=True),
                   "Content-Type": mimetypes.guess_type(filename)[0] or "application/octet-stream"}
        if_none_match = request.headers.get("if-none-match")
        if if_none_match and (if_none_match.strip() == "*" or etag in
                              [t.strip().removeprefix("W/") for t in if_none_match.split(",")]):
            os.close(opened.fd)
            return Response(status_code=304, headers={k: v for k, v in headers.items() if k != "Content-Type"})
        if_range = request.headers.get("if-range")
        use_range = if_range is None or if_range.strip() in (etag, headers["Last-Modified"])
        try:
            byte_range = parse_range(request.headers.get("range"), opened.size) if use_range else None
        except RangeNotSatisfiable:
            os.close(opened.fd)
            return error_response(416, f"Range: outside the file's {opened.size} bytes", "Range",
                                  {"Content-Range": f"bytes */{opened.size}", **headers,
                                   "Content-Type": "application/json"})
    except BaseException:
        os.close(opened.fd)
        raise
    start, end = byte_range or (0, opened.size)
    headers["Content-Length"] = str(end - start)
    status = 200
    if byte_range is not None:
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{opened.size}"
    started = time.perf_counter()
    method = request.method

    def done(sent: int, complete: bool) -> None:
        if method == "GET":
            elapsed = time.perf_counter() - started
            log.info("download %s/%s: %d of %d bytes in %.3fs (%.1f MB/s)%s", task_id, filename, sent,
                     end - start, elapsed, sent / 1e6 / max(elapsed, 1e-9),
                     "" if complete else " (client went away)")

    return FileStream(opened, start, end - start, status, headers, done)


for _method in ("GET", "HEAD"):
    router.add_api_route("/api/v1/results/{task_id}/files/{filename}", download_file, methods=[_method],
                         name=f"{_method.lower()}_file", tags=["artifacts"],
                         responses={206: {"description": "partial content (Range)"},
                                    304: {"description": "not modified (If-None-Match)"},
                                    404: {"description": "no such file"},
                                    416: {"description": "range not satisfiable"}})
