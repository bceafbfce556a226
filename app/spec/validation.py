"""Validating a task spec: pydantic's errors → one ``SpecError`` naming the field.

Every error names the dotted path of the culprit, e.g. ``spec.inference.max_new_tokens``.
Validation happens at submission and again on the worker before any model is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from app.errors import SpecError
from app.spec.schema import DATA_MODELS, TaskSpec, TrainingData, training_data_problem


def _loc_to_path(prefix: str, loc: tuple[Any, ...]) -> str:
    parts = [prefix] if prefix else []
    for item in loc:
        if isinstance(item, int):
            parts.append(str(item))
        elif item in ("str", "list[str]", "function-after[_source(), InferenceData]"):
            continue
        elif "[" in str(item) and "]" in str(item):  # union branch labels from pydantic
            continue
        else:
            parts.append(str(item))
    return ".".join(parts)


def error_messages(errors: Sequence[Any], prefix: str) -> list[tuple[str, str]]:
    """``(dotted field path, message)`` for each of pydantic's error dicts."""
    messages = []
    for err in errors:
        path = _loc_to_path(prefix, tuple(err["loc"]))
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
            # Validators that name a sub-field as "field: message" extend the path.
            head, sep, tail = msg.partition(": ")
            if sep and head.isidentifier():
                path, msg = f"{path}.{head}" if path else head, tail
        messages.append((path, msg))
    return messages


def spec_error_from_messages(messages: Sequence[tuple[str, str]], prefix: str) -> SpecError:
    """One ``SpecError`` naming the first field and listing every problem."""
    if not messages:
        return SpecError(prefix, "invalid")
    first_field = messages[0][0]
    text = "; ".join(f"{path}: {msg}" for path, msg in messages)
    return SpecError(first_field, text[len(first_field) + 2:])


def spec_error_from(exc: ValidationError, prefix: str) -> SpecError:
    """Turn pydantic's errors into one ``SpecError`` naming the first field."""
    messages = error_messages(exc.errors(), prefix)
    return spec_error_from_messages(messages, prefix) if messages else SpecError(prefix, str(exc))


def parse_task_spec(raw: Any, prefix: str = "spec", *, check_data: bool = True) -> TaskSpec:
    """Validate a task spec dict; raise ``SpecError`` naming the field on any problem.

    ``check_data=False`` leaves ``data`` unchecked (the merge of a sharded task: its shards had
    the prompts, the task it was split from checked them)."""
    if not isinstance(raw, dict):
        raise SpecError(prefix, f"must be a mapping, got {type(raw).__name__}")
    try:
        spec = TaskSpec.model_validate(raw)
    except ValidationError as exc:
        raise spec_error_from(exc, prefix) from None
    data_model = DATA_MODELS.get(spec.taskType) if check_data else None
    if data_model is not None:
        try:
            data = data_model.model_validate(spec.data or {})
        except ValidationError as exc:
            raise spec_error_from(exc, f"{prefix}.data") from None
        if isinstance(data, TrainingData):
            problem = training_data_problem(spec.taskType, data)
            if problem is not None:
                raise SpecError(f"{prefix}.data.{problem[0]}", problem[1])
    return spec
