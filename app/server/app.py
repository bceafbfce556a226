"""The orchestrator HTTP server, ``meshq serve`` (DESIGN §7).

One FastAPI application: the artifact store (streamed uploads and downloads with
checksums and ranges), result envelopes, task submission and state, the worker
registry. ``create_app`` builds it; ``serve`` runs it with uvicorn.

Uploads and downloads stream (``app.server.transfer``); files live in a ``ResultStore``
(``app.server.result_store``): an upload is made current only when complete and
verified, together with its checksum, so a broken one never leaves a partial file under
the real name and a reader never sees one upload's bytes with another's checksum.

Every limit on what a client may send is in ``app.limits``; the connection-level ones
(header bytes, header and body timeouts) are applied by ``app.server.front_guard`` and
the ``Gatekeeper``.

Authentication: with ``ORCHESTRATOR_TOKEN`` set, every path but ``/healthz`` and the web
view (``/ui/``, which has its own sign-in: ``app.server.ui``) — ``/openapi.json`` and
``/docs`` included — needs ``Authorization: Bearer <token>`` (401 without it, 403 with a
wrong one).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import mimetypes
import os
import re
import time
from email.utils import formatdate
from pathlib import Path
from typing import Any
from urllib.parse import quote

import redis
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from kombu.exceptions import OperationalError
from pydantic import ValidationError
from python_multipart.multipart import parse_options_header
from starlette.requests import ClientDisconnect

from app.celery import app as celery_app
from app.errors import LimitExceeded, MeshqError, PipelineError, SpecError, UnknownIdError
from app.limits import MAX_DOCUMENT_BYTES, MAX_ENVELOPE_BYTES, MAX_HEADER_BYTES, check_document
from app.redis_client import get_redis
from app.server.documents import parse_document, pipeline_run, recorded_metadata, submit_document
from app.server.gatekeeper import Gatekeeper, error_response
from app.server.openapi import (
    CHECKSUM_HEADER,
    DOCUMENT_OPENAPI,
    ENVELOPE_OPENAPI,
    ERRORS_OPENAPI,
    RUN_HEADER,
    UPLOAD_OPENAPI,
    ResultEnvelope,
    customize_openapi,
)
from app.server.result_store import BadName, ResultStore, StaleRun, checked
from app.server.transfer import (
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
from app.server.ui import UI_PREFIX, mount_ui
from app.settings import Settings, load_settings
from app.worker.lease import latest_run
from app.worker.registry import list_workers
from pipelines import PipelineRun
from tasks.control import request_cancel
from tasks.status import task_status

log = logging.getLogger("meshq.server")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_RESULTS_DIR = "./results_server"
RESULTS_DIR_ENV = "MESHQ_SERVER_RESULTS_DIR"  # default of --results-dir

SHUTDOWN_GRACE_S = 10
SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}\Z")
RUN_RE = re.compile(r"^[1-9][0-9]{0,8}\Z", re.ASCII)  # X-Meshq-Run: 1 .. MAX_RUN
MAX_RUN = 999_999_999
# Redis or the broker being away: the routes answer 503, never 500.
BACKEND_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, ConnectionError, OSError, TimeoutError,
                                                   OperationalError)


def _jsonable(value: Any) -> Any:
    """``value`` as plain JSON types; a value past ``app.limits`` (a task someone sent around
    the server) is replaced by a line saying why, so a reply never fails on it."""
    if isinstance(value, dict):
        return {key: _jsonable_part(item) for key, item in value.items()}
    return _jsonable_part(value)


def _jsonable_part(value: Any) -> Any:
    try:
        check_document(value)
        return json.loads(json.dumps(value, default=str))
    except (LimitExceeded, RecursionError, ValueError) as exc:
        return f"(not shown: {exc})"


def task_view(task_id: str) -> dict[str, Any]:
    """``{id, ...}`` + the task's status (``tasks.status``); 503 when the backend is away."""
    try:
        status = task_status(celery_app, task_id)
    except BACKEND_ERRORS as exc:
        raise ApiError(503, f"result backend unavailable: {exc}") from None
    return {"id": task_id, **_jsonable(status)}


