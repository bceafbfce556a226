"""Data of the ``dpo`` and ``ppo`` tasks: preference pairs and rollout prompts.

``dpo`` trains on ``{prompt, chosen, rejected}`` pairs from ``data.preferences``, a JSONL
file (``data.jsonl`` with ``prompt_field``/``chosen_field``/``rejected_field``, by default
the columns ``prompt``, ``chosen``, ``rejected``: what an earlier stage's ``jsonl_export``
writes), or a table (``path``, ``url``, ``dataset_name`` with ``prompt_column``,
``chosen_column``, ``rejected_column``). Each answer is ``separator + answer``, as an
sft response is, so a prompt means the same to both task types.

``ppo`` generates from prompts: ``data.prompts`` (strings, or pairs whose response is
ignored), a JSONL file's ``query_field`` (by default ``query`` where the file has it,
else ``prompt_field`` or ``prompt``), or a table's ``query_column`` (else ``prompt_column``).

Every row must have every field, non-empty: a missing one is an error naming the spec
field and the row, never a silently shorter dataset.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app.core.errors import SpecError
from app.core.task_spec import PromptPair, TrainingData
from tasks.executors.data import sample
from tasks.executors.training_data import read_source_rows


@dataclass(frozen=True)
class Preference:
    prompt: str
    chosen: str  # with the separator in front
    rejected: str


def _field_values(rows: list[dict[str, Any]], name: str, field: str) -> list[str]:
    """Column ``name`` of every row, each a non-empty string; any other value (missing, empty, a
    list, a number, a boolean) is an error naming the field and the row, never converted."""
    if not rows:
        raise SpecError(field, "the dataset has no rows")
    values = []
    for index, row in enumerate(rows):
        value = row.get(name)
        if value is None or value == "":
            columns = ", ".join(map(str, row)) or "none"
            raise SpecError(field, f"row {index} has no {name!r} (its columns: {columns})")
        if not isinstance(value, str):
            shown = json.dumps(value)
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            raise SpecError(field, f"row {index}: {name!r} must be a non-empty string, got "
                                   f"{type(value).__name__} {shown}")
        values.append(value)
    return values


def _source_names(data: TrainingData, names: tuple[str, str, str]) -> list[tuple[str, str]]:
    """``(column, spec field)`` for prompt/chosen/rejected of a jsonl file or a table."""
    if data.jsonl is not None:
        given = (data.jsonl.prompt_field, data.jsonl.chosen_field, data.jsonl.rejected_field)
        return [(value or default, f"spec.data.jsonl.{what}_field")
                for value, default, what in zip(given, names, ("prompt", "chosen", "rejected"), strict=True)]
    given = (data.prompt_column, data.chosen_column, data.rejected_column)
    return [(value or default, f"spec.data.{what}_column")
            for value, default, what in zip(given, names, ("prompt", "chosen", "rejected"), strict=True)]


def load_preferences(data: TrainingData, fetch: Callable[[str], str] = str) -> list[Preference]:
    """The preference pairs of a ``dpo`` task (its ``DpoData``: prompts and plain text were refused
    by the spec); ``fetch(url)`` downloads an http(s) URL."""
    if data.preferences:
        pairs = [Preference(p.prompt, data.separator + p.chosen, data.separator + p.rejected)
                 for p in data.preferences]
    else:
        rows = read_source_rows(data, fetch)
        (prompt, prompt_field), (chosen, chosen_field), (rejected, rejected_field) = \
            _source_names(data, ("prompt", "chosen", "rejected"))
        prompts = _field_values(rows, prompt, prompt_field)
        chosen_values = _field_values(rows, chosen, chosen_field)
        rejected_values = _field_values(rows, rejected, rejected_field)
        pairs = [Preference(p, data.separator + c, data.separator + r)
                 for p, c, r in zip(prompts, chosen_values, rejected_values, strict=True)]
    pairs = sample(pairs, shuffle=data.shuffle, seed=data.seed, max_samples=data.max_samples)
    if not pairs:
        raise SpecError("spec.data", "no preference pairs")
    return pairs


def load_queries(data: TrainingData, fetch: Callable[[str], str] = str) -> list[str]:
    """The prompts a ``ppo`` task generates from (its ``PpoData``: preference pairs were refused by the spec)."""
    if data.prompts:
        queries = [item.prompt if isinstance(item, PromptPair) else item for item in data.prompts]
    else:
        rows = read_source_rows(data, fetch)
        if data.jsonl is not None:
            default = "query" if rows and "query" in rows[0] else (data.jsonl.prompt_field or "prompt")
            name = data.jsonl.query_field or default
            field = "spec.data.jsonl.query_field" if data.jsonl.query_field or name == "query" \
                else "spec.data.jsonl.prompt_field"
        else:
            name = data.query_column or data.prompt_column
            field = "spec.data.query_column" if data.query_column else "spec.data.prompt_column"
        queries = _field_values(rows, name, field)
    queries = sample(queries, shuffle=data.shuffle, seed=data.seed, max_samples=data.max_samples)
    if not queries:
        raise SpecError("spec.data", "no prompts")
    return queries
