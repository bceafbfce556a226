"""The orchestrator HTTP server, ``meshq serve`` (DESIGN §7).

One FastAPI application: the artifact store (streamed uploads and downloads with
checksums and ranges), result envelopes, task submission and state, the worker
registry. ``create_app`` builds it; ``serve`` runs it with uvicorn.

Uploads and downloads stream (``app.transfer``); files live in a ``ResultStore``
(``app.result_store``): an upload is renamed into place only when complete and
verified, so a broken one never leaves a partial file under the real name.

Authentication: with ``ORCHESTRATOR_TOKEN`` set, every path but ``/healthz`` —
``/openapi.json`` and ``/docs`` included — needs ``Authorization: Bearer <token>``
(401 without it, 403 with a wrong one).
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import json
import logging
import mimetypes
import os
import re
import time
from email.utils import formatdate
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote_to_bytes

import redis
import yaml
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, ValidationError
from python_multipart.multipart import parse_options_header
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import MeshqError, SpecError
from app.names import SAFE_NAME_RE
from app.result_store import BadName, ResultStore, checked
from app.settings import TAG_RE, Settings, load_settings
from app.transfer import (
    MULTIPART_ALLOWANCE_BYTES,
    ApiError,
    FileStream,
    MultipartUpload,
    RangeNotSatisfiable,
    declared_length,
    io_pool,
    parse_range,
    read_body,
    tune_allocator_for_streaming,
)

log = logging.getLogger("meshq.server")
access_log = logging.getLogger("meshq.server.access")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_RESULTS_DIR = "./results_server"
RESULTS_DIR_ENV = "MESHQ_SERVER_RESULTS_DIR"  # default of --results-dir

MAX_JSON_BODY_BYTES = 64 * 1024 * 1024  # result envelopes and task documents
MAX_DOCUMENT_NODES = 1_000_000  # YAML aliases must not expand a small body into a huge spec
SHUTDOWN_GRACE_S = 10
SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
CHECKSUM_HEADER = "X-Checksum-Sha256"
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml", "text/plain")

def _error_body(detail: str, field: str | None) -> dict[str, Any]:
    return {"detail": detail, **({"field": field} if field else {})}


def _error_response(status: int, detail: str, field: str | None = None,
                    headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(_error_body(detail, field), status_code=status, headers=headers)


# -- access log, authentication and path checks (one pure ASGI middleware) --------
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
                return _error_response(401, "Authorization: a bearer token is required",
                                       "Authorization", {"WWW-Authenticate": "Bearer"})
            if not hmac.compare_digest(credentials.strip(), self.token):
                return _error_response(403, "Authorization: the bearer token is not valid",
                                       "Authorization")
        if path.startswith("/api/"):
            raw = scope.get("raw_path") or path.encode()
            for segment in raw.split(b"/")[1:]:
                decoded = unquote_to_bytes(segment)
                if not decoded:
                    return _error_response(400, "path: empty path segment", "path")
                if decoded in (b".", b"..") or any(c in decoded for c in (b"/", b"\\", b"\x00")):
                    return _error_response(
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


# -- request bodies ----------------------------------------------------------------
def _count_nodes(document: Any, budget: int) -> None:
    """Refuse documents whose YAML aliases expand beyond ``budget`` nodes."""
    stack, seen = [document], 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > budget:
            raise ApiError(413, f"body: the document expands to more than {budget} values", "body")
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def parse_document(body: bytes, content_type: str | None) -> Any:
    """A task/pipeline document from JSON or YAML (YAML also reads JSON)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media and media != "application/json" and media not in YAML_TYPES and not media.endswith("+json"):
        raise ApiError(415, f"Content-Type: {media!r} is not JSON or YAML", "Content-Type")
    try:
        text = body.decode("utf-8")
        if media == "application/json" or media.endswith("+json"):
            document = json.loads(text)
        else:
            documents = list(yaml.safe_load_all(text))
            if len(documents) != 1:
                raise ApiError(400, f"body: expected one YAML document, got {len(documents)}", "body")
            document = documents[0]
    except ApiError:
        raise
    except (UnicodeDecodeError, ValueError, yaml.YAMLError, RecursionError) as exc:
        raise ApiError(400, f"body: not valid {'JSON' if 'json' in media else 'YAML/JSON'}: "
                            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", "body") from None
    _count_nodes(document, MAX_DOCUMENT_NODES)
    return document


# -- task submission -------------------------------------------------------------------
TASK_DOCUMENT_KEYS = ("apiVersion", "kind", "metadata", "spec")


def task_spec_of(document: Any) -> Any:
    """The spec of a task document ``{apiVersion?, kind?, metadata?, spec}`` or a bare spec."""
    if not isinstance(document, dict):
        raise SpecError("body", f"must be a mapping (a task document or a spec), got {type(document).__name__}")
    if "spec" not in document:
        if "taskType" in document:
            return document
        raise SpecError("spec", "required: a task document {apiVersion, kind, metadata, spec} "
                                "or a bare spec with taskType")
    unknown = sorted(str(k) for k in document if k not in TASK_DOCUMENT_KEYS)
    if unknown:
        raise SpecError(unknown[0], "unknown field")
    for key in ("apiVersion", "kind"):
        if key in document and not isinstance(document[key], str):
            raise SpecError(key, "must be a string")
    if "metadata" in document and not isinstance(document["metadata"], dict | None):
        raise SpecError("metadata", "must be a mapping")
    return document["spec"]


def submit_document(document: Any) -> dict[str, Any]:
    """Validate and submit one document (a task or a pipeline); the HTTP API's only way in.

    Returns ``{"id", "kind", "task_ids", "stages", "queue", "warnings"}`` (``queue`` is
    the first stage's); raises ``SpecError`` naming the field. A task document is a
    one-stage pipeline whose id is its task id. ``${env:...}`` references are refused:
    the server does not hand its environment to whoever posts a document.
    """
    from pipelines import Pipeline

    task_spec_of(document)  # the envelope: a mapping, known keys, a spec
    run = Pipeline.from_dict(document, expand_environment=False).submit()
    return {"id": run.id, "kind": "pipeline" if len(run.stages) > 1 else "task",
            "task_ids": [stage["task_id"] for stage in run.stages],
            "stages": {stage["name"]: {"task_id": stage["task_id"], "queue": stage["queue"]}
                       for stage in run.stages},
            "queue": run.stages[0]["queue"], "warnings": run.warnings}


def pipeline_run(some_id: str, client: Any) -> Any:
    """The ``PipelineRun`` of a pipeline of two or more stages, else None (a task keeps its task view)."""
    from app.errors import PipelineError
    from pipelines import PipelineRun

    try:
        run = PipelineRun.get(some_id, client)
    except PipelineError:
        return None
    return run if len(run.stages) > 1 else None


# -- Celery state ------------------------------------------------------------------------
BACKEND_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, ConnectionError, OSError, TimeoutError)
try:
    from kombu.exceptions import OperationalError

    BACKEND_ERRORS = (*BACKEND_ERRORS, OperationalError)
