"""The run a worker names (``X-Meshq-Run`` on an upload, ``run`` in an envelope): well formed,
and one the system issued for the task."""

from __future__ import annotations

import re

from fastapi import Request

from app.core.redis_client import get_redis
from app.core.settings import Settings
from app.worker.lease import latest_run
from server.openapi import RUN_HEADER
from server.routes.dependencies import BACKEND_ERRORS
from server.transfer import ApiError

RUN_RE = re.compile(r"^[1-9][0-9]{0,8}\Z", re.ASCII)  # X-Meshq-Run: 1 .. MAX_RUN


def verify_run(settings: Settings, task_id: str, run: int, field: str) -> None:
    """409 unless ``run`` is a run the system issued for the task: at most the task's
    latest run in Redis (``app.worker.lease``); 503 while Redis cannot say."""
    try:
        latest = latest_run(get_redis(settings.redis_url), task_id)
    except BACKEND_ERRORS as exc:
        raise ApiError(503, f"Redis unavailable to verify the run: {exc}") from None
    if latest is None or run > latest:
        raise ApiError(409, f"run {run} of task {task_id} was never issued (the task has had "
                            f"{latest or 0} run(s)); nothing stored", field, close=field == RUN_HEADER)


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
