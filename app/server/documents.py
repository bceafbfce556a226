"""Task and pipeline documents posted to ``POST /api/v1/tasks``: parsed, checked, submitted."""

from __future__ import annotations

import json
from typing import Any

import yaml

from app.errors import LimitExceeded, PipelineError, SpecError
from app.limits import MAX_NESTING_DEPTH, check_document
from app.server.transfer import ApiError
from pipelines import Pipeline, PipelineRun
from pipelines.template import yaml_error_text

YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml", "text/plain")


def parse_document(body: bytes, content_type: str | None) -> Any:
    """A task/pipeline document from JSON or YAML (YAML also reads JSON), within ``app.limits``.

    Blocking (a large YAML document takes seconds): the server calls it in a thread."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media and media != "application/json" and media not in YAML_TYPES and not media.endswith("+json"):
        raise ApiError(415, f"Content-Type: {media!r} is not JSON or YAML", "Content-Type")
    try:
        text = body.decode("utf-8")
        if media == "application/json" or media.endswith("+json"):
            document = json.loads(text)
        else:
            documents = list(yaml.safe_load_all(text))
            if len(documents) != 1:
                raise ApiError(400, f"body: expected one YAML document, got {len(documents)}", "body")
            document = documents[0]
    except ApiError:
        raise
    except yaml.YAMLError as exc:  # where it went wrong, as the CLI says it
        raise ApiError(400, f"body: not valid YAML/JSON: {yaml_error_text(exc)}", "body") from None
    except RecursionError:  # deeper than the parser's own stack: far past MAX_NESTING_DEPTH
        raise LimitExceeded("body", f"nested deeper than {MAX_NESTING_DEPTH} levels "
                                    f"(MAX_NESTING_DEPTH={MAX_NESTING_DEPTH})") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, f"body: not valid {'JSON' if 'json' in media else 'YAML/JSON'}: "
                            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", "body") from None
    check_document(document)  # YAML aliases must not expand a small body into a huge spec
    return document


TASK_DOCUMENT_KEYS = ("apiVersion", "kind", "metadata", "spec")


def task_spec_of(document: Any) -> Any:
    """The spec of a task document ``{apiVersion?, kind?, metadata?, spec}`` or a bare spec."""
    if not isinstance(document, dict):
        raise SpecError("body", f"must be a mapping (a task document or a spec), got {type(document).__name__}")
    if "spec" not in document:
        if "taskType" in document:
            return document
        raise SpecError("spec", "required: a task document {apiVersion, kind, metadata, spec} "
                                "or a bare spec with taskType")
    unknown = sorted(str(k) for k in document if k not in TASK_DOCUMENT_KEYS)
    if unknown:
        raise SpecError(unknown[0], "unknown field")
    for key in ("apiVersion", "kind"):
        if key in document and not isinstance(document[key], str):
            raise SpecError(key, "must be a string")
    if "metadata" in document and not isinstance(document["metadata"], dict | None):
        raise SpecError("metadata", "must be a mapping")
    return document["spec"]


def submit_document(document: Any) -> dict[str, Any]:
    """Validate and submit one document (a task or a pipeline); the HTTP API's only way in.

    Returns ``{"id", "kind", "task_ids", "stages", "queue", "warnings"}`` (``queue`` is
    the first stage's); raises ``SpecError`` naming the field. A task document is a
    one-stage pipeline whose id is its task id. ``${env:...}`` references are refused:
    the server does not hand its environment to whoever posts a document.
    """
    task_spec_of(document)  # the envelope: a mapping, known keys, a spec
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
