"""``${...}`` references in pipeline specs: parsing, checking and resolution (pure).

Two kinds of reference may appear in any string of a spec:

* ``${<stage>.result.<path>}`` — a field of the result of an earlier stage;
  ``${stage.result.<path>}`` means the previous stage. ``<path>`` is dotted, list
  indices are numbers (``items.0.output``, also written ``items[0].output``);
  ``${train.result}`` is the whole result. Resolved on the worker, just before
  the stage runs.
* ``${env:NAME}`` / ``${env:NAME:-default}`` — an environment variable of the
  process that loads the document (``meshq submit``, ``Pipeline.from_yaml``);
  ``${NAME}`` (no dot inside), the original templates' spelling, is the same.

A string that is exactly one reference becomes the referenced value (any JSON
type); a reference inside a longer string is formatted into it (strings as they
are, anything else as JSON). ``$${`` writes a literal ``${``.

Every error is a ``SpecError`` whose field is the location of the string, e.g.
``spec.stages[1].spec.checkpoint.load.url``.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from app.core.errors import SpecError
from app.core.limits import RESULT_FILE, ByteBudget, check_document, json_bytes

PREVIOUS_STAGE = "stage"
ENV_PREFIX = "env:"
_TOKEN_RE = re.compile(r"\$(\$?)\{([^{}]*)\}")
_STAGE_REF_RE = re.compile(r"^([A-Za-z0-9_-]+)\.result((?:\.[^.\[\]]+|\[-?\d+\])*)\Z")
_ENV_REF_RE = re.compile(r"^env:([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?\Z", re.DOTALL)
# The original templates' spelling of an environment placeholder: ${NAME} (no dot inside).
_BARE_ENV_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?\Z", re.DOTALL)
_SYNTAX_HINT = ("expected ${<stage>.result.<path>}, ${stage.result.<path>}, ${env:NAME} or ${NAME} "
                "(write $${ for a literal ${)")


@dataclass(frozen=True)
class Reference:
    """One parsed ``${...}``: a stage result field, or an environment variable."""

    text: str                      # as written, e.g. "${train.result.items.0}"
    stage: str | None = None       # stage name, or PREVIOUS_STAGE
    path: tuple[str, ...] = ()
    env: str | None = None         # variable name for ${env:NAME}
    default: str | None = None     # ${env:NAME:-default}

    @property
    def is_env(self) -> bool:
        return self.env is not None


def parse_reference(text: str, location: str) -> Reference:
    """Parse the whole token ``${...}`` (``text`` includes ``${`` and ``}``)."""
    inner = text[2:-1].strip()
    env = _ENV_REF_RE.match(inner) or _BARE_ENV_RE.match(inner)
    if env:
        return Reference(text, env=env.group(1), default=env.group(2))
    match = _STAGE_REF_RE.match(inner)
    if not match:
        raise SpecError(location, f"{text} is not a reference: {_SYNTAX_HINT}")
    raw_path = re.sub(r"\[(-?\d+)\]", r".\1", match.group(2))
    path = tuple(part for part in raw_path.split(".") if part)
    return Reference(text, stage=match.group(1), path=path)


PathKey = str | int
FieldPath = tuple[PathKey, ...]


def join_location(location: str, key: PathKey) -> str:
    if isinstance(key, int):
        return f"{location}[{key}]"
    return f"{location}.{key}" if location else key


def format_location(prefix: str, path: FieldPath) -> str:
    """``("spec", ("data", "items", 0))`` → ``spec.data.items[0]``."""
    location = prefix
    for key in path:
        location = join_location(location, key)
    return location


def _tokens(value: str) -> Iterator[re.Match[str]]:
    return _TOKEN_RE.finditer(value)


def iter_strings(value: Any, path: FieldPath = ()) -> Iterator[tuple[FieldPath, str]]:
    """Every string in a JSON-like value with its path (dict keys are not values)."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from iter_strings(item, (*path, str(key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from iter_strings(item, (*path, index))


def find_references(value: Any, locate: Callable[[FieldPath], str]) -> list[tuple[FieldPath, str, Reference]]:
    """``(path, location, reference)`` for every reference in ``value``; bad syntax raises.

    ``locate`` names a path for messages (e.g. ``spec.stages[1].spec.<path>``).
    """
    found = []
    for path, text in iter_strings(value):
        for match in _tokens(text):
            if not match.group(1):  # "$${" is an escaped literal
                where = locate(path)
                found.append((path, where, parse_reference(match.group(0), where)))
    return found


def format_value(value: Any) -> str:
    """How a referenced value reads inside a longer string."""
    return value if isinstance(value, str) else json.dumps(value)


# Resolve one reference to its value, or return KEEP to leave it as written.
KEEP: Any = object()
Lookup = Callable[[Reference, str], Any]


def substitute(value: Any, lookup: Lookup, location: str, *, final: bool, budget: ByteBudget | None = None) -> Any:
    """A copy of ``value`` with every reference ``lookup`` resolves replaced.

    ``final`` unescapes ``$${`` (only the last pass, on the worker, may do it). Each
    resolved value is counted against ``budget`` before it is copied in.
    """
    if isinstance(value, str):
        return _substitute_string(value, lookup, location, final, budget)
    if isinstance(value, Mapping):
        return {key: substitute(item, lookup, join_location(location, str(key)), final=final, budget=budget)
                for key, item in value.items()}
    if isinstance(value, list):
        return [substitute(item, lookup, join_location(location, i), final=final, budget=budget)
                for i, item in enumerate(value)]
    return value


