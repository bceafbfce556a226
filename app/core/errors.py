"""One error hierarchy for meshq.

Every error names what it is about (a field, a path, a URL, a variable) so the
person reading the message knows what to fix. Constructor arguments are kept in
``args`` so Celery can rebuild the same exception class on the client side.
"""

from __future__ import annotations


class MeshqError(Exception):
    """Root of every error meshq raises on purpose."""


class ConfigError(MeshqError):
    """A bad environment variable or setting; ``variable`` names it."""

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(variable, message)
        self.variable = variable
        self.message = message

    def __str__(self) -> str:
        return f"{self.variable}: {self.message}"


class SpecError(MeshqError):
    """An invalid task or pipeline spec; ``field`` is the dotted path of the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(field, message)
        self.field = field
        self.message = message

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class LimitExceeded(SpecError):
    """A document or message past one of ``app.core.limits`` (HTTP 413); the message names the limit."""


class ExecutorError(MeshqError):
    """An executor could not do its job (model missing, data unreadable, ...)."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message, path)
        self.message = message
        self.path = path

    def __str__(self) -> str:
        return self.message


class ArtifactError(MeshqError):
    """An archive, upload or download failed; ``url`` or ``path`` says which."""

    def __init__(self, message: str, url: str | None = None, path: str | None = None,
                 status: int | None = None) -> None:
        super().__init__(message, url, path, status)
        self.message = message
        self.url = url
        self.path = path
        self.status = status

    def __str__(self) -> str:
        return self.message


class TaskCancelled(MeshqError):
    """Raised inside an executor when the user cancelled the task."""

    def __init__(self, task_id: str, where: str = "") -> None:
        super().__init__(task_id, where)
        self.task_id = task_id
        self.where = where

    def __str__(self) -> str:
        return f"task {self.task_id} cancelled{(' ' + self.where) if self.where else ''}"


class LeaseLost(MeshqError):
    """This run of a task lost its lease to another worker (it was paused or cut off past
    the lease's expiry and the task started again elsewhere): it must stop and write nothing."""

    def __init__(self, task_id: str, holder: str, run: int | None = None, later_run: int | None = None) -> None:
        super().__init__(task_id, holder, run, later_run)
        self.task_id = task_id
        self.holder = holder
        self.run = run
        self.later_run = later_run

    def __str__(self) -> str:
        if self.later_run is not None:
            by = f" (worker {self.holder})" if self.holder else ""
            return (f"task {self.task_id} was started again as run {self.later_run}{by}; this was run "
                    f"{self.run}, which never runs again; this run stops")
        return f"task {self.task_id} is now run by worker {self.holder}; this run stops"


class StaleRun(LeaseLost):
    """A commit of a task's outputs from an earlier run than the one its task folder records
    (``app.artifacts.run_record``): nothing was written. The server answers it with 409; on
    a worker it stops the run as a lost lease does (the later run owns the task)."""

    def __init__(self, task_id: str, run: int, stored_run: int) -> None:
        super().__init__(task_id, "a later run", run=run, later_run=stored_run)
        self.args = (task_id, run, stored_run)  # as pickle rebuilds it
        self.stored_run = stored_run

    def __str__(self) -> str:
        return (f"run {self.run} of task {self.task_id} is older than the stored result's run "
                f"{self.stored_run}; not stored, this run stops")


class RunRefused(LeaseLost):
    """The orchestrator refused this run's upload or result (409: it holds another run's
    outputs of the task, or cannot verify this run). ``detail`` is the server's reason.
    The run stops if a later run of the task started; otherwise the task fails with it."""

    def __init__(self, task_id: str, what: str, detail: str) -> None:
        super().__init__(task_id, "a later run")
        self.args = (task_id, what, detail)  # as Celery rebuilds it
        self.what = what
        self.detail = detail

    def __str__(self) -> str:
        return f"the orchestrator refused the {self.what} of task {self.task_id}: {self.detail}"


class PipelineError(MeshqError):
    """A pipeline failed, was cancelled, timed out or is unknown; ``stage`` names the stage."""

    def __init__(self, pipeline_id: str, message: str, stage: str | None = None) -> None:
        super().__init__(pipeline_id, message, stage)
        self.pipeline_id = pipeline_id
        self.message = message
        self.stage = stage

    def __str__(self) -> str:
        return f"pipeline {self.pipeline_id}: {self.message}"


class UnknownIdError(PipelineError):
    """No pipeline, stage or task has this id (never submitted, or its records expired)."""

    def __init__(self, some_id: str) -> None:
        super().__init__(some_id, "not found: no pipeline or task has this id (unknown, or its records expired)")

    def __str__(self) -> str:
        return f"{self.pipeline_id}: {self.message}"
