"""Submitting one task: validate, route (``tasks.placement``: tags, capabilities, or a pinned
worker), warn if no live worker will take it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from app.celery import app
from app.core.task_spec import parse_task_spec
from tasks import definitions  # noqa: F401  (registers every meshq task)
from tasks.placement import queue_for, queue_warning, record_queue, requirement_for


@dataclass
class Submission:
    task_id: str
    task_name: str
    queue: str
    warnings: list[str] = field(default_factory=list)


def task_for_type(task_type: str) -> Any:
    """The registered Celery task that runs ``task_type``."""
    return app.tasks[f"meshq.{task_type}"]


def submit_task(raw_spec: Any, *, worker_id: str | None = None, task_id: str | None = None,
                **options: Any) -> Submission:
    """Validate ``raw_spec`` and enqueue it; raises ``SpecError`` for a bad spec."""
    spec = parse_task_spec(raw_spec)
    requirement = requirement_for(spec)
    queue = queue_for(requirement, worker_id)
    task = task_for_type(spec.taskType)
    record_queue(queue, requirement)
    result = task.apply_async(args=[raw_spec], queue=queue, task_id=task_id, **options)
    warning = queue_warning(queue, requirement)
    return Submission(result.id, task.name, queue, [warning] if warning else [])
