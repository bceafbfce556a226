"""What an executor sees of its task: progress reports and cooperative cancellation.

Executors call ``progress(done=..., total=...)`` as often as they like and
``progress.check_cancelled()`` between units of work. This base records nothing and
is never cancelled; ``RecordingProgress`` keeps every report (tests, scripts); the
Celery implementation (``tasks.progress.CeleryProgress``) forwards them to Flower,
the result backend and ``tasks.events``.
"""

from __future__ import annotations

from typing import Any

from app.core.errors import TaskCancelled


class Progress:
    """What executors talk to. This base records nothing and is never cancelled."""

    task_id = "local"
    # The task's run (its count of real starts) when a worker runs it: executors commit
    # their final outputs under ``app.artifacts.run_record.fenced(out_dir, progress.run)``.
    # None (tests, scripts): no fence.
    run: int | None = None

    def __call__(self, force: bool = False, **fields: Any) -> None:
        """Report progress; ``force`` bypasses rate limiting (first/last report)."""

    def cancelled(self) -> bool:
        return False

    def check_cancelled(self, where: str = "") -> None:
        """Raise ``TaskCancelled`` if the user asked to stop."""
        if self.cancelled():
            raise TaskCancelled(self.task_id, where)


class RecordingProgress(Progress):
    """Keeps every report; for running executors without Celery (tests, scripts)."""

    def __init__(self, cancel_after: int | None = None) -> None:
        self.reports: list[dict[str, Any]] = []
        self.cancel_after = cancel_after

    def __call__(self, force: bool = False, **fields: Any) -> None:
        self.reports.append(fields)

    def cancelled(self) -> bool:
        return self.cancel_after is not None and len(self.reports) >= self.cancel_after
