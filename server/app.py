"""The orchestrator HTTP server, ``meshq serve`` (DESIGN §7).

One FastAPI application: the artifact store (streamed uploads and downloads with
checksums and ranges), result envelopes, task submission and state, the worker
registry. ``create_app`` builds it; ``serve`` runs it with uvicorn.

Uploads and downloads stream (``server.transfer``); files live in a ``ResultStore``
(``server.result_store``): an upload is made current only when complete and
verified, together with its checksum, so a broken one never leaves a partial file under
the real name and a reader never sees one upload's bytes with another's checksum.

Every limit on what a client may send is in ``app.core.limits``; the connection-level ones
(header bytes, header and body timeouts) are applied by ``server.front_guard`` and
the ``Gatekeeper``.

Authentication: with ``ORCHESTRATOR_TOKEN`` set, every path but ``/healthz`` and the web
view (``/ui/``, which has its own sign-in: ``server.ui``) — ``/openapi.json`` and
``/docs`` included — needs ``Authorization: Bearer <token>`` (401 without it, 403 with a
wrong one).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from app.core.errors import LimitExceeded, MeshqError, SpecError
from app.core.limits import MAX_HEADER_BYTES
from app.core.settings import Settings, load_settings
from server.gatekeeper import Gatekeeper, error_response
from server.openapi import ERRORS_OPENAPI, customize_openapi
from server.result_store import BadName, ResultStore
from server.routes import ROUTERS
from server.transfer import ApiError, tune_allocator_for_streaming
from server.ui import UI_PREFIX, mount_ui

log = logging.getLogger("meshq.server")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_RESULTS_DIR = "./results_server"
RESULTS_DIR_ENV = "MESHQ_SERVER_RESULTS_DIR"  # default of --results-dir

SHUTDOWN_GRACE_S = 10


# -- errors as answers: {detail, field} with the status each kind of error means -------------
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.detail, exc.field, exc.headers)


async def _bad_name(request: Request, exc: BadName) -> JSONResponse:
    return error_response(400, str(exc), exc.field)


async def _limit_exceeded(request: Request, exc: LimitExceeded) -> JSONResponse:
    return error_response(413, str(exc), exc.field)


async def _spec_error(request: Request, exc: SpecError) -> JSONResponse:
    return error_response(422, str(exc), exc.field)


async def _meshq_error(request: Request, exc: MeshqError) -> JSONResponse:
    return error_response(400, str(exc))


# -- the application ------------------------------------------------------------------------
def create_app(results_dir: Path | str | None = None, settings: Settings | None = None) -> FastAPI:
    """The orchestrator API over ``results_dir`` (default ``$MESHQ_SERVER_RESULTS_DIR``
    or ``./results_server``), configured by ``settings`` (default: the environment).
    The routers (``server.routes``) read both from ``app.state``."""
    settings = settings or load_settings()
    store = ResultStore(results_dir or os.environ.get(RESULTS_DIR_ENV) or DEFAULT_RESULTS_DIR)
    app = FastAPI(title="meshq orchestrator", version="1", description=__doc__,
                  responses=ERRORS_OPENAPI)
    app.state.store = store
    app.state.settings = settings
    app.exception_handler(ApiError)(_api_error)
    app.exception_handler(BadName)(_bad_name)
    app.exception_handler(LimitExceeded)(_limit_exceeded)
    app.exception_handler(SpecError)(_spec_error)
    app.exception_handler(MeshqError)(_meshq_error)
    for router in ROUTERS:
        app.include_router(router)
    mount_ui(app, settings, store)  # the web view, /ui/ (it signs browsers in itself)
    customize_openapi(app, bearer=bool(settings.orchestrator_token))
    app.add_middleware(Gatekeeper, token=settings.orchestrator_token, signs_in_itself=UI_PREFIX)
    return app


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def http_protocol() -> Any:
    """uvicorn's HTTP protocol with header limits and timeouts (``server.front_guard``);
    plain h11 (bounded by ``h11_max_incomplete_event_size``) where httptools is missing."""
    try:
        from server.front_guard import GuardedHttpToolsProtocol
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

