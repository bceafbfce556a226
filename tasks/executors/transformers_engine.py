"""The transformers backend of the inference executor: ``model.generate`` in micro-batches.

``InferenceExecutor`` (``tasks/executors/inference.py``) reads, renders and tokenizes the
prompts; ``plan_batches`` groups them, longest first, under a token budget
(``auto_limits``: a fixed one on CPU, the KV cache that fits in free GPU memory on CUDA),
and ``generate`` runs one micro-batch with left padding, each row's own attention mask,
eos and stop strings (``cut_at_stop``, which the vLLM path uses too, so both engines give
the same text for the same tokens). The model comes from the worker's ``ModelCache``
(``tasks/executors/models.py``); ``tasks/executors/vllm_engine.py`` is the other backend.

torch and transformers are imported inside functions only: the worker's parent process
imports this module and must never import them.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

from app.core.task_spec import InferenceOptions
from tasks.executors.models import LoadedModel

# Automatic batch size: rows per batch are capped by a token budget (prompt + new
# tokens of the longest row), so long prompts get smaller batches.
CPU_MAX_BATCH = 32
CPU_TOKEN_BUDGET = 16_384
CUDA_MAX_BATCH = 256
CUDA_MEMORY_FRACTION = 0.5  # of free GPU memory, for the KV cache of one batch


def plan_batches(lengths: Sequence[int], max_new_tokens: int, batch_size: int | None = None,
                 *, max_batch: int = CPU_MAX_BATCH, token_budget: int = CPU_TOKEN_BUDGET,
                 ) -> list[list[int]]:
    """Indices of the prompts in each micro-batch, longest prompts first.

    A fixed ``batch_size`` gives batches of that many rows; without one a batch grows
    while ``rows × (longest prompt + max_new_tokens)`` fits ``token_budget`` and it
    has at most ``max_batch`` rows. Sorting by length keeps padding small.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if batch_size is not None:
        return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        # The first row of a batch is its longest (descending order).
        longest = lengths[current[0]] if current else lengths[index]
        if current and (len(current) >= max_batch
                        or (len(current) + 1) * (longest + max_new_tokens) > token_budget):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the earliest stop string (excluded), and whether one was found."""
    cut = min((pos for pos in (text.find(s) for s in stops if s) if pos >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@cache
def _stop_criteria_class() -> Any:
    """A transformers ``StoppingCriteria`` that ends a row once its new text holds a stop string."""
    import torch
    from transformers import StoppingCriteria

    class StopOnStrings(StoppingCriteria):  # type: ignore[misc]
        def __init__(self, tokenizer: Any, stops: Sequence[str], prompt_len: int) -> None:
            self.tokenizer = tokenizer
            self.stops = [s for s in stops if s]
            self.prompt_len = prompt_len
            # A stop string of n bytes spans at most n tokens; a few more for split characters.
            self.window = max(len(s.encode("utf-8")) for s in self.stops) + 4
            self.stopped_at: dict[int, int] = {}  # row → number of new tokens when it stopped

        def __call__(self, input_ids: Any, scores: Any, **_: Any) -> Any:
            length = input_ids.shape[1]
            start = max(self.prompt_len, length - self.window)
            flags = []
            for row, tail_ids in enumerate(input_ids[:, start:].tolist()):  # one device→host copy
                if row not in self.stopped_at:
                    tail = self.tokenizer.decode(tail_ids, skip_special_tokens=True)
                    if any(s in tail for s in self.stops):
                        self.stopped_at[row] = length - self.prompt_len
                flags.append(row in self.stopped_at)
            return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)

    return StopOnStrings


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in eos} if isinstance(eos, list | tuple) else {int(eos)}


def auto_limits(loaded: LoadedModel) -> tuple[int, int]:
    """(max rows, token budget) of a batch when ``batch_size`` is not given."""
    import torch

    model = loaded.model
    device = model.device
    if device.type != "cuda":
        return CPU_MAX_BATCH, CPU_TOKEN_BUDGET
    config = model.config
    layers = int(getattr(config, "num_hidden_layers", 32))
    heads = int(getattr(config, "num_attention_heads", 32))
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    kv_bytes_per_token = 2 * layers * kv_heads * head_dim * model.dtype.itemsize
    free_bytes, _total = torch.cuda.mem_get_info(device)
    budget = int(free_bytes * CUDA_MEMORY_FRACTION // max(kv_bytes_per_token, 1))
    return CUDA_MAX_BATCH, max(budget, 1)


def generate(rows: Sequence[Sequence[int]], options: InferenceOptions,
              loaded: LoadedModel) -> list[tuple[str, str, int]]:
    """``(output text, finish_reason, new tokens)`` for each row of one micro-batch."""
    import torch

    model, tokenizer = loaded.model, loaded.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, ids in enumerate(rows):  # left padding: every row ends where generation starts
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    kwargs: dict[str, Any] = {"max_new_tokens": options.max_new_tokens, "do_sample": options.sampling,
                              "pad_token_id": pad_id}
    if options.sampling:
        kwargs.update(temperature=options.temperature, top_p=options.top_p, top_k=options.top_k)
    if options.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = options.repetition_penalty
    if options.ignore_eos:  # every row generates max_new_tokens (benchmarks)
        kwargs["min_new_tokens"] = options.max_new_tokens
    eos = set() if options.ignore_eos else _eos_ids(model, tokenizer)
    if not getattr(model.generation_config, "eos_token_id", None) and eos:
        kwargs["eos_token_id"] = sorted(eos)
    stops = [s for s in options.stop if s]
    criteria = _stop_criteria_class()(tokenizer, stops, width) if stops else None
    if criteria is not None:
        kwargs["stopping_criteria"] = [criteria]
    with torch.inference_mode():
        output = model.generate(input_ids=input_ids.to(model.device),
                                attention_mask=attention_mask.to(model.device), **kwargs)
    new_tokens = output[:, width:].tolist()
    results = []
    for row, tokens in enumerate(new_tokens):
        # HF fills a finished row with pad tokens: only what came before its end counts.
        end = len(tokens)
        if criteria is not None and row in criteria.stopped_at:
            end = min(end, criteria.stopped_at[row])
        eos_at = next((i for i, t in enumerate(tokens[:end]) if t in eos), None)
        if eos_at is not None:
            end = eos_at + 1
        # Decoded as ``tokenizer.decode(generate(...)[0, prompt_len:], skip_special_tokens=True)``
        # would: the eos token is special (and dropped) in every real tokenizer.
        text = tokenizer.decode(tokens[:end], skip_special_tokens=True)
        text, stopped = cut_at_stop(text, stops)
        reason = "stop" if stopped or eos_at is not None else "length"
        results.append((text, reason, end))
    return results
