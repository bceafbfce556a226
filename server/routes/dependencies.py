"""What every router takes from the application: its settings and result store (``app.state``,
set by ``create_app``), and the errors that mean Redis or the broker is away."""

from __future__ import annotations

from typing import Annotated

import redis
from fastapi import Depends, Request
from kombu.exceptions import OperationalError

from app.core.settings import Settings
from server.result_store import ResultStore

# Redis or the broker being away: the routes answer 503, never 500.
BACKEND_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, ConnectionError, OSError, TimeoutError,
                                                   OperationalError)


# async: FastAPI would run a plain function in its thread pool, one hop per request for a lookup.
async def server_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def result_store(request: Request) -> ResultStore:
    store: ResultStore = request.app.state.store
    return store


SettingsDep = Annotated[Settings, Depends(server_settings)]
StoreDep = Annotated[ResultStore, Depends(result_store)]
