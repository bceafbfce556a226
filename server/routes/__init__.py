"""The orchestrator's HTTP API, one ``APIRouter`` per resource; ``server.app.create_app`` wires them.

``health`` (``/healthz``), ``artifacts`` (a task's files: streamed uploads and downloads),
``results`` (the result envelopes workers post), ``tasks`` (submission, state, pipelines,
cancel), ``workers`` (the registry). What they share: ``dependencies`` (the application's
settings and store, the errors that mean the backend is away), ``run_checks`` (the run a
worker names) and ``task_state`` (a task's state as the routes answer it).
"""

from __future__ import annotations

from fastapi import APIRouter

from server.routes import artifacts, health, results, tasks, workers

# In the order of the OpenAPI schema's paths.
ROUTERS: tuple[APIRouter, ...] = (health.router, artifacts.router, results.router, tasks.router, workers.router)
