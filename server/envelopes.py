"""The result envelope a worker posts to the orchestrator, on disk: ``<task>/result.json``.

Envelopes are keyed by run (``run``: the worker's count of real starts of the task), like
uploads: one from an earlier run than the task's recorded run (a late run of a paused
worker) raises ``StaleRun`` and changes nothing (``app.artifacts.run_record``). An
envelope without a run (a plain user's) is not keyed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from app.artifacts.manifest import RESPONSES_NAME, write_json_atomic
from app.artifacts.run_record import fenced

ENVELOPE_NAME = "result.json"


def save_envelope(task_dir: Path, envelope: dict[str, Any]) -> Path:
    """Store a task's result envelope in ``task_dir``; a write that fails (a full disk)
    leaves no task folder it made behind."""
    run = envelope.get("run")
    keyed = isinstance(run, int) and not isinstance(run, bool)
    with fenced(task_dir, run if keyed else None):
        created = not task_dir.exists()
        task_dir.mkdir(parents=True, exist_ok=True)
        path = task_dir / ENVELOPE_NAME
        try:
            write_json_atomic(path, envelope)
        except BaseException:
            if created:
                try:
                    task_dir.rmdir()
                except OSError:
                    pass
            raise
        return path


def load_envelope(task_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((task_dir / ENVELOPE_NAME).read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        return None
    return data if isinstance(data, dict) else None


def load_responses(task_dir: Path) -> Any | None:
    """``<task>/responses.json`` if a worker wrote it here (shared results directory)."""
    try:
        return json.loads((task_dir / RESPONSES_NAME).read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
