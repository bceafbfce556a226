"""Validating a task spec: pydantic's errors → one ``SpecError`` naming the field.

Every error names the dotted path of the culprit, e.g. ``spec.inference.max_new_tokens``.
Validation happens at submission and again on the worker before any model is loaded.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from typing import Any, overload

from pydantic import ValidationError

from app.core.errors import SpecError
from app.core.task_spec.schema import (
    PROMPTS_IN_SHARDS,
    REQUIRED_SECTIONS,
    TASK_SPEC_MODELS,
    BaseTaskSpec,
    TaskSpec,
    unresolved_member,
)


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


def _is_required_section(err: Any) -> bool:
    """A section the task type needs is missing (``model`` of an inference task): pydantic's
    input for a missing field is the spec itself, which names the type."""
    loc, given = tuple(err["loc"]), err.get("input")
    return len(loc) == 1 and loc[0] in REQUIRED_SECTIONS and isinstance(given, dict) and "taskType" in given


def error_messages(errors: Sequence[Any], prefix: str) -> list[tuple[str, str]]:
    """``(dotted field path, message)`` for each of pydantic's error dicts."""
    messages = []
    for err in errors:
        path = _loc_to_path(prefix, tuple(err["loc"]))
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif err["type"] == "missing" and _is_required_section(err):
            msg = f"required for taskType {err['input']['taskType']!r}"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
            # Validators that name a sub-field as "field: message" extend the path.
            head, sep, tail = msg.partition(": ")
            if sep and all(part.isidentifier() for part in head.split(".")):
                path, msg = f"{path}.{head}" if path else head, tail
        messages.append((path, msg))
    return messages


# The order a task spec's problems are listed in (the first names the error's field), whichever
# member of TaskSpec declares each section: placement, model, data, then the task's own settings.
FIELD_ORDER = ("taskType", "tags", "resources", "enforce_cpu", "sloSeconds", "parallel", "model", "reward_model",
               "data", "inference", "generation", "postprocess", "training", "lora", "checkpoint", "output", "echo")


def in_field_order(exc: ValidationError) -> list[Any]:
    """A task spec's errors in ``FIELD_ORDER`` of their top-level field (stable within a field)."""
    def rank(err: Any) -> int:
        loc = tuple(err["loc"])
        return FIELD_ORDER.index(loc[0]) if loc and loc[0] in FIELD_ORDER else len(FIELD_ORDER)
    return sorted(exc.errors(), key=rank)


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


@overload
def parse_task_spec(raw: Any, prefix: str = "spec", *, check_data: bool = True, unresolved: None = None,
                    locate: Callable[[str], str] | None = None) -> TaskSpec: ...


@overload
def parse_task_spec(raw: Any, prefix: str = "spec", *, check_data: bool = True,
                    unresolved: Callable[[str], bool],
                    locate: Callable[[str], str] | None = None) -> BaseTaskSpec | None: ...


def parse_task_spec(raw: Any, prefix: str = "spec", *, check_data: bool = True,
                    unresolved: Callable[[str], bool] | None = None,
                    locate: Callable[[str], str] | None = None) -> TaskSpec | BaseTaskSpec | None:
    """The one parse of a task spec: the member of ``TaskSpec`` its ``taskType`` names, with its
    typed ``data``; raise ``SpecError`` naming the field (every problem listed) on any problem.

    ``check_data=False``: the merge of a sharded task, whose prompts went to its shards.
    ``unresolved`` (submission, before the worker resolves ``${...}`` references): tells whether
    a problem at a dotted field path (``data.items``) is a reference's; problems there are left to the
    worker's parse; when any is left, the spec is typed as far as it can be without them: its
    member's ``unresolved_member`` (``data`` untyped; ``None`` in the rare spec where that fails too).
    ``locate`` names a dotted path in messages (default ``<prefix>.<path>``)."""
    count_parse()
    if not isinstance(raw, dict):
        raise SpecError(prefix, f"must be a mapping, got {type(raw).__name__}")
    task_type = raw.get("taskType")
    model = TASK_SPEC_MODELS.get(task_type) if isinstance(task_type, str) else None
    context = None if check_data else {PROMPTS_IN_SHARDS: True}
    try:
        # An unknown or missing taskType: the base model names it (and any other problem).
        return (model or BaseTaskSpec).model_validate(raw, context=context)  # type: ignore[return-value]
    except ValidationError as exc:
        messages = error_messages(in_field_order(exc), "")
    held: list[tuple[str, str]] = []
    if unresolved is not None:
        held = [(path, msg) for path, msg in messages if unresolved(path)]
        messages = [(path, msg) for path, msg in messages if (path, msg) not in held]
    name = locate or (lambda path: f"{prefix}.{path}" if path else prefix)
    if unresolved is not None and not messages:
        return _typed_around(raw, [path for path, _ in held], unresolved, context, name, prefix)
    raise spec_error_from_messages([(name(path), msg) for path, msg in messages], prefix)


