"""``data: {type: graph_template}`` (pure): inference prompts built from earlier nodes' results.

A template has ``columns[] {label, node, path | expr, default}``: each column's value
is read from the result of ``node`` (an ancestor of the node, or an earlier stage)
at ``path`` (dotted, list indices as ``.0`` or ``[0]``; a leading ``result.`` is
allowed, as in ``${node.result.path}``); ``expr`` is the same written as
``<node>.<path>``. Values that are not strings are written as JSON.

* ``name: two_column_briefing`` (the default without ``text``): one prompt,
  ``options.intro`` (a line or a list of lines), one ``• <label>: <value>`` line per
  column, then ``options.closing``. Without an intro or closing, the original
  system's wording (``options.role``, "energy strategist" unless given).
* ``text`` with ``{<label>}`` placeholders (also ``{col0_label}`` / ``{col0_value}``):
  one prompt, ``text`` with each placeholder replaced; unknown placeholders stay.

A column whose path holds ``[*]`` (``items[*].output``) is a list: then one prompt is
built per row (row ``i`` of every such column; the others repeat), e.g. a briefing
per question when two branches answered the same questions. All such columns must
have the same length.

The worker turns the data into ``{type: list, items: <prompts>}`` just before the
inference runs (``pipelines.resolver``), so the prompts are each result item's
``prompt``: a user sees what was asked.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from app.core.errors import SpecError

DEFAULT_TEMPLATE = "two_column_briefing"
TEMPLATES = (DEFAULT_TEMPLATE,)
WILDCARD = "*"
_DEFAULT_ROLE = "energy strategist"
_INDEX_RE = re.compile(r"\[(-?\d+|\*)\]")


def column_source(column: Mapping[str, Any]) -> tuple[str, tuple[str, ...]] | None:
    """``(node, path)`` of a column (from ``node`` + ``path`` or from ``expr``), or ``None``."""
    expr = column.get("expr")
    if isinstance(expr, str) and expr.strip():
        parts = split_path(expr.strip())
        return (parts[0], parts[1:]) if parts else None
    node, path = column.get("node"), column.get("path")
    if isinstance(node, str) and node:
        return node, split_path(path) if isinstance(path, str) else ()
    return None


def split_path(path: str) -> tuple[str, ...]:
    return tuple(part for part in _INDEX_RE.sub(r".\1", path).split(".") if part)


def check_template(data: Mapping[str, Any], known: Callable[[str], str | None], location: str) -> None:
    """Submission-time checks; ``known(node)`` returns why ``node`` cannot be read, or ``None``."""
    template = data.get("template")
    if not isinstance(template, Mapping):
        return  # the data model reports it
    name, text = template.get("name"), template.get("text")
    columns = template.get("columns") or []
    where = f"{location}.template"
    if not (isinstance(text, str) and text.strip()) and (name or DEFAULT_TEMPLATE) not in TEMPLATES:
        raise SpecError(f"{where}.name", f"unknown template {name!r}: give one of {', '.join(TEMPLATES)}, "
                                         "or a text with {label} placeholders")
    if not columns:
        raise SpecError(f"{where}.columns", "must list at least one column {label, node, path}")
    if (name or DEFAULT_TEMPLATE) == DEFAULT_TEMPLATE and not text and len(columns) < 2:
        raise SpecError(f"{where}.columns", "two_column_briefing needs at least two columns")
    for index, column in enumerate(columns):
        source = column_source(column)
        column_where = f"{where}.columns[{index}]"
        if source is None:
            raise SpecError(column_where, "needs node and path, or expr (<node>.<path>)")
        problem = known(source[0])
        if problem:
            field = "expr" if column.get("expr") else "node"
            raise SpecError(f"{column_where}.{field}", problem)


def _lookup(result: Any, path: tuple[str, ...], what: str) -> Any:
    if path and path[0] == "result" and not (isinstance(result, Mapping) and "result" in result):
        path = path[1:]
    value = result
    walked = what
    for position, part in enumerate(path):
        if part == WILDCARD:
            if not isinstance(value, list):
                raise LookupError(f"{walked} is not a list, so [*] does not apply")
            return [_lookup(item, path[position + 1:], f"{walked}[{i}]") for i, item in enumerate(value)]
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, list) and re.fullmatch(r"-?\d+", part) and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        else:
            raise LookupError(f"{walked} has no {part!r}")
        walked = f"{walked}.{part}"
    return value


def as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float | bool):
        return str(value)
    return json.dumps(value, ensure_ascii=False)


def _lines(option: Any) -> list[str]:
    if option is None or option == "":
        return []
    return [str(x) for x in option] if isinstance(option, list) else [str(option)]


def _column_line(label: str, value: str) -> str:
    return f"• {label}: {value.replace(chr(13) + chr(10), chr(10)).strip().replace(chr(10), chr(10) + '  ')}"


def render_briefing(columns: list[tuple[str, str]], options: Mapping[str, Any]) -> str:
    lines = _lines(options.get("intro"))
    if not lines:
        role = str(options.get("role") or _DEFAULT_ROLE)
        article = "an" if role[:1].lower() in "aeiou" else "a"
        lines = [f"You are {article} {role}. Combine the following factor analyses side by side",
                 "and produce a concise, comparative briefing:"]
    lines += [_column_line(label, value) for label, value in columns]
    closing = _lines(options.get("closing"))
    if not closing:
        closing = ["Present them as a two-column style summary with actionable recommendations that",
                   f"weigh the {columns[0][0].lower()} against the {columns[1][0].lower()}."]
    return "\n".join(lines + closing)


class _KeepMissing(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def render_text(text: str, columns: list[tuple[str, str]]) -> str:
    mapping = _KeepMissing()
    for index, (label, value) in enumerate(columns):
        mapping[label] = value
        mapping[f"col{index}_label"] = label
        mapping[f"col{index}_value"] = value
    try:
        return text.format_map(mapping)
    except (ValueError, IndexError, AttributeError, KeyError):
        # Braces that are not placeholders (a JSON example in the text): replace literally.
        for key, value in mapping.items():
            text = text.replace("{" + key + "}", value)
        return text


def build_prompts(data: Mapping[str, Any], results: Callable[[str], Any], location: str) -> list[str]:
    """The prompts of a ``graph_template`` data section; ``results(node)`` is a node's result."""
    template = data["template"]
    options = template.get("options") or {}
    labelled: list[tuple[str, Any]] = []
    for index, column in enumerate(template.get("columns") or []):
        label = str(column.get("label") or f"Column {index + 1}").strip()
        source = column_source(column)
        where = f"{location}.template.columns[{index}]"
        if source is None:
            raise SpecError(where, "needs node and path, or expr (<node>.<path>)")
        node, path = source
        try:
            value = _lookup(results(node), path, f"{node}.result")
        except LookupError as exc:
            value = None
            if "default" not in column or column.get("default") is None:
                raise SpecError(where, f"{node}.{'.'.join(path)}: {exc.args[0] if exc.args else exc}") from None
        if value is None:
            if column.get("default") is None:
                raise SpecError(where, f"{node}.{'.'.join(path)} is null (give the column a default)")
            value = column["default"]
        labelled.append((label, value))
    rows = {len(v) for (_, v), column in zip(labelled, template["columns"], strict=True)
            if WILDCARD in (column_source(column) or ("", ()))[1] and isinstance(v, list)}
    if len(rows) > 1:
        raise SpecError(f"{location}.template.columns", f"[*] columns have different lengths: {sorted(rows)}")
    count = rows.pop() if rows else None
    wild = [WILDCARD in (column_source(c) or ("", ()))[1] for c in template["columns"]]
    prompts = []
    for row in range(count if count is not None else 1):
        columns = [(label, as_text(value[row] if is_wild else value))
                   for (label, value), is_wild in zip(labelled, wild, strict=True)]
        text = template.get("text")
        if isinstance(text, str) and text.strip():
            prompts.append(render_text(text, columns))
        else:
            prompts.append(render_briefing(columns, options))
    if not prompts:
        raise SpecError(f"{location}.template.columns", "the [*] columns are empty lists: no prompt to build")
    return prompts


def expand_graph_template(spec: Any, results: Callable[[str], Any], location: str) -> Any:
    """``spec`` with ``data: {type: graph_template}`` replaced by the list of prompts it builds."""
    data = spec.get("data") if isinstance(spec, Mapping) else None
    if not isinstance(data, Mapping) or data.get("type") != "graph_template":
        return spec
    if not isinstance(data.get("template"), Mapping):
        raise SpecError(f"{location}.data.template", "required for type 'graph_template'")
    prompts = build_prompts(data, results, f"{location}.data")
    kept = {k: v for k, v in data.items() if k == "notes"}
    return {**spec, "data": {**kept, "type": "list", "items": prompts}}