def require_known(task_id: str, client: redis.Redis) -> None:
    """404 unless ``task_id`` was submitted: PENDING is also what Celery says of an id it never saw."""
    try:
        PipelineRun.find(task_id, client)
    except UnknownIdError:
        raise ApiError(404, f"task_id: no task or pipeline {task_id!r} (unknown, or its records expired)",
                       "task_id") from None


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
        return error_response(exc.status, exc.detail, exc.field, exc.headers)

    @app.exception_handler(BadName)
    async def _bad_name(request: Request, exc: BadName) -> JSONResponse:
        return error_response(400, str(exc), exc.field)

    @app.exception_handler(LimitExceeded)
    async def _limit_exceeded(request: Request, exc: LimitExceeded) -> JSONResponse:
        return error_response(413, str(exc), exc.field)

    @app.exception_handler(SpecError)
    async def _spec_error(request: Request, exc: SpecError) -> JSONResponse:
        return error_response(422, str(exc), exc.field)

    @app.exception_handler(MeshqError)
    async def _meshq_error(request: Request, exc: MeshqError) -> JSONResponse:
        return error_response(400, str(exc))

    def verify_run(task_id: str, run: int, field: str) -> None:
        """409 unless ``run`` is a run the system issued for the task: at most the task's
        latest run in Redis (``app.worker.lease``); 503 while Redis cannot say."""
        try:
            latest = latest_run(get_redis(settings.redis_url), task_id)
        except BACKEND_ERRORS as exc:
            raise ApiError(503, f"Redis unavailable to verify the run: {exc}") from None
        if latest is None or run > latest:
            raise ApiError(409, f"run {run} of task {task_id} was never issued (the task has had "
                                f"{latest or 0} run(s)); nothing stored", field, close=field == RUN_HEADER)

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
                         409: {"description": "X-Meshq-Run is earlier than the task's stored run"},
                         415: {"description": "not multipart/form-data"},
                         422: {"description": "checksum mismatch"}})
    async def upload_file(task_id: str, request: Request) -> Response:
        """Upload one artifact (multipart field ``file``), streamed to disk and renamed
        into place when complete; returns its name, size, sha256 and download URL.
        A worker names its run in ``X-Meshq-Run``: an upload from an earlier run than the
        task's stored one (a late run of a paused worker) is refused with 409."""
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
                await run_in_threadpool(verify_run, task_id, run, RUN_HEADER)
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
        body = await read_body(request, MAX_ENVELOPE_BYTES, "MAX_ENVELOPE_BYTES")
        try:
            envelope = await run_in_threadpool(ResultEnvelope.model_validate_json, body)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or "body"
            raise ApiError(422, f"{field}: {err['msg']}", field) from None
        task_id = checked(envelope.task_id, "task_id")
        data = {**envelope.model_dump(mode="json"), "received_at": time.time()}
        if data.get("run") is not None:
            run = data["run"]
            if not isinstance(run, int) or isinstance(run, bool) or not 1 <= run <= MAX_RUN:
                raise ApiError(422, f"run: must be a positive integer of at most {len(str(MAX_RUN))} digits", "run")
            await run_in_threadpool(verify_run, task_id, run, "run")
        try:
            await run_in_threadpool(store.save_envelope, task_id, data)
        except StaleRun as exc:  # a late run of a paused worker: the later run's result stays
            raise ApiError(409, str(exc), "run") from None
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # save_envelope left nothing behind
                raise ApiError(507, f"result: no space left to store it ({exc.strerror})", "result") from None
            raise
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
        state = task_view(task_id)
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
        body = await read_body(request, MAX_DOCUMENT_BYTES, "MAX_DOCUMENT_BYTES")
        # Off the event loop: a large YAML document takes seconds to parse.
        document = await run_in_threadpool(parse_document, body, request.headers.get("content-type"))
        try:
            reply = await run_in_threadpool(submit_document, document)
        except BACKEND_ERRORS as exc:
            raise ApiError(503, f"broker unavailable: {exc}") from None
        log.info("submitted %s to queue %s%s", reply["id"], reply.get("queue"),
                 f" (warnings: {'; '.join(reply['warnings'])})" if reply.get("warnings") else "")
        return JSONResponse(reply, status_code=202)

    @app.get("/api/v1/tasks/{task_id}", tags=["tasks"],
             responses={404: {"description": "no task or pipeline has this id"}})
    def get_task(task_id: str) -> dict[str, Any]:
        """State (Celery's: PENDING while queued), progress meta, result or error; 404 for
        an id nobody submitted.

        A pipeline id gives the pipeline's status: ``{id, state, stages: {name: {state,
        task_id, worker_id, progress|result|error}}}`` (see docs/PIPELINES.md).
        """
        checked(task_id, "task_id")
        try:
            client = get_redis(settings.redis_url)
            run = pipeline_run(task_id, client)
            if run is not None:
                return dict(_jsonable(run.status()))
            metadata = recorded_metadata(task_id, client)  # a task submitted as a document
            view = task_view(task_id)
            if view["state"] == "PENDING":
                require_known(task_id, client)
        except BACKEND_ERRORS as exc:
            raise ApiError(503, f"result backend unavailable: {exc}") from None
        return {**view, "metadata": _jsonable(metadata)} if metadata else view

    @app.get("/api/v1/pipelines/{pipeline_id}", tags=["tasks"],
             responses={404: {"description": "no pipeline has this id (nor a stage or node with it)"}})
    def get_pipeline(pipeline_id: str) -> dict[str, Any]:
        """A pipeline's status by its id or a stage's (node's) task id (a plain task: a one-stage
        view): ``{id, state, graph?,
        stages: {name: {state, depends_on?, task_id, worker_id, progress|result|error}}}``."""
        checked(pipeline_id, "pipeline_id")
        try:
            report = PipelineRun.find(pipeline_id, get_redis(settings.redis_url)).status()
        except (PipelineError, UnknownIdError):
            raise ApiError(404, f"pipeline_id: no pipeline or task {pipeline_id!r}", "pipeline_id") from None
        except BACKEND_ERRORS as exc:
            raise ApiError(503, f"result backend unavailable: {exc}") from None
        return dict(_jsonable(report))

    @app.post("/api/v1/tasks/{task_id}/cancel", tags=["tasks"],
              responses={404: {"description": "no task or pipeline has this id"},
                         409: {"description": "the task already finished"}})
    def cancel_task(task_id: str) -> dict[str, Any]:
        """Ask the task to stop: queued copies are revoked, a running one stops at its next step."""
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
        state = task_view(task_id)["state"]
        if state == "PENDING":
            try:
                require_known(task_id, get_redis(settings.redis_url))
            except BACKEND_ERRORS as exc:
                raise ApiError(503, f"result backend unavailable: {exc}") from None
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
        try:
            workers = list_workers(get_redis(settings.redis_url))
        except BACKEND_ERRORS as exc:
            raise ApiError(503, f"Redis unavailable: {exc}") from None
        return {"workers": workers}

    mount_ui(app, settings, store)  # the web view, /ui/ (it signs browsers in itself)
    customize_openapi(app, bearer=bool(settings.orchestrator_token))
    app.add_middleware(Gatekeeper, token=settings.orchestrator_token, signs_in_itself=UI_PREFIX)
    return app


