"""A task's state as the routes answer it: Celery's status as plain JSON, 404 for an id
nobody submitted."""

from __future__ import annotations

import json
from typing import Any

import redis

from app.celery import app as celery_app
from app.core.errors import LimitExceeded, UnknownIdError
from app.core.limits import check_document
from pipelines import PipelineRun
from server.routes.dependencies import BACKEND_ERRORS
from server.transfer import ApiError
from tasks.status import task_status


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types; a value past ``app.core.limits`` (a task someone sent around
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
    return {"id": task_id, **jsonable(status)}


def require_known(task_id: str, client: redis.Redis) -> None:
    """404 unless ``task_id`` was submitted: PENDING is also what Celery says of an id it never saw."""
    try:
        PipelineRun.find(task_id, client)
    except UnknownIdError:
        raise ApiError(404, f"task_id: no task or pipeline {task_id!r} (unknown, or its records expired)",
                       "task_id") from None
