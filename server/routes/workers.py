"""The worker registry (``/api/v1/workers``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.core.redis_client import get_redis
from app.worker.registry import list_workers
from server.routes.dependencies import BACKEND_ERRORS, SettingsDep
from server.transfer import ApiError

router = APIRouter()


@router.get("/api/v1/workers", tags=["workers"])
def get_workers(settings: SettingsDep) -> dict[str, Any]:
    """Registered workers from their ``worker:<id>`` hashes, ``alive`` from the ``:hb`` key."""
    try:
        workers = list_workers(get_redis(settings.redis_url))
    except BACKEND_ERRORS as exc:
        raise ApiError(503, f"Redis unavailable: {exc}") from None
    return {"workers": workers}
