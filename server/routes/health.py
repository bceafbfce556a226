"""``/healthz``: liveness, answered without Redis and without a token."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

router = APIRouter()


@router.get("/healthz", tags=["health"])
def healthz() -> dict[str, Any]:
    """Liveness: the process answers (no Redis round trip, no token)."""
    return {"status": "ok"}
