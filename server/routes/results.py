"""Result envelopes (``/api/v1/results``): what a worker posts when a task ends, and a task's
result read back (the envelope, else Celery's, else ``responses.json`` on disk)."""

from __future__ import annotations

import errno
import logging
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from app.core.limits import MAX_ENVELOPE_BYTES
from server.openapi import ENVELOPE_OPENAPI, MAX_RUN, ResultEnvelope
from server.result_store import StaleRun, checked
from server.routes.artifacts import url_for
from server.routes.dependencies import SettingsDep, StoreDep
from server.routes.run_checks import verify_run
from server.routes.task_state import task_view
from server.transfer import ApiError, read_body

log = logging.getLogger("meshq.server")

router = APIRouter()


@router.post("/api/v1/results", status_code=201, tags=["results"], openapi_extra=ENVELOPE_OPENAPI)
async def post_result(request: Request, settings: SettingsDep, store: StoreDep) -> JSONResponse:
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
        await run_in_threadpool(verify_run, settings, task_id, run, "run")
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


@router.get("/api/v1/results/{task_id}", tags=["results"],
            responses={404: {"description": "nothing known about the task"}})
def get_result(task_id: str, request: Request, settings: SettingsDep, store: StoreDep) -> dict[str, Any]:
    """The result a worker posted, else the Celery result, else ``responses.json`` on disk."""
    checked(task_id, "task_id")
    artifacts = store.list_artifacts(task_id)
    for item in artifacts:
        item["url"] = url_for(settings, request, task_id, item["filename"])
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
