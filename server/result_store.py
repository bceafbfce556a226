"""The orchestrator's results directory on disk (DESIGN §7): one folder per task.

Layout under the server's results directory::

    <task_id>/artifacts/...       the uploads, each with its checksum (``server.uploads``)
    <task_id>/result.json         the result envelope a worker posted (``server.envelopes``)
    <task_id>/.meshq/run          the task's highest run (``app.artifacts.run_record``)
    <task_id>/<filename>          other files (``responses.json``, ``manifest.json``)

Uploads and envelopes from a worker are keyed by run (the worker's count of real starts
of the task) through the task folder's run record — the same record, file and lock a
worker's own commits use where the server's results directory is the workers'
``RESULTS_DIR``: under the record's lock, an upload or envelope from an earlier run than
the recorded one raises ``StaleRun`` (HTTP 409) and stores nothing; one from the same or
a later run records its run and is committed. Uploads without a run (plain users) are
not keyed.

Every name that becomes a path goes through ``check_name``; the store's own
bookkeeping files carry a ``~`` (which ``check_name`` refuses) or lie under ``.meshq/``
(a directory, never served), so no client can read, overwrite or collide with them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from app.artifacts.run_record import check_run
from app.core.errors import StaleRun
from app.core.names import check_name
from server import envelopes
from server.uploads import ARTIFACTS_DIR_NAME, ArtifactFiles, OpenFile, UploadSink

__all__ = ["BadName", "OpenFile", "ResultStore", "StaleRun", "UploadSink", "checked"]


class BadName(ValueError):
    """A task id or file name that cannot be a path component (HTTP 400); ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def checked(value: object, field: str) -> str:
    """``check_name`` that raises ``BadName`` (the server turns it into 400)."""
    try:
        return check_name(value, field)
    except ValueError as exc:
        raise BadName(field, str(exc)) from None


class ResultStore:
    """Task ids and file names to paths under one results directory, and what is stored
    there: artifacts, result envelopes, each task's run record."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        self.files = ArtifactFiles()

    # -- paths ----------------------------------------------------------------
    def task_dir(self, task_id: str) -> Path:
        return self.root / checked(task_id, "task_id")

    def artifact_path(self, task_id: str, filename: str) -> Path:
        return self.task_dir(task_id) / ARTIFACTS_DIR_NAME / checked(filename, "filename")

    # -- artifacts ------------------------------------------------------------
    def new_upload(self, task_id: str, filename: str, run: int | None = None) -> UploadSink:
        self.root.mkdir(parents=True, exist_ok=True)
        return UploadSink(self.files, self.task_dir(task_id), checked(filename, "filename"), run)

    def open_file(self, task_id: str, filename: str) -> OpenFile | None:
        return self.files.open_file(self.artifact_path(task_id, filename))

    def list_artifacts(self, task_id: str) -> list[dict[str, Any]]:
        return self.files.list_artifacts(self.task_dir(task_id) / ARTIFACTS_DIR_NAME)

    def sha256_of(self, opened: OpenFile) -> str:
        return self.files.sha256_of(opened)

    def sweep_dead_uploads(self) -> int:
        return self.files.sweep_dead_uploads(self.root)

    # -- runs -----------------------------------------------------------------
    def check_run(self, task_id: str, run: int) -> None:
        """Raise ``StaleRun`` if ``run`` is earlier than the task's recorded run (a quick
        check before an upload is received; the commit decides under the record's lock)."""
        check_run(self.task_dir(task_id), run)

    # -- result envelopes -----------------------------------------------------
    def save_envelope(self, task_id: str, envelope: dict[str, Any]) -> Path:
        return envelopes.save_envelope(self.task_dir(task_id), envelope)

    def load_envelope(self, task_id: str) -> dict[str, Any] | None:
        return envelopes.load_envelope(self.task_dir(task_id))

    def load_responses(self, task_id: str) -> Any | None:
        return envelopes.load_responses(self.task_dir(task_id))
