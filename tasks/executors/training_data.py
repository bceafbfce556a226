"""Training examples from the spec's ``data`` section, tokenised for causal-LM fine-tuning.

Sources (``spec.data``): ``prompts`` (strings, or ``{prompt, response}`` pairs), a
local ``.jsonl``/``.json``/``.csv`` file or a cached HF dataset (``path``) with
``prompt_column`` + ``response_column`` or ``text_field``, or a file at ``url``.

An example with a response is ``prompt`` followed by ``separator + response + eos``.
The two parts are tokenised separately, so the prompt's tokens are exactly what an
inference request with that prompt feeds the model, and the loss covers only the
second part: the model learns to answer, not to repeat the question. A plain
text example (``text_field``, a bare string) is trained on every token, plus eos.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.errors import ExecutorError, SpecError
from app.spec import PromptPair, TrainingData
from tasks.executors.data import column, read_records

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


def load_examples(data: TrainingData, local_path: str | None = None) -> list[Example]:
    """Examples for ``data``; ``local_path`` replaces ``data.path`` (a downloaded ``data.url``)."""
    if data.prompts:
        examples = examples_from_prompts(data)
    else:
        source = local_path or data.path
        if not source:
            raise SpecError("spec.data.path", "give prompts, a dataset path or a url")
        rows = read_records(source, field="spec.data.url" if local_path else "spec.data.path",
                            split=data.split, name=data.name)
        examples = examples_from_rows(rows, data)
    if data.max_samples is not None:
        examples = examples[: data.max_samples]
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
