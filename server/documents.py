"""Task and pipeline documents posted to ``POST /api/v1/tasks``: parsed, checked, submitted."""

from __future__ import annotations

from typing import Any

from app.core.errors import LimitExceeded, PipelineError, SpecError
from app.core.limits import check_document
from pipelines import Pipeline, PipelineRun
from pipelines.template import normalise_document, parse_text
from server.transfer import ApiError

YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml", "text/plain")


def parse_document(body: bytes, content_type: str | None) -> Any:
    """A task/pipeline document from JSON or YAML, read as the CLI reads a file
    (``pipelines.template.parse_text``), within ``app.core.limits``.

    Blocking (a large YAML document takes seconds): the server calls it in a thread."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    is_json = media == "application/json" or media.endswith("+json")
    if media and not is_json and media not in YAML_TYPES:
        raise ApiError(415, f"Content-Type: {media!r} is not JSON or YAML", "Content-Type")
    try:
        document = parse_text(body.decode("utf-8"), "body", strict_json=is_json)
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"body: not valid UTF-8: {exc}", "body") from None
    except LimitExceeded:
        raise
    except SpecError as exc:  # the text could not be read: a bad request, not a bad spec
        raise ApiError(400, str(exc), "body") from None
    check_document(document)  # YAML aliases must not expand a small body into a huge spec
    return document


def submit_document(document: Any) -> dict[str, Any]:
    """Validate and submit one document (a task or a pipeline); the HTTP API's only way in.

    Returns ``{"id", "kind", "task_ids", "stages", "queue", "warnings"}`` (``queue`` is
    the first stage's); raises ``SpecError`` naming the field. A task document is a
    one-stage pipeline whose id is its task id. ``${env:...}`` references are refused:
    the server does not hand its environment to whoever posts a document.
    """
    document = normalise_document(document, "body")  # the envelope, as the CLI and Pipeline.from_dict read it
    run = Pipeline.from_dict(document, expand_environment=False).submit()
    return {"id": run.id, "kind": "pipeline" if len(run.stages) > 1 else "task",
            "task_ids": [stage["task_id"] for stage in run.stages],
            "stages": {stage["name"]: {"task_id": stage["task_id"], "queue": stage["queue"],
                                       **({"depends_on": stage["depends_on"]} if "depends_on" in stage else {})}
                       for stage in run.stages},
            "queue": run.stages[0]["queue"], "warnings": run.warnings}


def pipeline_run(some_id: str, client: Any) -> Any:
    """The ``PipelineRun`` of a pipeline of two or more stages, else None (a task keeps its task view)."""
    try:
        run = PipelineRun.get(some_id, client)
    except PipelineError:
        return None
    return run if len(run.stages) > 1 else None


def recorded_metadata(some_id: str, client: Any) -> dict[str, Any] | None:
    """The ``metadata`` of the document submitted under ``some_id`` (a task too), if any."""
    try:
        run = PipelineRun.get(some_id, client)
    except PipelineError:
        return None
    metadata = run.document.get("metadata")
    return metadata if isinstance(metadata, dict) and metadata else None