except ImportError:  # pragma: no cover
    pass


def _task_meta(task_id: str) -> dict[str, Any]:
    from app.celery import app as celery_app

    try:
        return dict(celery_app.backend.get_task_meta(task_id))
    except BACKEND_ERRORS as exc:
        raise ApiError(503, f"result backend unavailable: {exc}") from None


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def task_state(task_id: str) -> dict[str, Any]:
    """State, progress, result or error of a Celery task, as JSON."""
    meta = _task_meta(task_id)
    state = str(meta.get("status") or "PENDING")
    result = meta.get("result")
    reply: dict[str, Any] = {"id": task_id, "state": state}
    for key in ("name", "worker", "queue", "date_done", "retries"):
        if meta.get(key) is not None:
            reply[key] = _jsonable(meta[key])
    if isinstance(result, BaseException):
        reply["error"] = {"type": type(result).__name__, "message": str(result)}
        if isinstance(result, SpecError):
            reply["error"]["field"] = result.field
    elif state == "SUCCESS":
        reply["result"] = _jsonable(result)
    elif result is not None:
        reply["progress"] = _jsonable(result)
    return reply


# -- models for the OpenAPI schema ----------------------------------------------------------
class ResultEnvelope(BaseModel):
    """What a worker posts when a task ends; extra fields are kept."""

    model_config = ConfigDict(extra="allow")
    task_id: str
    result: Any = None
    worker_id: str | None = None


