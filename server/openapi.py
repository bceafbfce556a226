"""The server's OpenAPI schema: request bodies the routes read by hand, name patterns, auth."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, TypeAdapter

from app.artifacts.upload import CHECKSUM_HEADER, RUN_HEADER
from app.core.names import SAFE_NAME_RE
from app.core.settings import TAG_RE
from app.core.task_spec import TaskSpec
from app.core.task_spec.schema import TASK_SPEC_MODELS

MAX_RUN = 999_999_999


class ResultEnvelope(BaseModel):
    """What a worker posts when a task ends; extra fields are kept."""

    model_config = ConfigDict(extra="allow")
    task_id: str
    result: Any = None
    worker_id: str | None = None


UPLOAD_OPENAPI: dict[str, Any] = {
    "parameters": [{"name": CHECKSUM_HEADER, "in": "header", "required": False,
                    "description": "expected sha256 of the file (hex); mismatch → 422",
                    "schema": {"type": "string"}},
                   {"name": RUN_HEADER, "in": "header", "required": False,
                    "description": "the uploading worker's run of the task (a positive integer); an upload "
                                   "from an earlier run than the task's stored run → 409, nothing stored",
                    "schema": {"type": "integer", "minimum": 1, "maximum": MAX_RUN}}],
    "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file"],
        "properties": {"file": {"type": "string", "format": "binary"},
                       "sha256": {"type": "string", "description": "expected sha256 (hex)"}}}}}},
}
ENVELOPE_OPENAPI: dict[str, Any] = {
    "requestBody": {"required": True,
                    "content": {"application/json": {"schema": ResultEnvelope.model_json_schema()}}},
}
DOCUMENT_OPENAPI: dict[str, Any] = {
    "requestBody": {"required": True, "content": {
        "application/json": {"schema": {"type": "object", "description":
                                        "task document {apiVersion, kind, metadata, spec} or a bare spec"}},
        "application/yaml": {"schema": {"type": "string"}}}},
}
ERRORS_OPENAPI: dict[int | str, dict[str, Any]] = {
    400: {"description": "bad name, path or body"}, 401: {"description": "token missing"},
    403: {"description": "token wrong"},
}


def json_schema_pattern(pattern: str) -> str:
    """A Python pattern for JSON Schema (ECMA regex): ``\\Z`` (the very end) is ``$`` there."""
    return pattern.removesuffix("\\Z") + "$" if pattern.endswith("\\Z") else pattern


NAME_SCHEMA = {"type": "string", "pattern": json_schema_pattern(SAFE_NAME_RE.pattern)}


def customize_openapi(app: FastAPI, bearer: bool) -> None:
    """Complete the generated schema: name patterns of path parameters (checked by the
    handlers, so a bad name is 400 and not FastAPI's 422), the task spec's JSON schema,
    and, with a token, the bearer security scheme on every operation but /healthz."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = original()
            components = schema.setdefault("components", {})
            for path_item in schema["paths"].values():
                for operation in path_item.values():
                    for parameter in operation.get("parameters", []):
                        if parameter["in"] == "path" and parameter["name"] in ("task_id", "filename"):
                            parameter["schema"] = {**NAME_SCHEMA, "title": parameter["name"]}
            # One schema per task type (its data and sections), chosen by taskType.
            spec_schema = TypeAdapter(TaskSpec).json_schema(ref_template="#/components/schemas/{model}")
            members = spec_schema.pop("$defs", {})
            for name in {model.__name__ for model in TASK_SPEC_MODELS.values()}:
                # Checked by a validator in app.core.task_spec; said here so clients (and fuzzers) know.
                members[name]["properties"]["tags"]["items"] = {"type": "string",
                                                                "pattern": json_schema_pattern(TAG_RE.pattern)}
            components.setdefault("schemas", {}).update(members)
            components["schemas"]["TaskSpec"] = spec_schema
            body = schema["paths"]["/api/v1/tasks"]["post"]["requestBody"]["content"]["application/json"]
            body["schema"] = {"type": "object", "required": ["spec"], "additionalProperties": False,
                              "description": "a task document (a bare spec with taskType is accepted too)",
                              "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                             "metadata": {"type": "object"},
                                             "spec": {"$ref": "#/components/schemas/TaskSpec"}}}
            if bearer:
                components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
                schema["security"] = [{"bearer": []}]
                for operation in schema["paths"].get("/healthz", {}).values():
                    operation["security"] = []
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