def _looked_up(ref: Reference, lookup: Lookup, location: str, budget: ByteBudget | None) -> Any:
    value = lookup(ref, location)
    if budget is not None and value is not KEEP:
        budget.spend(json_bytes(value), location)
    return value


def _substitute_string(text: str, lookup: Lookup, location: str, final: bool, budget: ByteBudget | None) -> Any:
    matches = list(_tokens(text))
    if not matches:
        return text
    only = matches[0]
    if len(matches) == 1 and only.start() == 0 and only.end() == len(text) and not only.group(1):
        ref = parse_reference(text, location)
        value = _looked_up(ref, lookup, location, budget)
        return text if value is KEEP else copy.deepcopy(value)
    parts: list[str] = []
    position = 0
    for match in matches:
        parts.append(text[position:match.start()])
        position = match.end()
        if match.group(1):  # escaped: "$${x}" → "${x}" on the final pass
            parts.append(match.group(0)[1:] if final else match.group(0))
            continue
        ref = parse_reference(match.group(0), location)
        value = _looked_up(ref, lookup, location, budget)
        parts.append(match.group(0) if value is KEEP else format_value(value))
    parts.append(text[position:])
    return "".join(parts)


# -- environment references (expanded where the document is loaded) ---------------
def expand_env(value: Any, env: Mapping[str, str] | None, location: str) -> Any:
    """Replace ``${env:NAME}``; stage references stay for the worker.

    ``env=None`` forbids environment references (the HTTP server must not hand its
    own environment to whoever posts a document).
    """

    def lookup(ref: Reference, where: str) -> Any:
        if not ref.is_env:
            return KEEP
        if env is None:
            raise SpecError(where, f"{ref.text}: environment references are expanded only by the "
                                   "client that loads the file (meshq submit, Pipeline.from_yaml)")
        name = ref.env or ""
        if name in env:
            return env[name]
        if ref.default is not None:
            return ref.default
        raise SpecError(where, f"{ref.text}: environment variable {name} is not set")

    return substitute(value, lookup, location, final=False)


# -- stage references ---------------------------------------------------------------
def refuse_unexpanded_env(ref: Reference, where: str) -> None:
    """``${env:NAME}`` is expanded where the document is loaded; one left at submission is an error."""
    if ref.is_env:
        raise SpecError(where, f"{ref.text}: environment variable references must be expanded "
                               "before submission")


def lookup_path(result: Any, ref: Reference) -> Any:
    """Follow ``ref.path`` into a stage result; raise ``LookupError`` with the reason."""
    value = result
    walked = f"{ref.stage}.result"
    for part in ref.path:
        if isinstance(value, Mapping):
            if part not in value and value is result and isinstance(value.get(RESULT_FILE), Mapping):
                kept = value[RESULT_FILE]
                raise LookupError(f"{walked} has no field {part!r} in the result backend: {kept.get('reason')}; "
                                  f"the whole result is {kept.get('path')} on worker {kept.get('worker_id')}")
            if part not in value:
                fields = ", ".join(sorted(map(str, value))[:20])
                raise LookupError(f"{walked} has no field {part!r} (fields: {fields or 'none'})")
            value = value[part]
        elif isinstance(value, list):
            try:
                index = int(part)
            except ValueError:
                raise LookupError(f"{walked} is a list: {part!r} is not an index") from None
            if not -len(value) <= index < len(value):
                raise LookupError(f"{walked} has {len(value)} items: index {index} is out of range")
            value = value[index]
        else:
            raise LookupError(f"{walked} is {type(value).__name__} {format_value(value)[:80]}, "
                              f"it has no field {part!r}")
        walked = f"{walked}.{part}"
    return value


StageResults = Callable[[str], Any]  # stage name (or PREVIOUS_STAGE) → result; KeyError if unknown


def resolve_stage_references(spec: Any, results: StageResults, location: str, max_bytes: int) -> Any:
    """Resolve every stage reference in ``spec`` (the worker's last step before parsing).

    The resolved spec may hold at most ``max_bytes`` (``MAX_MESSAGE_BYTES``: it is what
    the stage's message would have been, written out): the spec as sent plus every
    value copied in, counted as each is copied, so a spec that references a result 16
    times fails before 16 copies exist. A spec that changed is then held to the
    document limits too (depth, values, string bytes).
    """
    budget = ByteBudget(max_bytes, "MAX_MESSAGE_BYTES", location, "once its ${...} references are resolved")

    def lookup(ref: Reference, where: str) -> Any:
        if not budget.spent:  # the spec itself, counted once it has a reference to resolve
            budget.spend(json_bytes(spec))
        if ref.is_env:
            raise SpecError(where, f"{ref.text}: environment variable references must be expanded "
                                   "before submission")
        try:
            result = results(str(ref.stage))
        except LookupError as exc:
            raise SpecError(where, f"{ref.text}: {exc.args[0] if exc.args else exc}") from None
        try:
            return lookup_path(result, ref)
        except LookupError as exc:
            raise SpecError(where, f"{ref.text}: {exc.args[0]}") from None

    resolved = substitute(spec, lookup, location, final=True, budget=budget)
    if budget.spent:
        check_document(resolved, location)
    return resolved