def _typed_around(raw: dict[str, Any], held: list[str], unresolved: Callable[[str], bool],
                  context: dict[str, Any] | None, name: Callable[[str], str], prefix: str) -> BaseTaskSpec | None:
    """The spec typed as far as it can be while the fields at ``held`` wait: those fields are left
    out (and then any section that fails for want of them), and the member of its type with
    ``data`` untyped and required sections optional (``unresolved_member``) runs the checks across
    sections; a problem it finds elsewhere is raised. Routing reads the result's sections (tags,
    resources, engine: never left out, as they are never held)."""
    rest = copy.deepcopy(raw)
    for _ in range(MAX_LEAVE_OUT_ROUNDS):
        for path in held:
            _leave_out(rest, path)
        task_type = rest.get("taskType")
        model = unresolved_member(task_type) if task_type in TASK_SPEC_MODELS else BaseTaskSpec
        try:
            return model.model_validate(rest, context=context)
        except ValidationError as exc:
            messages = error_messages(in_field_order(exc), "")
        unheld = [(path, msg) for path, msg in messages if not unresolved(path)]
        if unheld:
            raise spec_error_from_messages([(name(path), msg) for path, msg in unheld], prefix)
        held = [path for path, _ in messages]
    return None


MAX_LEAVE_OUT_ROUNDS = 16  # each round removes a field or a section: a spec is far shallower


def _leave_out(spec: dict[str, Any], path: str) -> None:
    """Remove the field at a dotted ``path``, or the nearest enclosing field there is (a list as a
    whole: its indices would shift). A ``taskType`` that cannot be read counts as ``echo``: the
    spec routes by its tags and resources, and the worker's own parse names the problem."""
    node: Any = spec
    trail: list[tuple[Any, Any]] = []
    for part in path.split(".") if path else []:
        key: Any = int(part) if part.isdigit() else part
        if isinstance(node, dict) and key in node or (isinstance(node, list) and isinstance(key, int)
                                                      and 0 <= key < len(node)):
            trail.append((node, key))
            node = node[key]
        else:
            break
    while trail and isinstance(trail[-1][0], list):
        trail.pop()
    if path in ("", "taskType"):
        spec["taskType"] = "echo"
        return
    if not trail:  # an absent field (a missing section: the unresolved member requires none)
        return
    container, key = trail[-1]
    del container[key]


# Set by a test (``tests/test_spec_parses.py``) to count the parses on a task's way through
# client and worker: each parse appends its process id to that file.
COUNT_PARSES_ENV = "MESHQ_COUNT_SPEC_PARSES"


# Read once: the test sets it in the environment of the processes it starts, and a lookup in
# os.environ on every parse (every send) cost more than the check itself.
_COUNT_PARSES_PATH = os.environ.get(COUNT_PARSES_ENV)


def count_parse() -> None:
    path = _COUNT_PARSES_PATH
    if path:
        with open(path, "a") as counts:
            counts.write(f"{os.getpid()}\n")
