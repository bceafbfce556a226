"""The web view of pipelines and the fleet under ``/ui/`` (docs/MONITORING.md, "Web view").

``routes`` (the pages, sign-in, Cancel, a node's files), ``views`` (what each page
shows, read from Redis and the result store), ``drawing`` (the geometry of the SVG
graph and loss curves), ``session`` (the sign-in cookie and cross-site checks);
``templates/`` (Jinja2, every value escaped) and ``static/`` (one stylesheet, one
small script). No outside request: every asset is served from here.
"""

from __future__ import annotations

from fastapi import FastAPI

from app.core.settings import Settings
from server.result_store import ResultStore
from server.ui.routes import static_files, ui_router
from server.ui.session import UI_PREFIX

__all__ = ["UI_PREFIX", "mount_ui"]


def mount_ui(app: FastAPI, settings: Settings, store: ResultStore) -> None:
    """Add the pages and their static files to the orchestrator ``app``."""
    app.include_router(ui_router(settings, store))
    app.mount(f"{UI_PREFIX}/static", static_files(), name="ui-static")
