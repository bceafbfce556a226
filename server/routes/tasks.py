"""Tasks and pipelines (``/api/v1/tasks``, ``/api/v1/pipelines``): submission of a task
document, a task's or pipeline's state, cancel."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from app.celery import app as celery_app
from app.core.errors import PipelineError, UnknownIdError
from app.core.limits import MAX_DOCUMENT_BYTES
from app.core.redis_client import get_redis
from pipelines import PipelineRun
from server.documents import parse_document, pipeline_run, recorded_metadata, submit_document
from server.openapi import DOCUMENT_OPENAPI
from server.result_store import checked
from server.routes.dependencies import BACKEND_ERRORS, SettingsDep
from server.routes.task_state import jsonable, require_known, task_view
from server.transfer import ApiError, read_body
from tasks.control import request_cancel

log = logging.getLogger("meshq.server")

router = APIRouter()


@router.post("/api/v1/tasks", status_code=202, tags=["tasks"], openapi_extra=DOCUMENT_OPENAPI,
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


@router.get("/api/v1/tasks/{task_id}", tags=["tasks"],
            responses={404: {"description": "no task or pipeline has this id"}})
def get_task(task_id: str, settings: SettingsDep) -> dict[str, Any]:
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
            return dict(jsonable(run.status()))
        metadata = recorded_metadata(task_id, client)  # a task submitted as a document
        view = task_view(task_id)
        if view["state"] == "PENDING":
            require_known(task_id, client)
    except BACKEND_ERRORS as exc:
        raise ApiError(503, f"result backend unavailable: {exc}") from None
    return {**view, "metadata": jsonable(metadata)} if metadata else view


@router.get("/api/v1/pipelines/{pipeline_id}", tags=["tasks"],
            responses={404: {"description": "no pipeline has this id (nor a stage or node with it)"}})
def get_pipeline(pipeline_id: str, settings: SettingsDep) -> dict[str, Any]:
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
    return dict(jsonable(report))


@router.post("/api/v1/tasks/{task_id}/cancel", tags=["tasks"],
             responses={404: {"description": "no task or pipeline has this id"},
                        409: {"description": "the task already finished"}})
def cancel_task(task_id: str, settings: SettingsDep) -> dict[str, Any]:
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
            return {**dict(jsonable(report)), "cancel_requested": True}
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