def upload_run(request: Request) -> int | None:
    """The uploading worker's run from ``X-Meshq-Run`` (None without the header); 400 unless
    it is a positive integer of at most nine digits."""
    value = request.headers.get(RUN_HEADER)
    if value is None:
        return None
    if not RUN_RE.match(value.strip()):
        raise ApiError(400, f"{RUN_HEADER}: must be a positive integer of at most 9 digits", RUN_HEADER,
                       close=True)
    return int(value.strip())


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def http_protocol() -> Any:
    """uvicorn's HTTP protocol with header limits and timeouts (``app.server.front_guard``);
    plain h11 (bounded by ``h11_max_incomplete_event_size``) where httptools is missing."""
    try:
        from app.server.front_guard import GuardedHttpToolsProtocol
    except ImportError:
        return "h11"
    return GuardedHttpToolsProtocol


def serve(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, results_dir: Path | str | None = None) -> None:
    """Run the server in the foreground until SIGINT/SIGTERM."""
    import uvicorn

    settings = load_settings()
    configure_logging(settings.log_level)
    tune_allocator_for_streaming()
    app = create_app(results_dir, settings)
    store: ResultStore = app.state.store
    store.root.mkdir(parents=True, exist_ok=True)
    store.sweep_dead_uploads()  # partial files of uploads that died with a killed server
    log.info("meshq server on http://%s:%d, results in %s, token %s, uploads up to %d bytes",
             host, port, store.root, "required" if settings.orchestrator_token else "not required",
             settings.max_upload_bytes)
    uvicorn.run(app, host=host, port=port, access_log=False, log_config=None,
                http=http_protocol(), h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                log_level=settings.log_level.lower(), timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
                server_header=False)

