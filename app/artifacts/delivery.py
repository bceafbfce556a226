"""Delivering a task's outputs to an ``http`` destination (DESIGN §7).

For ``output.destination.type: http``: upload every ``final_*_archive`` of the
result and the ``jsonl_export`` file to ``{results_url}/{task_id}/files`` (streamed,
retried) and record ``final_*_archive_url`` / ``jsonl_export.url``; then send the
envelope ``{task_id, result, worker_id}`` to ``{results_url}`` with
``destination.method`` (POST or PUT). Every request carries ``destination.headers``
(a bearer token in ``Authorization`` replaces the orchestrator's) and waits at most
``destination.timeoutSec`` for a reply; header values are never logged.
``results_url`` is ``destination.url`` or ``ORCHESTRATOR_BASE_URL/api/v1/results``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from app.artifacts.auth import token_for
from app.artifacts.retry import RetryPolicy
from app.artifacts.upload import post_json, upload_file
from app.errors import ArtifactError, LeaseLost, SpecError
from app.redaction import redact
from app.settings import get_settings
from app.spec import Destination

log = logging.getLogger(__name__)

RESULTS_PATH = "/api/v1/results"
ARCHIVE_KINDS = ("model", "lora")  # final_model_* and final_lora_* result fields


def results_url(destination: Destination) -> str:
    """Where results go: ``destination.url`` or ``ORCHESTRATOR_BASE_URL/api/v1/results``."""
    if destination.url:
        url = destination.url.rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise SpecError("spec.output.destination.url", f"{redact(url)!r} is not an http(s) URL")
        return url
    base = get_settings().orchestrator_base_url
    if not base:
        raise SpecError("spec.output.destination.url",
                        "required for an http destination when ORCHESTRATOR_BASE_URL is not set")
    return base + RESULTS_PATH


def deliver_result(task_id: str, destination: Destination, result: dict[str, Any],
                   policy: RetryPolicy | None = None, run: int | None = None) -> dict[str, Any]:
    """Upload the result's archives and POST its envelope; return the result with the URLs.

    A failure after the last retry raises ``ArtifactError`` naming the URL; the
    local archives stay where they are. Uploads and the envelope carry ``run``: the
    server answers 409 when it holds a later run's outputs, and this run then stops
    (``LeaseLost``).
    """
    if destination.type != "http":
        return result
    base = results_url(destination)
    token = token_for(base)  # never hand the orchestrator's token to another host
    result = dict(result)

    def upload(path: str, sha256: str | None) -> dict[str, Any]:
        try:
            return upload_file(f"{base}/{task_id}/files", path, sha256=sha256, token=token,
                               headers=destination.headers, timeout_s=destination.timeoutSec, policy=policy,
                               run=run)
        except ArtifactError as exc:
            if exc.status == 409 and run is not None:
                raise LeaseLost(task_id, "a later run (the server holds its uploads)") from None
            raise

    for kind in ARCHIVE_KINDS:
        archive = result.get(f"final_{kind}_archive")
        if not archive:
            continue
        reply = upload(archive, result.get(f"final_{kind}_archive_sha256"))
        expected = result.get(f"final_{kind}_archive_sha256")
        if expected and reply.get("sha256") and reply["sha256"] != expected:
            raise ArtifactError(f"upload of {archive} to {redact(base)}: the server stored sha256 "
                                f"{reply['sha256']}, expected {expected}", url=redact(base))
        url = reply.get("url") or f"{base}/{task_id}/files/{Path(archive).name}"
        result[f"final_{kind}_archive_url"] = url
        log.info("uploaded %s (%s bytes) to %s", Path(archive).name, result.get(f"final_{kind}_archive_bytes"),
                 redact(url))
    export = result.get("jsonl_export")
    if isinstance(export, dict) and export.get("path"):
        reply = upload(export["path"], export.get("sha256"))
        result["jsonl_export"] = {**export, "url": reply.get("url") or
                                  f"{base}/{task_id}/files/{Path(export['path']).name}"}
        log.info("uploaded %s (%s rows) to %s", Path(export["path"]).name, export.get("rows"),
                 redact(result["jsonl_export"]["url"]))
    # ``run`` keys the envelope: the server keeps a later run's result over an earlier one's
    # (409 for the earlier), so a late run of a paused worker never replaces the accepted one.
    envelope = {"task_id": task_id, "result": result, "worker_id": result.get("worker_id"),
                **({"run": run} if run is not None else {})}
    try:
        post_json(base, envelope, token=token, headers=destination.headers, timeout_s=destination.timeoutSec,
                  policy=policy, method=destination.method)
    except ArtifactError as exc:
        if exc.status == 409 and run is not None:
            raise LeaseLost(task_id, "a later run (the server holds its result)") from None
        raise
    return result
