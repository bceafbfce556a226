"""What a whole pipeline is doing, from its stages' task statuses (``tasks.status``).

States of a stage are Celery's (``PENDING, STARTED, PROGRESS, SUCCESS, FAILURE,
REVOKED``) plus ``SKIPPED``: a stage that never ran because an earlier one failed
or the pipeline was cancelled. A pipeline is ``PENDING, RUNNING, SUCCESS,
FAILURE, CANCELLING`` (cancel requested, a stage still stopping) or ``CANCELLED``.
"""

from __future__ import annotations

from typing import Any

from celery import states

from tasks.status import CHORD_ERROR, PROGRESS, STOPPED_STATES

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
            for key in ("error", "error_type", "error_field"):
                stage.pop(key, None)
            stage.pop("date_done", None)
        elif stage["state"] in STOPPED_STATES:
            stopped = True


def mark_skipped_nodes(nodes: list[dict[str, Any]], cancelled: bool) -> None:
    """Graph nodes (dependencies first) that never ran and never will become SKIPPED.

    A node runs only when every node it depends on succeeded, so one whose dependency
    failed, was revoked or skipped is SKIPPED — also when Celery stored the chord's
    ``ChordError`` under its id, or a node skipped itself at start (``pipelines.resolver``).
    Once a node failed or the pipeline was cancelled, nodes still PENDING never start.
    """
    stopped = {states.FAILURE, states.REVOKED, SKIPPED}
    failed = any(n["state"] == states.FAILURE and n.get("error_type") != CHORD_ERROR for n in nodes)
    by_name: dict[str, dict[str, Any]] = {}
    for node in nodes:
        blocked = any(by_name[d]["state"] in stopped for d in node.get("depends_on") or [] if d in by_name)
        never_ran = node["state"] in (states.PENDING, SKIPPED) or node.get("error_type") == CHORD_ERROR
        if blocked and node["state"] != states.SUCCESS:
            _skip(node)  # whatever was stored under its id (a revoke of its id, say), it never ran
        elif never_ran and (failed or cancelled or node["state"] == SKIPPED or node.get("error_type") == CHORD_ERROR):
            _skip(node)
        by_name[node["name"]] = node
