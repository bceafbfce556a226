"""The web view's routes under ``/ui/`` (docs/MONITORING.md, "Web view").

``/ui/`` lists recent pipelines, ``/ui/pipelines/{id}`` draws one (a pipeline id or
any task id), ``/ui/workers`` shows the fleet. Each page asked with ``?fragment=1``
answers only its live part: the page's script polls that and swaps it in, so a page
updates without a reload and the server keeps nothing per browser.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

import jinja2
import redis
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from app.core.errors import PipelineError, UnknownIdError
from app.core.limits import MAX_DOCUMENT_BYTES
from app.core.redis_client import get_redis
from app.core.settings import Settings
from pipelines import PipelineRun
from pipelines.run import cancel_any
from server.result_store import BadName, ResultStore, checked
from server.routes.dependencies import BACKEND_ERRORS
from server.transfer import FileStream
from server.ui import drawing, views
from server.ui.session import COOKIE_MAX_AGE_S, COOKIE_NAME, UI_PREFIX, UiSession

log = logging.getLogger("meshq.server.ui")
HERE = Path(__file__).parent
POLL_INTERVAL_MS = 1500
STATES = ("PENDING", "RUNNING", "SUCCESS", "FAILURE", "CANCELLING", "CANCELLED")
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,199}\Z")
# No script, style or picture from anywhere but this server; no inline script at all;
# the pages never appear in another site's frame.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin", "Cache-Control": "no-store",
    "X-Frame-Options": "DENY"}
# What a node's file may be shown as in the browser; anything else is a download, never a page.
INLINE_TYPES = {".json": "application/json", ".jsonl": "text/plain; charset=utf-8",
                ".txt": "text/plain; charset=utf-8", ".log": "text/plain; charset=utf-8"}


def ui_router(settings: Settings, store: ResultStore) -> APIRouter:
    """The web view over the server's Redis and result store."""
    session = UiSession(settings.orchestrator_token)
    # Every value is escaped (autoescape on for every template, whatever its name).
    templates = Jinja2Templates(env=jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                                                       autoescape=True))
    templates.env.globals.update(prefix=UI_PREFIX, poll_ms=POLL_INTERVAL_MS, drawing=drawing)
    router = APIRouter(prefix=UI_PREFIX, include_in_schema=False)

    def page(request: Request, name: str, context: dict[str, Any], status: int = 200) -> HTMLResponse:
        # Only a page's live part for the poll; the sign-in form and messages are always whole.
        fragment = request.query_params.get("fragment") == "1" and name not in ("login.html", "message.html")
        context = {"fragment": fragment, "form_token": session.form_token(),
                   "signed_in": session.required, **context}
        return templates.TemplateResponse(request, name, context, status_code=status, headers=SECURITY_HEADERS)

    def login_form(request: Request, message: str = "", status: int = 401) -> HTMLResponse:
        return page(request, "login.html", {"message": message, "title": "Sign in"}, status)

    def unavailable(request: Request, exc: BaseException) -> HTMLResponse:
        return page(request, "message.html", {"title": "Unavailable",
                                              "message": f"Redis is unavailable: {exc}"}, 503)

    def redis_client() -> redis.Redis:
        return get_redis(settings.redis_url)

    @router.get("/login")
    def get_login(request: Request) -> Response:
        if session.signed_in(request) and session.required:
            return RedirectResponse(f"{UI_PREFIX}/", 303)
        return login_form(request, status=200 if not session.required else 401)

    @router.post("/login")
    async def post_login(request: Request) -> Response:
        fields = await form_fields(request)
        if not session.same_site(request, fields.get("form_token", "")):
            return login_form(request, "This form has expired or came from another site; sign in again.", 403)
        if not session.required:
            return RedirectResponse(f"{UI_PREFIX}/", 303)
        if not session.token_matches(fields.get("token", "")):
            client = request.client.host if request.client else "-"
            log.warning("web view: sign-in with a wrong token from %s", client)
            return login_form(request, "That token is not valid.", 403)
        reply = RedirectResponse(f"{UI_PREFIX}/", 303)
        reply.set_cookie(COOKIE_NAME, session.cookie_value(), max_age=COOKIE_MAX_AGE_S, path=UI_PREFIX,
                         httponly=True, samesite="strict", secure=request.url.scheme == "https")
        return reply

    @router.post("/logout")
    async def post_logout(request: Request) -> Response:
        fields = await form_fields(request)
        reply = RedirectResponse(f"{UI_PREFIX}/login", 303)
        if session.same_site(request, fields.get("form_token", "")):
            reply.delete_cookie(COOKIE_NAME, path=UI_PREFIX, httponly=True, samesite="strict")
        return reply

    @router.get("/")
    def pipelines_page(request: Request, state: str = "", page_number: int = 0) -> Response:
        if not session.signed_in(request):
            return login_form(request)
        wanted = state if state in STATES else None
        page_number = max(0, min(page_number, 10_000))
        try:
            rows, more = views.recent_runs(redis_client(), wanted, page_number)
        except BACKEND_ERRORS as exc:
            return unavailable(request, exc)

        def link(number: int) -> str:
            query = {**({"state": wanted} if wanted else {}), **({"page_number": number} if number else {})}
            return f"{UI_PREFIX}/" + (f"?{urlencode(query)}" if query else "")

        return page(request, "pipelines.html", {
            "title": "Pipelines", "rows": rows, "states": STATES, "state": wanted, "page_number": page_number,
            "previous": link(page_number - 1) if page_number else None, "next": link(page_number + 1) if more else None})

    @router.get("/open")
    def open_by_id(request: Request, id: str = "") -> Response:
        if not session.signed_in(request):
            return login_form(request)
        return RedirectResponse(f"{UI_PREFIX}/pipelines/{id.strip()}" if ID_RE.match(id.strip()) else f"{UI_PREFIX}/",
                                303)

    @router.get("/pipelines/{some_id}")
    def pipeline_page(request: Request, some_id: str) -> Response:
        if not session.signed_in(request):
            return login_form(request)
        if not ID_RE.match(some_id):
            return page(request, "message.html", {"title": "Not found", "message": "Not a pipeline or task id."}, 404)
        try:
            found = PipelineRun.find(some_id, redis_client())
            report = found.status()
        except (PipelineError, UnknownIdError):
            return page(request, "message.html", {"title": "Not found", "message":
                        f"No pipeline or task {some_id} (unknown, or its records expired)."}, 404)
        except BACKEND_ERRORS as exc:
            return unavailable(request, exc)
        run = views.pipeline_view(report, found.depends_on(), store)
        return page(request, "pipeline.html", {"title": run["name"] or run["id"], "run": run,
                                               "picture": drawing.graph_picture(run["nodes"])})

    @router.post("/pipelines/{some_id}/cancel")
    async def cancel(request: Request, some_id: str) -> Response:
        if not session.signed_in(request):
            return login_form(request)
        fields = await form_fields(request)
        if not session.same_site(request, fields.get("form_token", "")):
            return page(request, "message.html", {"title": "Refused", "message":
                        "Cancel refused: the form has expired or came from another site. Reload the page."}, 403)
        if not ID_RE.match(some_id):
            return page(request, "message.html", {"title": "Not found", "message": "Not a pipeline or task id."}, 404)
        try:
            await run_in_threadpool(cancel_any, some_id, redis_client())
        except (PipelineError, UnknownIdError):
            return page(request, "message.html", {"title": "Not found", "message": f"No pipeline or task {some_id}."},
                        404)
        except BACKEND_ERRORS as exc:
            return unavailable(request, exc)
        return RedirectResponse(f"{UI_PREFIX}/pipelines/{some_id}", 303)

    @router.get("/workers")
    def workers_page(request: Request) -> Response:
        if not session.signed_in(request):
            return login_form(request)
        try:
            workers = views.workers_view(redis_client())
        except BACKEND_ERRORS as exc:
            return unavailable(request, exc)
        return page(request, "workers.html", {"title": "Workers", "workers": workers,
                                              "alive": sum(w["alive"] for w in workers)})

    @router.get("/files/{task_id}/{filename}")
    async def node_file(request: Request, task_id: str, filename: str) -> Response:
        """A node's file (``responses.json``, ``manifest.json``, an upload) for a signed-in browser.
        Only JSON and plain text are shown inline; everything else downloads, and the
        answer is sandboxed so an uploaded HTML file can never run as one of our pages."""
        if not session.signed_in(request):
            return login_form(request)
        try:
            checked(task_id, "task_id")
            checked(filename, "filename")
        except BadName:
            return page(request, "message.html", {"title": "Not found", "message": "No such file."}, 404)
        opened = await run_in_threadpool(store.open_file, task_id, filename)
        if opened is None:
            return page(request, "message.html", {"title": "Not found", "message": "No such file."}, 404)
        media = INLINE_TYPES.get(Path(filename).suffix.lower())
        headers = {"Content-Length": str(opened.size), "Content-Type": media or "application/octet-stream",
                   "Content-Security-Policy": "sandbox; default-src 'none'", "X-Content-Type-Options": "nosniff",
                   "Cache-Control": "no-store"}
        if media is None:
            headers["Content-Disposition"] = "attachment"
        return FileStream(opened, 0, opened.size, 200, headers, lambda sent, complete: None)

    return router


async def form_fields(request: Request) -> dict[str, str]:
    """The fields of a small urlencoded form (sign-in, Cancel); anything else reads as empty."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_DOCUMENT_BYTES:
            return {}
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        return {}
    parsed = parse_qs(body.decode("utf-8", "replace"), max_num_fields=10)
    return {key: values[0] for key, values in parsed.items() if values}


def static_files() -> StaticFiles:
    return StaticFiles(directory=HERE / "static")
