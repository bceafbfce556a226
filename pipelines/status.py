"""What a whole pipeline is doing, from its stages' task statuses (``tasks.status``).

States of a stage are Celery's (``PENDING, STARTED, PROGRESS, SUCCESS, FAILURE,
REVOKED``) plus ``SKIPPED``: a stage that never ran because an earlier one failed
or the pipeline was cancelled. A pipeline is ``PENDING, RUNNING, SUCCESS,
FAILURE, CANCELLING`` (cancel requested, a stage still stopping) or ``CANCELLED``.
"""

from __future__ import annotations

from typing import Any

from celery import states

from tasks.status import CHORD_ERROR, PROGRESS

SKIPPED = "SKIPPED"
RUNNING_STATES = frozenset({states.RECEIVED, states.STARTED, states.RETRY, PROGRESS})
FINAL_PIPELINE_STATES = frozenset({"SUCCESS", "FAILURE", "CANCELLED"})


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


def _skip(stage: dict[str, Any]) -> None:
    stage["state"] = SKIPPED
    stage["worker_id"] = None
    for key in ("error", "error_type", "error_field", "date_done"):
        stage.pop(key, None)


def mark_skipped(stages: list[dict[str, Any]], depends_on: dict[str, list[str]], cancelled: bool) -> None:
    """Stages (graph nodes, dependencies first) that never ran and never will become SKIPPED.

    A stage runs only when every stage it depends on (in a chain, the one before it)
    succeeded, so one whose dependency failed, was revoked or skipped is SKIPPED —
    whatever Celery stored under its id: the chain's failure, a chord's ``ChordError``,
    a revoke of its id. A node that skipped itself at start (``pipelines.resolver``)
    is SKIPPED too. Once a stage failed or the pipeline was cancelled, stages still
    PENDING never start.
    """
    stopped = {states.FAILURE, states.REVOKED, SKIPPED}
    failed = any(s["state"] == states.FAILURE and s.get("error_type") != CHORD_ERROR for s in stages)
    by_name: dict[str, dict[str, Any]] = {}
    for stage in stages:
        blocked = any(by_name[d]["state"] in stopped for d in depends_on.get(stage["name"], ()) if d in by_name)
        never_ran = stage["state"] in (states.PENDING, SKIPPED) or stage.get("error_type") == CHORD_ERROR
        if blocked and stage["state"] != states.SUCCESS:
            _skip(stage)
        elif never_ran and (failed or cancelled or stage["state"] == SKIPPED
                            or stage.get("error_type") == CHORD_ERROR):
            _skip(stage)
        by_name[stage["name"]] = stage
