"""What a stage (one Celery task) and a whole pipeline are doing, from the result backend.

States of a stage are Celery's (``PENDING, STARTED, PROGRESS, SUCCESS, FAILURE,
REVOKED``) plus ``SKIPPED``: a stage that never ran because an earlier one failed
or the pipeline was cancelled. A pipeline is ``PENDING, RUNNING, SUCCESS,
FAILURE, CANCELLING`` (cancel requested, a stage still stopping) or ``CANCELLED``.
"""

from __future__ import annotations

from typing import Any

from celery import states

PROGRESS = "PROGRESS"
SKIPPED = "SKIPPED"
RUNNING_STATES = frozenset({states.RECEIVED, states.STARTED, states.RETRY, PROGRESS})
STOPPED_STATES = frozenset({states.FAILURE, states.REVOKED})
FINAL_PIPELINE_STATES = frozenset({"SUCCESS", "FAILURE", "CANCELLED"})
_META_ONLY = ("worker_id", "taskType")


def worker_from_hostname(hostname: Any) -> str | None:
    """``meshq-<WORKER_ID>@host`` (the node name the worker shim sets) → ``WORKER_ID``."""
    if not isinstance(hostname, str) or not hostname:
        return None
    node = hostname.split("@", 1)[0]
    return node[len("meshq-"):] if node.startswith("meshq-") else node


def error_text(app: Any, result: Any) -> str:
    """``ExcType: message`` for the exception a failed or revoked task stored."""
    if isinstance(result, dict) and "exc_type" in result:
        try:
            exc = app.backend.exception_to_python(result)
        except Exception:
            return f"{result['exc_type']}: {result.get('exc_message')}"
        return f"{type(exc).__name__}: {exc}"
    if isinstance(result, BaseException):
        return f"{type(result).__name__}: {result}"
    return str(result)


def task_status(app: Any, task_id: str) -> dict[str, Any]:
    """``{state, task_id, worker_id, progress?, result?, error?, date_done?}`` of one task."""
    meta = app.backend.get_task_meta(task_id)
    state = str(meta.get("status") or states.PENDING)
    result = meta.get("result")
    info: dict[str, Any] = {"state": state, "task_id": task_id, "worker_id": None}
    worker_id = None
    if state == states.SUCCESS:
        info["result"] = result
        worker_id = result.get("worker_id") if isinstance(result, dict) else None
    elif state in STOPPED_STATES:
        info["error"] = error_text(app, result)
    elif state == PROGRESS and isinstance(result, dict):
        info["progress"] = {k: v for k, v in result.items() if k not in _META_ONLY}
        worker_id = result.get("worker_id")
    elif state == states.STARTED and isinstance(result, dict):
        worker_id = worker_from_hostname(result.get("hostname"))
    info["worker_id"] = worker_id or worker_from_hostname(meta.get("worker"))
    if meta.get("date_done"):
        info["date_done"] = str(meta["date_done"])
    return info


def pipeline_state(stage_states: list[str], cancelled: bool) -> str:
    if stage_states and all(s == states.SUCCESS for s in stage_states):
        return "SUCCESS"
    if states.FAILURE in stage_states:
        return "FAILURE"
    if cancelled or states.REVOKED in stage_states:
        return "CANCELLING" if any(s in RUNNING_STATES for s in stage_states) else "CANCELLED"
    if any(s != states.PENDING for s in stage_states):
        return "RUNNING"
    return "PENDING"


def mark_skipped(stages: list[dict[str, Any]], cancelled: bool) -> None:
    """Stages that cannot run any more become SKIPPED.

    That is every stage after the first failed or revoked one (Celery also stores the
    failure under the ids of the chain's remaining tasks, though they never ran),
    and stages still PENDING in a cancelled pipeline.
    """
    stopped = False
    for stage in stages:
        if stopped or (cancelled and stage["state"] == states.PENDING):
            stage["state"] = SKIPPED
            stage["worker_id"] = None
            stage.pop("error", None)
            stage.pop("date_done", None)
        elif stage["state"] in STOPPED_STATES:
            stopped = True
