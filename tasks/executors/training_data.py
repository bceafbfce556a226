"""Training examples from the spec's ``data`` section, tokenised for causal-LM fine-tuning.

Sources (``spec.data``): ``prompts`` (strings, or ``{prompt, response}`` pairs); a table
— ``path``, ``url`` (a local path, a hub id or an http(s) URL) or ``dataset_name`` (a
hub id in the local cache, or a local path), with ``name``/``config_name`` and
``split`` slicing (``tasks.executors.data``) — read through ``prompt_column`` +
``response_column`` or ``text_field``; or a JSONL file ``jsonl.{path | url}`` (an
earlier stage's ``jsonl_export``, say) read through ``prompt_field`` +
``response_field`` or ``text_field``. ``shuffle`` + ``seed`` and ``max_samples`` apply
to every source.

An example with a response is ``prompt`` followed by ``separator + response + eos``.
The two parts are tokenised separately, so the prompt's tokens are exactly what an
inference request with that prompt feeds the model, and the loss covers only the
second part: the model learns to answer, not to repeat the question. A plain
text example (``text_field``, a bare string) is trained on every token, plus eos.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app.core.errors import ExecutorError, SpecError
from app.core.task_spec import PromptPair, TrainingData
from tasks.executors.data import column, read_records, sample

IGNORE_INDEX = -100  # label value the loss skips


@dataclass(frozen=True)
class Example:
    prompt: str  # context, not trained on ("" for plain text)
    completion: str  # trained on


def examples_from_prompts(data: TrainingData) -> list[Example]:
    found = []
    for item in data.prompts or []:
        if isinstance(item, PromptPair) and item.response:
            found.append(Example(item.prompt, data.separator + item.response))
        else:
            found.append(Example("", item.prompt if isinstance(item, PromptPair) else item))
    return found


def examples_from_rows(rows: list[dict[str, Any]], data: TrainingData) -> list[Example]:
    if data.text_field:
        return [Example("", text) for text in column(rows, data.text_field, "spec.data.text_field")]
    prompts = column(rows, data.prompt_column, "spec.data.prompt_column")
    if data.response_column is None:
        return [Example("", text) for text in prompts]
    responses = column(rows, data.response_column, "spec.data.response_column")
    return [Example(p, data.separator + r) if r else Example("", p) for p, r in zip(prompts, responses, strict=True)]


def examples_from_jsonl(rows: list[dict[str, Any]], data: TrainingData) -> list[Example]:
    source = data.jsonl
    assert source is not None
    if source.text_field:
        return [Example("", text) for text in column(rows, source.text_field, "spec.data.jsonl.text_field")]
    prompts = column(rows, source.prompt_field or "prompt", "spec.data.jsonl.prompt_field")
    response_field = source.response_field or ("response" if rows and "response" in rows[0] else None)
    if response_field is None:
        return [Example("", text) for text in prompts]
    responses = column(rows, response_field, "spec.data.jsonl.response_field")
    return [Example(p, data.separator + r) if r else Example("", p) for p, r in zip(prompts, responses, strict=True)]


def read_source_rows(data: TrainingData, fetch: Callable[[str], str] = str) -> list[dict[str, Any]]:
    """The rows of ``data``'s jsonl file or table (not ``prompts``/``preferences``), sliced by ``split``."""
    if data.jsonl is not None:
        field = "spec.data.jsonl.url" if data.jsonl.url else "spec.data.jsonl.path"
        source = str(data.jsonl.url or data.jsonl.path)
        local = fetch(source) if source.startswith(("http://", "https://")) else source
        if not local.lower().endswith(".jsonl"):
            raise SpecError(field, f"{source!r} is not a .jsonl file")
        return read_records(local, field=field, split=data.split)
    field = ("spec.data.url" if data.url else "spec.data.path" if data.path
             else "spec.data.dataset_name")
    source = str(data.url or data.path or data.dataset_name)
    local = fetch(source) if source.startswith(("http://", "https://")) else source
    return read_records(local, field=field, split=data.split, name=data.name)


def load_examples(data: TrainingData, fetch: Callable[[str], str] = str) -> list[Example]:
    """Examples for ``data`` (an ``SftData``: preference pairs were refused by the spec); ``fetch(url)``
    downloads an http(s) URL and returns the local file."""
    if data.prompts:
        examples = examples_from_prompts(data)
    elif data.jsonl is not None:
        examples = examples_from_jsonl(read_source_rows(data, fetch), data)
    else:
        examples = examples_from_rows(read_source_rows(data, fetch), data)
    examples = sample(examples, shuffle=data.shuffle, seed=data.seed, max_samples=data.max_samples)
    if not examples:
        raise SpecError("spec.data", "no training examples")
    return examples


def tokenize_examples(examples: list[Example], tokenizer: Any, max_seq_length: int) -> list[dict[str, list[int]]]:
    """``input_ids`` + ``labels`` per example (prompt masked, eos appended, truncated)."""
    eos = tokenizer.eos_token_id
    rows = []
    for example in examples:
        if example.prompt:
            prompt_ids = list(tokenizer(example.prompt)["input_ids"])
            completion_ids = list(tokenizer(example.completion, add_special_tokens=False)["input_ids"])
        else:
            prompt_ids = []
            completion_ids = list(tokenizer(example.completion)["input_ids"])
        if eos is not None and (not completion_ids or completion_ids[-1] != eos):
            completion_ids.append(eos)
        input_ids = (prompt_ids + completion_ids)[:max_seq_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:max_seq_length]
        if all(label == IGNORE_INDEX for label in labels):
            continue  # the prompt alone fills max_seq_length: nothing to learn from
        rows.append({"input_ids": input_ids, "labels": labels})
    if not rows:
        raise ExecutorError("spec.training.max_seq_length: every example's prompt is at least "
                            f"{max_seq_length} tokens long, nothing left to train on")
    return rows


def pack_rows(rows: list[dict[str, list[int]]], max_seq_length: int) -> list[dict[str, list[int]]]:
    """``packing``: every example's tokens (each ending in eos) laid end to end and cut into
    blocks of ``max_seq_length``, so no step is spent on padding. Labels keep their masks
    (prompts still cost no loss); attention spans example boundaries, as in plain packing."""
    input_ids = [token for row in rows for token in row["input_ids"]]
    labels = [label for row in rows for label in row["labels"]]
    packed = []
    for start in range(0, len(input_ids), max_seq_length):
        block_labels = labels[start:start + max_seq_length]
        if any(label != IGNORE_INDEX for label in block_labels):
            packed.append({"input_ids": input_ids[start:start + max_seq_length], "labels": block_labels})
    return packed


class PaddingCollator:
    """Right-pads ``input_ids`` with the pad token and ``labels`` with ``IGNORE_INDEX``."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(row["input_ids"]) for row in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for i, row in enumerate(batch):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.tensor(row["input_ids"], dtype=torch.long)
            labels[i, :n] = torch.tensor(row["labels"], dtype=torch.long)
            attention[i, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}
