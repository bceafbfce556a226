"""The result hook that delivers every task's outputs to an ``http`` destination.

Installed in ``tasks.base.RESULT_HOOKS`` when ``tasks`` is imported, so echo,
inference and training tasks all get it: archives are uploaded (training) and
the envelope ``{task_id, result, worker_id}`` is POSTed to the orchestrator.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.artifacts import deliver_result
from tasks.base import RESULT_HOOKS
from tasks.spec import TaskSpec


def deliver_to_destination(task_id: str, spec: TaskSpec, result: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    return deliver_result(task_id, spec.output.destination, result)


if deliver_to_destination not in RESULT_HOOKS:
    RESULT_HOOKS.append(deliver_to_destination)
