"""What a whole pipeline is doing, from its stages' task statuses (``tasks.status``).

States of a stage are Celery's (``PENDING, STARTED, PROGRESS, SUCCESS, FAILURE,
REVOKED``) plus ``SKIPPED``: a stage that never ran because an earlier one failed
or the pipeline was cancelled. A pipeline is ``PENDING, RUNNING, SUCCESS,
FAILURE, CANCELLING`` (cancel requested, a stage still stopping) or ``CANCELLED``.
"""

from __future__ import annotations

from typing import Any

from celery import states

from tasks.status import PROGRESS, STOPPED_STATES

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
