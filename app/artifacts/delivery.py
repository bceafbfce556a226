"""Delivering a task's outputs to an ``http`` destination (DESIGN §7).

For ``output.destination.type: http``: upload every ``final_*_archive`` of the
result and the ``jsonl_export`` file to ``{results_url}/{task_id}/files`` (streamed,
retried) and record ``final_*_archive_url`` / ``jsonl_export.url``; then send the
envelope ``{task_id, result, worker_id}`` to ``{results_url}`` with
``destination.method`` (POST or PUT). Every request carries ``destination.headers``
(a bearer token in ``Authorization`` replaces the orchestrator's) and waits at most
``destination.timeoutSec`` for a reply; header values are never logged.
``results_url`` is ``destination.url`` or ``ORCHESTRATOR_BASE_URL/api/v1/results``.

A delivery that still fails after its retries (``MESHQ_UPLOAD_RETRIES``) leaves the task's
outputs where they are and a record of where they were going
(``<task_dir>/.meshq/delivery.json``: URL, method, timeout and run; header values are
never written): ``meshq deliver <task_id>`` on the worker's host delivers them from there
(``redeliver``) without running the task again.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from app.artifacts.auth import token_for
from app.artifacts.manifest import MANIFEST_NAME, RESPONSES_NAME, write_json_atomic, write_task_outputs
from app.artifacts.retry import RetryPolicy
from app.artifacts.run_record import RECORD_DIR, fenced
from app.artifacts.upload import post_json, upload_file
from app.core.errors import ArtifactError, RunRefused, SpecError
from app.core.redaction import redact
from app.core.settings import get_settings
from app.core.task_spec import Destination

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
    server answers 409 when it holds a later run's outputs or cannot verify the run
    (``RunRefused``: the caller stops the run, or fails the task if no later run started).
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
                raise RunRefused(task_id, f"upload of run {run}", str(exc)) from None
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
            raise RunRefused(task_id, f"result of run {run}", str(exc)) from None
        raise
    return result


DELIVERY_RECORD = "delivery.json"  # under the task directory's RECORD_DIR: a delivery to retry


def undelivered(task_id: str, destination: Destination, task_dir: Path, run: int | None, worker_id: str,
                error: ArtifactError) -> ArtifactError:
    """Record a delivery that failed for good (``redeliver`` retries it) and return the
    error to end the task with: ``error`` plus how to deliver without running it again."""
    record = {"task_id": task_id, "url": results_url(destination), "method": destination.method,
              "timeoutSec": destination.timeoutSec, "run": run,
              "header_names": sorted(destination.headers)}  # names only: values may be secrets
    hint = (f"; the task's outputs are kept in {task_dir} on worker {worker_id}: run `meshq deliver {task_id}` "
            "on that host (same RESULTS_DIR, ORCHESTRATOR_BASE_URL and ORCHESTRATOR_TOKEN) to deliver them "
            "without running the task again")
    try:
        (task_dir / RECORD_DIR).mkdir(exist_ok=True)
        write_json_atomic(os.fspath(task_dir / RECORD_DIR / DELIVERY_RECORD), record)
    except OSError as exc:
        hint = f"; its outputs are kept in {task_dir} on worker {worker_id}, but the retry record was not written ({exc})"
    return ArtifactError(f"{error}{hint}", url=error.url, path=str(task_dir), status=error.status)


def redeliver(task_dir: Path, headers: dict[str, str] | None = None,
              policy: RetryPolicy | None = None) -> dict[str, Any]:
    """Deliver the outputs of a finished task whose delivery failed (``meshq deliver``):
    its archives and ``responses.json`` as they are on disk, to where the task was sending
    them, as the run that made them; ``responses.json`` then gets the URLs. Returns the
    delivered result. ``headers``: the destination's headers again (never recorded)."""
    task_id = task_dir.name
    try:
        record = json.loads((task_dir / RECORD_DIR / DELIVERY_RECORD).read_text(encoding="utf-8"))
        result = json.loads((task_dir / RESPONSES_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ArtifactError(f"{task_dir}: no failed delivery recorded for task {task_id} ({exc.filename} "
                            "is missing): only a task that ended with a failed delivery can be delivered again",
                            path=str(task_dir)) from None
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{task_dir}: cannot read the task's outputs: {exc}", path=str(task_dir)) from None
    if not isinstance(record, dict) or not isinstance(result, dict) or record.get("task_id") != task_id:
        raise ArtifactError(f"{task_dir}: the delivery record does not belong to task {task_id}", path=str(task_dir))
    _check_inside(task_dir, result)
    missing = sorted(set(record.get("header_names") or []) - set(headers or {}))
    if missing:
        log.warning("the task's destination had header(s) %s; they are not recorded: pass them with --header",
                    ", ".join(missing))
    run = record.get("run") if isinstance(record.get("run"), int) else None
    destination = Destination(type="http", url=record["url"], method=record.get("method", "POST"),
                              timeoutSec=record.get("timeoutSec", 300.0), headers=headers or {})
    delivered = deliver_result(task_id, destination, result, policy=policy, run=run)
    with fenced(task_dir, run):  # never over a later run's outputs
        try:
            manifest = json.loads((task_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            manifest = None
        reuse = manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), list) else None
        write_task_outputs(task_dir, delivered, reuse=reuse)  # the archives are not hashed again
    (task_dir / RECORD_DIR / DELIVERY_RECORD).unlink(missing_ok=True)
    return delivered


def _check_inside(task_dir: Path, result: dict[str, Any]) -> None:
    """Every file ``redeliver`` would upload is one of the task's own outputs: inside
    ``task_dir`` once symbolic links are followed."""
    export = result.get("jsonl_export")
    paths = [result.get(f"final_{kind}_archive") for kind in ARCHIVE_KINDS]
    paths.append(export.get("path") if isinstance(export, dict) else None)
    root = task_dir.resolve()
    for path in paths:
        if path and not Path(str(path)).resolve().is_relative_to(root):
            raise ArtifactError(f"{task_dir}: responses.json names {path}, outside the task's directory; "
                                "not uploaded", path=str(path))
