"""Pipeline templates (pure): a document → validated graph nodes, ready to become a canvas.

A document is ``{apiVersion, kind, metadata, spec}`` (DESIGN §5) or a bare task
spec. ``spec.stages: [{name, spec, tags?, runOn?}]`` lists the stages, or
``spec.graph.nodes: [{name, dependsOn, spec, tags?, runOn?}]`` the nodes of a DAG
(``pipelines.graph``: dependencies, cycles, ancestors; the nodes are kept in
dependency order). Stages are parsed into the same nodes: stage i depends on stage
i-1, so its ancestors are the stages before it, and every later check (references,
``runOn``, ``graph_template`` columns) is the graph's; only the words of the errors
follow the form the document was written in (``Form``). Each stage's or node's
``spec`` is merged over the shared ``spec`` (everything but ``stages``/``graph``)
as a JSON Merge Patch (RFC 7386: mappings merge key by key, anything else
replaces, ``null`` removes the shared field). A spec without ``stages`` or
``graph`` is a one-stage pipeline whose stage is named after its ``taskType``.

Validation happens here, before anything is sent: stage names, ``runOn``,
``${...}`` references (unknown or later stages; for a node, anything but an
ancestor), ``graph_template`` columns and every merged stage spec
(``app.core.task_spec``). A field whose value holds a stage reference cannot be
type-checked until the worker resolves it, so errors at such fields are left to
the worker's own check; every other field is checked now.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from app.core.errors import LimitExceeded, SpecError
from app.core.limits import MAX_NESTING_DEPTH, check_document, check_stages, json_bytes
from app.core.settings import NAME_RE, get_settings
from app.core.task_spec import BaseTaskSpec, parse_task_spec
from app.core.task_spec.schema import REFUSED_TASK_TYPES
from pipelines.graph import ancestors_of, read_dependencies, topological_order
from pipelines.graph_template import check_template
from pipelines.references import (
    PREVIOUS_STAGE,
    FieldPath,
    Reference,
    expand_env,
    find_references,
    format_location,
    refuse_unexpanded_env,
)

DOCUMENT_FIELDS = ("apiVersion", "kind", "metadata", "spec")
GRAPH_FIELDS = ("nodes",)
# Routing is decided at submission, so these fields cannot wait for a stage result.
NO_REFERENCE_FIELDS = ("taskType", "tags", "resources")


@dataclass(frozen=True)
class Form:
    """How a document lists its nodes, and the words its errors use for them.

    Both forms are parsed into the same nodes (a stage depends on the one before it);
    only the fields a user may write and the wording of what went wrong differ.
    """

    kind: str                     # "stage" or "node"
    fields: tuple[str, ...]       # the fields of one stage (or node)
    run_on_keys: tuple[str, ...]
    run_on_hint: str
    # Messages naming an earlier-node rule that was broken; formatted with target, name, ancestors, count.
    no_previous: str              # ${stage.result...} without exactly one dependency
    not_ancestor: str             # a reference to a node that may not have run
    run_on_too_late: str          # runOn naming a node that may not have run
    template_too_late: str        # a graph_template column reading such a node


STAGES = Form(
    kind="stage", fields=("name", "spec", "tags", "runOn"), run_on_keys=("stage",),
    run_on_hint="{stage: <name of an earlier stage>}",
    no_previous="the first stage has no previous stage",
    not_ancestor="stage {target!r} runs after this stage (stage {target_index} > {index}), "
                 "so its result does not exist yet",
    run_on_too_late="stage {target!r} does not run before this stage",
    template_too_late="stage {target!r} does not run before {name!r}")
GRAPH = Form(
    kind="node", fields=("name", "dependsOn", "spec", "tags", "runOn"), run_on_keys=("stage", "node"),
    run_on_hint="{node: <name of a node this one depends on>}",
    no_previous="${{stage.result...}} means the one node this node depends on, and {name!r} depends on {count}; "
                "name the node",
    not_ancestor="node {target!r} is not an ancestor of {name!r} (add it to dependsOn; ancestors: {ancestors})",
    run_on_too_late="node {target!r} is not an ancestor of {name!r}: it may still be running when this node starts",
    template_too_late="node {target!r} is not an ancestor of {name!r} (add it to dependsOn; ancestors: {ancestors})")


@dataclass(frozen=True)
class StageTemplate:
    """One stage: its merged spec (stage references still unresolved) and placement."""

    name: str
    index: int
    spec: dict[str, Any]
    run_on: str | None = None
    location: str = "spec"  # where this stage's own fields live in the document
    depends_on: tuple[str, ...] = ()   # the nodes it waits for (a stage: the one before it)
    ancestors: tuple[str, ...] = ()    # every node whose result it may reference (a stage: all before it)
    # The spec as parsed at submission (``app.core.task_spec.parse_task_spec``): routing reads it. None
    # when a reference holds a field it cannot be typed without (the worker parses it resolved).
    parsed: BaseTaskSpec | None = field(default=None, compare=False, repr=False)

    @property
    def task_type(self) -> str:
        return str(self.spec["taskType"])

    @property
    def tags(self) -> list[str]:
        return sorted(set(self.spec.get("tags") or []))


@dataclass(frozen=True)
class PipelineTemplate:
    name: str
    document: dict[str, Any]
    stages: tuple[StageTemplate, ...]  # graph nodes in dependency order
    form: Form = STAGES

    @property
    def is_graph(self) -> bool:
        """Written as ``spec.graph`` (what status reports and the stages' messages say)."""
        return self.form is GRAPH

    @property
    def stage_names(self) -> list[str]:
        return [stage.name for stage in self.stages]


def yaml_error_text(exc: yaml.YAMLError) -> str:
    """``line L, column C: problem (context at line L', column C')`` — 1-based, as an editor
    counts — for the CLI and the HTTP API alike."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if mark is None or not problem:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    text = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context:
        where = f" at line {context_mark.line + 1}, column {context_mark.column + 1}" if context_mark else ""
        text += f" ({context}{where})"
    return text


def parse_text(text: str | bytes, source: str = "document", *, strict_json: bool = False) -> Any:
    """The one reader of a document's text (the CLI, the Python API and the HTTP server): YAML or
    JSON (JSON is YAML); ``source`` names it in errors.

    ``strict_json`` (a ``.json`` file, an ``application/json`` body) parses with the JSON parser,
    so JSON with a YAML-only leniency (a trailing comma, say) is an error rather than a surprise.
    """
    try:
        if strict_json:
            try:
                return json.loads(text)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise SpecError(source, f"not valid JSON: {exc}") from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SpecError(source, f"not valid YAML or JSON: {yaml_error_text(exc)}") from None
    except RecursionError:  # deeper than the parser's own stack: far past MAX_NESTING_DEPTH
        raise LimitExceeded(source, f"nested deeper than {MAX_NESTING_DEPTH} levels "
                                    f"(MAX_NESTING_DEPTH={MAX_NESTING_DEPTH})") from None


def load_document(text: str | bytes, source: str = "document", *, strict_json: bool = False) -> dict[str, Any]:
    """``parse_text``, and the result must be a mapping."""
    document = parse_text(text, source, strict_json=strict_json)
    if not isinstance(document, dict):
        raise SpecError(source, f"must be a mapping, got {type(document).__name__}")
    return document


def load_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(str(path), f"cannot read: {exc.strerror or exc}") from None
    return load_document(text, str(path), strict_json=path.suffix.lower() == ".json")


def copy_data(value: Any) -> Any:
    """A deep copy of JSON data (dicts, lists, tuples of strings, numbers, booleans and None), as
    ``copy.deepcopy`` makes it in a third of the time (no memo to keep): documents are checked to
    be such data first (``normalise_document``) and copied on every submission."""
    if isinstance(value, dict):
        return {key: copy_data(item) for key, item in value.items()}
    if isinstance(value, list):
        return [copy_data(item) for item in value]
    if isinstance(value, tuple):
        return tuple(copy_data(item) for item in value)
    return value


def deep_merge(base: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """JSON Merge Patch (RFC 7386) of ``patch`` over ``base`` (JSON data); neither is modified."""
    merged: dict[str, Any] = copy_data(dict(base))
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        elif isinstance(value, Mapping):
            merged[key] = deep_merge({}, value)
        else:
            merged[key] = copy_data(value)
    return merged


def normalise_document(raw: Any, source: str = "document") -> dict[str, Any]:
    """The envelope, for every way in: a full document ``{apiVersion?, kind?, metadata?, spec}``,
    or a bare spec (with ``taskType``, ``stages`` or ``graph``) wrapped as ``{"spec": ...}``;
    unknown keys are errors. ``source`` names the whole document in errors (the server: body)."""
    if not isinstance(raw, Mapping):
        raise SpecError(source, f"must be a mapping (a task document or a spec), got {type(raw).__name__}")
    if "spec" not in raw and ("taskType" in raw or "stages" in raw or "graph" in raw):
        raw = {"spec": raw}
    for key in raw:
        if key not in DOCUMENT_FIELDS:
            raise SpecError(str(key), f"unknown field (expected {', '.join(DOCUMENT_FIELDS)})")
    if "spec" not in raw:
        raise SpecError("spec", "required")
    if not isinstance(raw["spec"], Mapping):
        raise SpecError("spec", f"must be a mapping, got {type(raw['spec']).__name__}")
    for key in ("apiVersion", "kind"):
        if key in raw and not isinstance(raw[key], str):
            raise SpecError(key, "must be a string")
    metadata = raw.get("metadata") or {}
    if not isinstance(metadata, Mapping):
        raise SpecError("metadata", "must be a mapping")
    if "name" in metadata and not isinstance(metadata["name"], str):
        raise SpecError("metadata.name", "must be a string")
    try:
        json.dumps(raw, allow_nan=False)
    except (TypeError, ValueError) as exc:
        found = _non_finite_number(raw, ())
        if found is not None:  # YAML .inf/.nan, JSON Infinity/NaN: name the field, as the spec would
            raise SpecError(format_location("", found[0]), f"Input should be a finite number, got {found[1]}") \
                from None
        raise SpecError("document", f"must be plain JSON data (strings, numbers, lists, mappings): {exc}") \
            from None
    return copy_data(dict(raw))  # JSON data: checked just above


def _non_finite_number(value: Any, path: FieldPath) -> tuple[FieldPath, float] | None:
    """The path and value of the first inf or NaN in a JSON-like value, if any."""
    if isinstance(value, float) and not math.isfinite(value):
        return path, value
    items = value.items() if isinstance(value, Mapping) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _non_finite_number(item, (*path, key))
        if found is not None:
            return found
    return None


def parse_pipeline(raw: Any, env: Mapping[str, str] | None = None,
                   expand_environment: bool = True) -> PipelineTemplate:
    """Validate a document and return its stages; raises ``SpecError`` naming the field.

    ``${env:NAME}`` is expanded from ``env`` (default ``os.environ``); with
    ``expand_environment=False`` (the HTTP server) environment references are errors.
    """
    check_document(raw, "document")  # depth, values and bytes (app.core.limits), before any recursion
    try:
        return _parse_pipeline(raw, env, expand_environment)
    except RecursionError:
        raise SpecError("document", "nested too deeply") from None


def _parse_pipeline(raw: Any, env: Mapping[str, str] | None, expand_environment: bool) -> PipelineTemplate:
    document = normalise_document(raw)
    _refuse_unsupported_task_types(document["spec"])  # before a placeholder of theirs could trip
    document = expand_env(document, (os.environ if env is None else env) if expand_environment else None, "")
    spec = document["spec"]
    if "stages" in spec and "graph" in spec:
        raise SpecError("spec.graph", "give either stages (a linear pipeline) or graph (a DAG), not both")
    shared = {key: value for key, value in spec.items() if key not in ("stages", "graph")}
    form, prefix, nodes_raw = _nodes_of(spec, shared)
    plain = prefix == "spec"  # a bare task spec: one stage, whose fields are the shared spec's
    check_stages(len(nodes_raw), prefix)
    names = _stage_names(nodes_raw, prefix, form.kind)
    if form is GRAPH:
        deps = read_dependencies(nodes_raw, names, prefix)
    else:  # a linear pipeline is the path graph: stage i depends on stage i-1
        deps = {name: tuple(names[index - 1:index]) for index, name in enumerate(names)}
    check_message_bytes(shared, nodes_raw, names)  # before a copy of the shared spec is made per stage
    ancestors = ancestors_of(deps)
    position = {name: index for index, name in enumerate(names)}
    stages = []
    for index, node_raw in enumerate(nodes_raw):
        name = names[index]
        location = "spec" if plain else f"{prefix}[{index}]"
        for key in node_raw:
            if key not in form.fields:
                raise SpecError(f"{location}.{key}", f"unknown field (expected {', '.join(form.fields)})")
        own_spec = node_raw.get("spec", {})
        if own_spec is None:
            own_spec = {}
        if not isinstance(own_spec, Mapping):
            raise SpecError(f"{location}.spec", "must be a mapping")
        merged = deep_merge(shared, own_spec)
        if "tags" in node_raw:
            tags = node_raw["tags"]
            if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
                raise SpecError(f"{location}.tags", "must be a list of tags")
            merged["tags"] = tags
        node_ancestors = tuple(sorted(ancestors[name], key=position.__getitem__))  # in document order
        run_on = _run_on(node_raw.get("runOn"), f"{location}.runOn", names, name, deps[name], node_ancestors, form)
        where = location if plain else f"{location}.spec"
        stage = StageTemplate(name, index, merged, run_on, where, deps[name], node_ancestors)
        parsed = _validate_stage(stage, own_spec, shared, names, plain, form)
        # Built again rather than dataclasses.replace'd: replace inspects the fields on every call.
        stages.append(StageTemplate(name, index, merged, run_on, where, deps[name], node_ancestors, parsed))
    order = topological_order(names, deps)
    stages = [stages[names.index(name)] for name in order]
    metadata = document.get("metadata") or {}
    return PipelineTemplate(str(metadata.get("name") or names[0]), document, tuple(stages), form)


def _nodes_of(spec: Mapping[str, Any], shared: Mapping[str, Any]) -> tuple[Form, str, list[Any]]:
    """The document's form, where its nodes are listed, and the nodes as written."""
    if "graph" in spec:
        return GRAPH, "spec.graph.nodes", _graph_nodes(spec["graph"])
    if "stages" not in spec:  # a bare task spec: one stage named after its task type
        name = str(shared.get("taskType") or "task")
        usable = NAME_RE.match(name) and name != PREVIOUS_STAGE
        return STAGES, "spec", [{"name": name if usable else "task", "spec": {}}]
    if not isinstance(spec["stages"], list) or not spec["stages"]:
        raise SpecError("spec.stages", "must be a non-empty list of stages")
    return STAGES, "spec.stages", spec["stages"]


# What a stage's message holds besides its spec: task name, ids, routing, argsrepr/kwargsrepr,
# and its ``pipeline`` kwarg, which lists every stage's name and task id.
SIGNATURE_BYTES = 2048
STAGE_ENTRY_BYTES = 64  # {"name": ..., "task_id": <uuid>} in each stage's pipeline kwarg, besides the name


def check_message_bytes(shared: Mapping[str, Any], stages_raw: list[Any], names: list[str]) -> None:
    """``LimitExceeded`` when the pipeline's messages could exceed ``MAX_MESSAGE_BYTES``.

    A chain's first message carries every later stage (a chord's header, its body), so
    every stage's spec — the shared spec merged with its own — must fit in one message
    together. Counted from the parts, before any stage spec or signature is built.
    """
    limit = get_settings().max_message_bytes
    count = len(stages_raw)
    shared_bytes = json_bytes(shared)
    own = sum(json_bytes(stage.get("spec")) + json_bytes(stage.get("tags")) for stage in stages_raw
              if isinstance(stage, Mapping))
    entries = count * sum(STAGE_ENTRY_BYTES + len(name) for name in names)
    total = count * (shared_bytes + SIGNATURE_BYTES) + own + entries
    if total > limit:
        copies = f"; each of the {count} stages carries its own copy of the shared spec ({shared_bytes} bytes)" \
            if count > 1 else ""
        raise LimitExceeded("spec", f"its messages would hold {total} bytes, more than {limit} "
                                    f"(MAX_MESSAGE_BYTES={limit}): a chain's first message carries every later "
                                    f"stage{copies}")


def _graph_nodes(graph: Any) -> list[Any]:
    if not isinstance(graph, Mapping):
        raise SpecError("spec.graph", "must be a mapping with nodes")
    for key in graph:
        if key not in GRAPH_FIELDS:
            raise SpecError(f"spec.graph.{key}", f"unknown field (expected {', '.join(GRAPH_FIELDS)})")
    nodes = graph.get("nodes")
    if not isinstance(nodes, list) or not nodes:
        raise SpecError("spec.graph.nodes", "must be a non-empty list of nodes {name, dependsOn, spec}")
    return nodes


def _refuse_unsupported_task_types(spec: Mapping[str, Any]) -> None:
    """``agent`` and ``rag`` (original task types needing outside services) are refused with
    their reason, ahead of anything else in the document (an unset ``${QDRANT_API_KEY}``, say)."""
    places: list[tuple[str, Any]] = [("spec", spec)]
    stages = spec.get("stages")
    if isinstance(stages, list):
        places += [(f"spec.stages[{i}].spec", s.get("spec")) for i, s in enumerate(stages) if isinstance(s, Mapping)]
    graph = spec.get("graph")
    nodes = graph.get("nodes") if isinstance(graph, Mapping) else None
    if isinstance(nodes, list):
        places += [(f"spec.graph.nodes[{i}].spec", n.get("spec")) for i, n in enumerate(nodes) if isinstance(n, Mapping)]
    for where, stage_spec in places:
        task_type = stage_spec.get("taskType") if isinstance(stage_spec, Mapping) else None
        if isinstance(task_type, str) and task_type in REFUSED_TASK_TYPES:
            raise SpecError(f"{where}.taskType", f"{task_type!r} {REFUSED_TASK_TYPES[task_type]}")


def _stage_names(stages_raw: list[Any], prefix: str, kind: str) -> list[str]:
    names: list[str] = []
    for index, stage in enumerate(stages_raw):
        where = f"{prefix}[{index}]"
        if not isinstance(stage, Mapping):
            raise SpecError(where, f"must be a mapping with name and spec, got {type(stage).__name__}")
        name = stage.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise SpecError(f"{where}.name", f"{name!r} is not 1-64 characters of [A-Za-z0-9_-]")
        if name == PREVIOUS_STAGE:
            raise SpecError(f"{where}.name", f"{name!r} is reserved: ${{stage.result...}} means the previous stage")
        if name in names:
            raise SpecError(f"{where}.name", f"duplicate {kind} name {name!r} (also {prefix}[{names.index(name)}])")
        names.append(name)
    return names


def _run_on(raw: Any, where: str, names: list[str], name: str, depends_on: tuple[str, ...],
            ancestors: tuple[str, ...], form: Form) -> str | None:
    """``runOn: {stage: X}``: X must be an ancestor (``stage``: the one dependency)."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or len(raw) != 1 or next(iter(raw)) not in form.run_on_keys:
        raise SpecError(where, f"must be {form.run_on_hint}")
    key, target = next(iter(raw.items()))
    if target == PREVIOUS_STAGE and len(depends_on) == 1:
        return depends_on[0]
    if target not in names:
        raise SpecError(f"{where}.{key}", f"unknown {form.kind} {target!r} ({form.kind}s: {', '.join(names)})")
    if target not in ancestors:
        raise SpecError(f"{where}.{key}", form.run_on_too_late.format(target=target, name=name))
    return str(target)


def _has_path(value: Any, path: FieldPath) -> bool:
    for key in path:
        if isinstance(value, Mapping) and str(key) in value:
            value = value[str(key)]
        elif isinstance(value, list) and isinstance(key, int) and 0 <= key < len(value):
            value = value[key]
        else:
            return False
    return True


def _validate_stage(stage: StageTemplate, own_spec: Mapping[str, Any], shared: Mapping[str, Any],
                    names: list[str], plain: bool, form: Form) -> BaseTaskSpec | None:
    """References first, then the merged spec with reference-holding fields left to the worker."""

    def locate(path: FieldPath) -> str:
        # A field the stage inherits is named in the shared spec; anything else, in the stage.
        inherited = not plain and not _has_path(own_spec, path) and _has_path(shared, path)
        return format_location("spec" if inherited else stage.location, path)

    refs = find_references(stage.spec, locate)
    for path, where, ref in refs:
        if path and path[0] in NO_REFERENCE_FIELDS:
            raise SpecError(where, f"{ref.text}: references are not allowed in {path[0]} "
                                   "(routing is decided at submission)")
    check_references(refs, names, stage, form)
    ref_paths = {".".join(map(str, path)) for path, _, _ in refs}
    data = stage.spec.get("data")
    if isinstance(data, Mapping) and data.get("type") == "graph_template":
        check_template(data, lambda name: _unreadable(name, stage, names, plain, form), locate(("data",)))

    def held_by_reference(dotted: str) -> bool:
        return any(dotted == p or dotted.startswith(p + ".") for p in ref_paths)

    def locate_dotted(dotted: str) -> str:
        return locate(tuple(int(p) if p.isdigit() else p for p in dotted.split(".")) if dotted else ())

    return parse_task_spec(stage.spec, stage.location, unresolved=held_by_reference, locate=locate_dotted)


def _rule_broken(message: str, target: str, stage: StageTemplate, names: list[str]) -> str:
    return message.format(target=target, name=stage.name, ancestors=", ".join(stage.ancestors) or "none",
                          count=len(stage.depends_on), index=stage.index,
                          target_index=names.index(target) if target in names else -1)


def check_references(refs: list[tuple[FieldPath, str, Reference]], names: list[str], stage: StageTemplate,
                     form: Form) -> None:
    """A stage may reference any ancestor; ``${stage.result...}`` is its one dependency."""
    for _path, where, ref in refs:
        refuse_unexpanded_env(ref, where)
        if ref.stage == PREVIOUS_STAGE:
            if len(stage.depends_on) != 1:
                raise SpecError(where, f"{ref.text}: {_rule_broken(form.no_previous, ref.stage, stage, names)}")
            continue
        if ref.stage not in names:
            raise SpecError(where, f"unknown {form.kind} {ref.stage!r} in {ref.text} "
                                   f"({form.kind}s: {', '.join(names)})")
        if ref.stage == stage.name:
            raise SpecError(where, f"{ref.text}: a {form.kind} cannot refer to its own result")
        if ref.stage not in stage.ancestors:
            raise SpecError(where, f"{ref.text}: {_rule_broken(form.not_ancestor, ref.stage, stage, names)}")


def _unreadable(name: str, stage: StageTemplate, names: list[str], plain: bool, form: Form) -> str | None:
    """Why a ``graph_template`` column cannot read node (or stage) ``name``; ``None`` if it can."""
    if plain:
        return "graph_template builds prompts from earlier nodes' results: use it in a graph node (or a stage)"
    if name not in names:
        return f"unknown {form.kind} {name!r} ({form.kind}s: {', '.join(names)})"
    if name not in stage.ancestors:
        return _rule_broken(form.template_too_late, name, stage, names)
    return None