UPLOAD_OPENAPI: dict[str, Any] = {
    "parameters": [{"name": CHECKSUM_HEADER, "in": "header", "required": False,
                    "description": "expected sha256 of the file (hex); mismatch → 422",
                    "schema": {"type": "string"}}],
    "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file"],
        "properties": {"file": {"type": "string", "format": "binary"},
                       "sha256": {"type": "string", "description": "expected sha256 (hex)"}}}}}},
}
ENVELOPE_OPENAPI: dict[str, Any] = {
    "requestBody": {"required": True,
                    "content": {"application/json": {"schema": ResultEnvelope.model_json_schema()}}},
}
DOCUMENT_OPENAPI: dict[str, Any] = {
    "requestBody": {"required": True, "content": {
        "application/json": {"schema": {"type": "object", "description":
                                        "task document {apiVersion, kind, metadata, spec} or a bare spec"}},
        "application/yaml": {"schema": {"type": "string"}}}},
}
ERRORS_OPENAPI: dict[int | str, dict[str, Any]] = {
    400: {"description": "bad name, path or body"}, 401: {"description": "token missing"},
    403: {"description": "token wrong"},
}


# -- the application ------------------------------------------------------------------------
def create_app(results_dir: Path | str | None = None, settings: Settings | None = None) -> FastAPI:
    """The orchestrator API over ``results_dir`` (default ``$MESHQ_SERVER_RESULTS_DIR``
    or ``./results_server``), configured by ``settings`` (default: the environment)."""
    settings = settings or load_settings()
    store = ResultStore(results_dir or os.environ.get(RESULTS_DIR_ENV) or DEFAULT_RESULTS_DIR)
    max_upload = settings.max_upload_bytes
    app = FastAPI(title="meshq orchestrator", version="1", description=__doc__,
                  responses=ERRORS_OPENAPI)
    app.state.store = store
    app.state.settings = settings

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc.status, exc.detail, exc.field, exc.headers)

    @app.exception_handler(BadName)
    async def _bad_name(request: Request, exc: BadName) -> JSONResponse:
        return _error_response(400, str(exc), exc.field)

    @app.exception_handler(SpecError)
    async def _spec_error(request: Request, exc: SpecError) -> JSONResponse:
        return _error_response(422, str(exc), exc.field)

    @app.exception_handler(MeshqError)
    async def _meshq_error(request: Request, exc: MeshqError) -> JSONResponse:
        return _error_response(400, str(exc))

    def url_for(request: Request, task_id: str, filename: str) -> str:
        base = settings.orchestrator_base_url or str(request.base_url).rstrip("/")
        return f"{base}/api/v1/results/{quote(task_id)}/files/{quote(filename)}"

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, Any]:
        """Liveness: the process answers (no Redis round trip, no token)."""
        return {"status": "ok"}

    # -- artifacts ------------------------------------------------------------
    @app.post("/api/v1/results/{task_id}/files", status_code=201, tags=["artifacts"],
              openapi_extra=UPLOAD_OPENAPI,
              responses={413: {"description": "larger than MESHQ_MAX_UPLOAD_BYTES"},
                         415: {"description": "not multipart/form-data"},
                         422: {"description": "checksum mismatch"}})
    async def upload_file(task_id: str, request: Request) -> Response:
        """Upload one artifact (multipart field ``file``), streamed to disk and renamed
        into place when complete; returns its name, size, sha256 and download URL."""
        checked(task_id, "task_id")
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

        started = time.perf_counter()
        upload = MultipartUpload(store, task_id, boundary, max_upload)
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
                             "url": url_for(request, task_id, sink.filename)}, status_code=201)

    @app.get("/api/v1/results/{task_id}/files", tags=["artifacts"])
    def list_files(task_id: str, request: Request) -> dict[str, Any]:
        """The artifacts uploaded for a task (name, size, download URL)."""
        files = store.list_artifacts(task_id)
        for item in files:
            item["url"] = url_for(request, task_id, item["filename"])
        return {"task_id": task_id, "files": files}

    async def download_file(task_id: str, filename: str, request: Request) -> Response:
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
                return _error_response(416, f"Range: outside the file's {opened.size} bytes", "Range",
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

    for method in ("GET", "HEAD"):
        app.add_api_route("/api/v1/results/{task_id}/files/{filename}", download_file, methods=[method],
                          name=f"{method.lower()}_file", tags=["artifacts"],
                          responses={206: {"description": "partial content (Range)"},
                                     304: {"description": "not modified (If-None-Match)"},
                                     404: {"description": "no such file"},
                                     416: {"description": "range not satisfiable"}})

    # -- result envelopes -------------------------------------------------------
    @app.post("/api/v1/results", status_code=201, tags=["results"], openapi_extra=ENVELOPE_OPENAPI)
    async def post_result(request: Request) -> JSONResponse:
        """A worker reports a task's result: ``{task_id, result, worker_id}``."""
        body = await read_body(request, MAX_JSON_BODY_BYTES)
        try:
            envelope = ResultEnvelope.model_validate_json(body)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or "body"
            raise ApiError(422, f"{field}: {err['msg']}", field) from None
        task_id = checked(envelope.task_id, "task_id")
        data = {**envelope.model_dump(mode="json"), "received_at": time.time()}
        await run_in_threadpool(store.save_envelope, task_id, data)
        log.info("result envelope for %s from worker %s", task_id, envelope.worker_id or "?")
        return JSONResponse({"task_id": task_id, "stored": True}, status_code=201)

    @app.get("/api/v1/results/{task_id}", tags=["results"],
             responses={404: {"description": "nothing known about the task"}})
    def get_result(task_id: str, request: Request) -> dict[str, Any]:
        """The result a worker posted, else the Celery result, else ``responses.json`` on disk."""
        checked(task_id, "task_id")
        artifacts = store.list_artifacts(task_id)
        for item in artifacts:
            item["url"] = url_for(request, task_id, item["filename"])
        envelope = store.load_envelope(task_id)
        if envelope is not None:
            return {**envelope, "task_id": task_id, "source": "envelope", "artifacts": artifacts}
        state = task_state(task_id)
        if state["state"] != "PENDING":
            reply = {"task_id": task_id, "source": "celery", "artifacts": artifacts, **state}
            reply.pop("id", None)
            result = reply.get("result")
            if isinstance(result, dict) and "worker_id" in result:
                reply["worker_id"] = result["worker_id"]
            return reply
        responses = store.load_responses(task_id)
        if responses is not None:
            return {"task_id": task_id, "source": "responses.json", "result": responses, "artifacts": artifacts}
        raise ApiError(404, f"task_id: no result for task {task_id!r}", "task_id")

    # -- tasks ------------------------------------------------------------------
    @app.post("/api/v1/tasks", status_code=202, tags=["tasks"], openapi_extra=DOCUMENT_OPENAPI,
              responses={415: {"description": "not JSON or YAML"},
                         422: {"description": "invalid spec; 'field' names the culprit"}})
    async def post_task(request: Request) -> JSONResponse:
        """Submit a task document (JSON or YAML); returns the ids, the queue and warnings."""
        body = await read_body(request, MAX_JSON_BODY_BYTES)
        document = parse_document(body, request.headers.get("content-type"))
        try:
            reply = await run_in_threadpool(submit_document, document)
        except BACKEND_ERRORS as exc:
            raise ApiError(503, f"broker unavailable: {exc}") from None
        log.info("submitted %s to queue %s%s", reply["id"], reply.get("queue"),
                 f" (warnings: {'; '.join(reply['warnings'])})" if reply.get("warnings") else "")
        return JSONResponse(reply, status_code=202)

    @app.get("/api/v1/tasks/{task_id}", tags=["tasks"])
    def get_task(task_id: str) -> dict[str, Any]:
        """State (Celery's; unknown ids are PENDING), progress meta, result or error.

        A pipeline id gives the pipeline's status: ``{id, state, stages: {name: {state,
        task_id, worker_id, progress|result|error}}}`` (see docs/PIPELINES.md).
        """
        from app.redis_client import get_redis

        checked(task_id, "task_id")
        try:
            run = pipeline_run(task_id, get_redis(settings.redis_url))
            if run is not None:
                return dict(_jsonable(run.status()))
        except BACKEND_ERRORS as exc:
            raise ApiError(503, f"result backend unavailable: {exc}") from None
        return task_state(task_id)

    @app.post("/api/v1/tasks/{task_id}/cancel", tags=["tasks"],
              responses={409: {"description": "the task already finished"}})
    def cancel_task(task_id: str) -> dict[str, Any]:
        """Ask the task to stop: queued copies are revoked, a running one stops at its next step."""
        from app.celery import app as celery_app
        from app.redis_client import get_redis
        from tasks.progress import request_cancel

        checked(task_id, "task_id")
        try:
            run = pipeline_run(task_id, get_redis(settings.redis_url))
            if run is not None:  # a pipeline: stop the running stage, later stages never start
                report = run.status()
                if report["state"] in ("SUCCESS", "FAILURE", "CANCELLED"):
                    raise ApiError(409, f"task_id: pipeline {task_id!r} already ended ({report['state']})",
                                   "task_id")
                report = run.cancel()
                log.info("cancel requested for pipeline %s (was %s)", task_id, report["state"])
                return {**dict(_jsonable(report)), "cancel_requested": True}
        except BACKEND_ERRORS as exc:
            raise ApiError(503, f"broker unavailable: {exc}") from None
        state = task_state(task_id)["state"]
        if state in ("SUCCESS", "FAILURE", "REVOKED"):
            raise ApiError(409, f"task_id: task {task_id!r} already ended ({state})", "task_id")
        try:
            request_cancel(task_id, client=get_redis(settings.redis_url))
            celery_app.control.revoke(task_id)
        except BACKEND_ERRORS as exc:
            raise ApiError(503, f"broker unavailable: {exc}") from None
        log.info("cancel requested for %s (was %s)", task_id, state)
        return {"id": task_id, "state": state, "cancel_requested": True}

    # -- workers ------------------------------------------------------------------
    @app.get("/api/v1/workers", tags=["workers"])
    def get_workers() -> dict[str, Any]:
        """Registered workers from their ``worker:<id>`` hashes, ``alive`` from the ``:hb`` key."""
        from app.redis_client import get_redis
        from app.registry import list_workers

        try:
            workers = list_workers(get_redis(settings.redis_url))
        except BACKEND_ERRORS as exc:
            raise ApiError(503, f"Redis unavailable: {exc}") from None
        return {"workers": workers}

    _customize_openapi(app, bearer=bool(settings.orchestrator_token))
    app.add_middleware(Gatekeeper, token=settings.orchestrator_token)
    return app


NAME_SCHEMA = {"type": "string", "pattern": SAFE_NAME_RE.pattern}


def _customize_openapi(app: FastAPI, bearer: bool) -> None:
    """Complete the generated schema: name patterns of path parameters (checked by the
    handlers, so a bad name is 400 and not FastAPI's 422), the task spec's JSON schema,
    and, with a token, the bearer security scheme on every operation but /healthz."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        from tasks.spec import TASK_TYPES, TaskSpec  # imports the Celery app: only when needed

        if app.openapi_schema is None:
            schema = original()
            components = schema.setdefault("components", {})
            for path_item in schema["paths"].values():
                for operation in path_item.values():
                    for parameter in operation.get("parameters", []):
                        if parameter["in"] == "path" and parameter["name"] in ("task_id", "filename"):
                            parameter["schema"] = {**NAME_SCHEMA, "title": parameter["name"]}
            spec_schema = TaskSpec.model_json_schema(ref_template="#/components/schemas/{model}")
            components.setdefault("schemas", {}).update(spec_schema.pop("$defs", {}))
            # Checked by validators in tasks.spec; said here so clients (and fuzzers) know.
            spec_schema["properties"]["taskType"] = {"type": "string", "enum": list(TASK_TYPES)}
            spec_schema["properties"]["tags"]["items"] = {"type": "string", "pattern": TAG_RE.pattern}
            components["schemas"]["TaskSpec"] = spec_schema
            body = schema["paths"]["/api/v1/tasks"]["post"]["requestBody"]["content"]["application/json"]
            body["schema"] = {"type": "object", "required": ["spec"], "additionalProperties": False,
                              "description": "a task document (a bare spec with taskType is accepted too)",
                              "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                             "metadata": {"type": "object"},
                                             "spec": {"$ref": "#/components/schemas/TaskSpec"}}}
            if bearer:
                components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
                schema["security"] = [{"bearer": []}]
                for operation in schema["paths"].get("/healthz", {}).values():
                    operation["security"] = []
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def serve(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, results_dir: Path | str | None = None) -> None:
    """Run the server in the foreground until SIGINT/SIGTERM."""
    import uvicorn

    settings = load_settings()
    configure_logging(settings.log_level)
    tune_allocator_for_streaming()
    app = create_app(results_dir, settings)
    store: ResultStore = app.state.store
    store.root.mkdir(parents=True, exist_ok=True)
    store.sweep_partials()
    log.info("meshq server on http://%s:%d, results in %s, token %s, uploads up to %d bytes",
             host, port, store.root, "required" if settings.orchestrator_token else "not required",
             settings.max_upload_bytes)
    uvicorn.run(app, host=host, port=port, access_log=False, log_config=None,
                log_level=settings.log_level.lower(), timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
                server_header=False)

