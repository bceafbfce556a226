"""The inference executor: batched Hugging Face generation with a warm model cache.

``InferenceExecutor.run`` reads the prompts (``data: {type: list, items}`` or a
dataset), renders them (``system_prompt``, chat template), tokenizes them once,
sorts them by length and generates in micro-batches with left padding
(``tasks/executors/transformers_engine.py``); results come back in input order.
With ``do_sample: false`` every output is exactly what ``model.generate`` gives for
that prompt alone: each row's attention mask and position ids ignore its padding,
and the transformers Llama-style models give the same tokens batched or not (the
tests check it on prompts of very different lengths). Usage counts real tokens
only, never padding.

The model comes from the worker's ``ModelCache`` (``tasks/executors/models.py``): the second
task on the same model skips loading; ``model_cache`` in the result says whether
it was a hit, how long loading took and how many loads the process has done.

The same entry runs a task (or one shard of it) on vLLM where the worker has it and
the spec asks for it (``select_backend``: ``inference.backend``, ``model.vllm``):
prompts are rendered and tokenized here exactly as for transformers and
``tasks/executors/vllm_engine.py`` generates from the token ids; the result has the
same shape, with ``backend`` saying which engine ran.

torch, transformers and vLLM are imported inside functions only: the worker's parent
process imports this module and must never import them.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.artifacts.checkpoints import download_file, fetch_checkpoint
from app.core.data_roots import allowed_path
from app.core.engines import vllm_installed
from app.core.errors import ExecutorError, SpecError
from app.core.task_spec import CheckpointLoad, InferenceOptions, InferenceTaskSpec, TaskSpec, spec_as
from app.core.task_spec.schema import AdapterSpec
from tasks.executors.data import column, read_records, sample
from tasks.executors.jsonl_export import write_export
from tasks.executors.models import (
    CHECKPOINT_FIELD,
    MODEL_CACHE,
    ModelCache,
    check_model_dir,
    device_map_for,
    is_adapter_dir,
)
from tasks.executors.progress import Progress
from tasks.executors.shards import PromptRange
from tasks.executors.transformers_engine import auto_limits, cut_at_stop, plan_batches
from tasks.executors.transformers_engine import generate as transformers_generate
from tasks.executors.vllm_engine import (
    CPU_CHUNK,
    CUDA_CHUNK,
    VLLM_CACHE,
    EngineUnavailable,
    VllmEngineCache,
    engine_device,
    engine_version,
)
from tasks.executors.vllm_engine import generate as vllm_generate

log = logging.getLogger(__name__)

# -- pure helpers ------------------------------------------------------------------------
def generate_in_batches(batches: Sequence[list[int]],
                        generate: Callable[[list[int]], Sequence[tuple[str, str, int]]],
                        encoded: Sequence[Sequence[int]], data: Prompts, offset: int, progress: Progress,
                        started: float, merged: MergedPrompts | None = None) -> dict[str, Any]:
    """Run ``generate`` (a backend's: prompt indices → ``(text, finish_reason, new tokens)``
    each) over ``batches`` with a cancel check and a progress report per batch; the
    result's ``items``, ``usage`` and speed fields, the same for every backend. With
    ``merged`` (several tasks' prompts), the prompts of a task cancelled meanwhile are
    left out of the batches still to run, and each prompt's token counts are recorded."""
    total = len(data.texts)
    items: list[dict[str, Any] | None] = [None] * total
    prompt_tokens = completion_tokens = done = 0
    generate_s = 0.0
    progress(done=0, total=total, tokens_per_s=0.0, force=True)
    for number, batch in enumerate(batches, 1):
        progress.check_cancelled(f"after {done} of {total} prompts")
        if merged is not None:
            dropped = merged.dropped()
            done += sum(1 for index in batch if index in dropped)
            batch = [index for index in batch if index not in dropped]
            if not batch:
                continue
        batch_started = time.monotonic()
        outputs = generate(batch)
        generate_s += time.monotonic() - batch_started
        for index, (text, reason, n_new) in zip(batch, outputs, strict=True):
            item: dict[str, Any] = {"index": offset + index, "prompt": data.texts[index], "output": text,
                                    "finish_reason": reason}
            if data.metadata is not None:
                item["metadata"] = data.metadata[index]
            items[index] = item
            prompt_tokens += len(encoded[index])
            completion_tokens += n_new
            if merged is not None:
                merged.tokens[index] = (len(encoded[index]), n_new)
        done += len(batch)
        progress(done=done, total=total, tokens_per_s=round(completion_tokens / max(generate_s, 1e-9), 2),
                 batch=number, batches=len(batches), force=number == len(batches))
    return {
        "items": items,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens, "num_requests": total,
                  "latency_sec": round(time.monotonic() - started, 4)},
        "tokens_per_s": round(completion_tokens / max(generate_s, 1e-9), 2),
        "generate_sec": round(generate_s, 4),
        "batches": len(batches),
        "max_batch_size": max((len(b) for b in batches), default=0),
        **({"shuffle_seed": data.seed} if data.seed is not None else {}),
    }


@dataclass
class MergedPrompts:
    """The prompts of several tasks run as one generation (``tasks.merging``): task ``k``'s
    prompts are ``prompts.texts[starts[k]:starts[k + 1]]``."""

    prompts: Prompts
    starts: list[int]
    dropped: Callable[[], set[int]]  # prompt indices of tasks cancelled meanwhile
    tokens: dict[int, tuple[int, int]] = field(default_factory=dict)  # index → (prompt, new) tokens
    errors: dict[int, SpecError] = field(default_factory=dict)  # task number → why it cannot run

    def ranges(self) -> list[range]:
        bounds = [*self.starts, len(self.prompts.texts)]
        return [range(bounds[k], bounds[k + 1]) for k in range(len(self.starts))]

    def check_each(self, check: Callable[[list[Sequence[int]]], None],
                   encoded: Sequence[Sequence[int]]) -> set[int]:
        """Run ``check`` on each task's own prompts: a task that fails it fails alone (its error
        kept in ``errors``); returns the prompt indices of those tasks."""
        bad: set[int] = set()
        for number, indices in enumerate(self.ranges()):
            try:
                check([encoded[i] for i in indices])
            except SpecError as exc:
                self.errors[number] = exc
                bad.update(indices)
        return bad


def render_prompts(prompts: Sequence[str], options: InferenceOptions, tokenizer: Any,
                   identifier: str) -> tuple[list[str], bool]:
    """Prompts as the model sees them; ``True`` when a chat template rendered them.

    Without a chat template a ``system_prompt`` is put before each prompt, separated
    by a blank line. ``chat_template: true`` uses the tokenizer's template, a string
    is a Jinja template used instead.
    """
    template = options.chat_template
    if template is None or template is False:
        if options.system_prompt:
            return [f"{options.system_prompt}\n\n{p}" for p in prompts], False
        return list(prompts), False
    field = "spec.inference.chat_template"
    if template is True and not getattr(tokenizer, "chat_template", None):
        raise SpecError(field, f"true, but the tokenizer of {identifier!r} has no chat template; "
                               "give a Jinja template string instead")
    rendered = []
    for prompt in prompts:
        messages = ([{"role": "system", "content": options.system_prompt}] if options.system_prompt
                    else []) + [{"role": "user", "content": prompt}]
        try:
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True,
                chat_template=template if isinstance(template, str) else None)
        except Exception as exc:  # jinja2 errors, missing roles, ...
            raise SpecError(field, f"cannot render the chat template: {type(exc).__name__}: {exc}") from None
        rendered.append(str(text))
    return rendered, True


# -- data --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prompts:
    texts: list[str]
    metadata: list[dict[str, Any]] | None = None  # per prompt, from data.metadata_columns
    seed: int | None = None  # the seed of data.shuffle (given, or chosen: shuffle_seed_for)


def shuffle_seed_for(task_id: str) -> int:
    """The seed of a ``shuffle: true`` given no ``seed``: derived from the task id, so every
    run of the task, and every shard of it, sees the prompts in the same order."""
    return int.from_bytes(hashlib.sha256(task_id.encode("utf-8")).digest()[:4], "big")


def metadata_aliases(columns: dict[str, str] | list[str] | None) -> dict[str, str]:
    """``metadata_columns`` as ``{dataset column: name in the item's metadata}``."""
    if columns is None:
        return {}
    return dict(columns) if isinstance(columns, dict) else {name: name for name in columns}


def load_prompts(spec: InferenceTaskSpec, out_dir: Path) -> Prompts:
    """The prompts of ``spec.data`` (a list, a local file or directory, a cached hub dataset
    or an http(s) URL; ``tasks.executors.data``), sliced, shuffled and cut to ``max_samples``,
    with the ``metadata_columns`` of each row."""
    data = spec.inference_data()
    if data.type == "graph_template":  # the pipeline's worker side builds these into a list
        raise SpecError("spec.data.type", "graph_template prompts are built from earlier nodes' results: "
                                          "submit the task as a node of a graph pipeline")
    seed = (data.seed if data.seed is not None else shuffle_seed_for(out_dir.name)) if data.shuffle else None
    if data.type == "list":
        return Prompts(sample(list(data.items or []), shuffle=data.shuffle, seed=seed,
                              max_samples=data.max_samples), seed=seed)
    source = str(data.url or data.path)
    field = "spec.data.url" if data.url else "spec.data.path"
    if source.startswith(("http://", "https://")):
        source = str(download_file(source, out_dir / "inputs"))
    rows = read_records(source, field=field, split=data.split, name=data.name)
    rows = sample(rows, shuffle=data.shuffle, seed=seed, max_samples=data.max_samples)
    if not rows:
        raise SpecError("spec.data.split", f"{data.split!r} of {source!r} has no rows")
    texts = column(rows, data.column, "spec.data.column")
    aliases = metadata_aliases(data.metadata_columns)
    missing = [name for name in aliases if name not in rows[0]]
    if missing:
        raise SpecError("spec.data.metadata_columns", f"column {missing[0]!r} not found in the dataset "
                                                      f"({len(rows[0])} columns)")
    metadata = [{alias: row.get(name) for name, alias in aliases.items()} for row in rows] if aliases else None
    return Prompts(texts, metadata, seed)


# -- checkpoints -------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckpointDirs:
    model_dir: Path | None = None    # a full fine-tuned model used instead of the base
    adapter_dir: Path | None = None  # a peft adapter on top of the model
    merge: bool = False              # merge the adapter into the weights (``apply: merge``)


ADAPTERS_FIELD = "spec.model.adapters"


def adapter_checkpoint(adapters: list[AdapterSpec]) -> tuple[CheckpointLoad | None, bool]:
    """``model.adapters`` (the original spelling) as the ``checkpoint.load`` it means, and
    whether to merge it. One adapter per task: several would need merging in an order
    the templates do not state."""
    if not adapters:
        return None, False
    if len(adapters) > 1:
        raise SpecError(ADAPTERS_FIELD, f"{len(adapters)} adapters given; meshq applies one per task "
                                        "(merge several into one adapter first)")
    adapter = adapters[0]
    if adapter.path:
        load = CheckpointLoad(type="local", path=adapter.path, sha256=adapter.sha256)
    else:
        load = CheckpointLoad(type="http", url=adapter.url, task_id=adapter.task_id, filename=adapter.filename,
                              sha256=adapter.sha256)
    return load, adapter.apply == "merge"


def resolve_checkpoint(load: CheckpointLoad | None, out_dir: Path, *, merge: bool = False,
                       field: str = CHECKPOINT_FIELD) -> CheckpointDirs:
    """Local directory of ``spec.checkpoint.load`` (or ``model.adapters``) and whether it is an
    adapter or a model.

    A local directory is used in place; an archive (local or http) is fetched,
    verified and unpacked by ``app.artifacts.checkpoints`` into the worker's checkpoint cache.
    """
    if load is None:
        return CheckpointDirs()
    if load.type == "local":  # only under the worker's data roots (app.core.data_roots), then it must exist
        if not allowed_path(str(load.path), field).exists():
            raise SpecError(field, f"{str(load.path)!r} does not exist")
    directory = Path(fetch_checkpoint(load, out_dir)).resolve()
    if is_adapter_dir(directory):
        return CheckpointDirs(adapter_dir=directory, merge=merge)
    if field == ADAPTERS_FIELD:
        raise SpecError(field, f"{str(directory)!r} is not a LoRA adapter (no adapter_config.json)")
    if (directory / "config.json").is_file():
        return CheckpointDirs(model_dir=check_model_dir(directory, CHECKPOINT_FIELD))
    raise SpecError(field, f"{str(directory)!r} is neither a LoRA adapter "
                           "(adapter_config.json) nor a model directory (config.json)")


# -- engine --------------------------------------------------------------------------------
BACKEND_FIELD = "spec.inference.backend"


@dataclass(frozen=True)
class BackendChoice:
    name: str                              # "vllm" or "transformers"
    notes: tuple[str, ...] = ()            # why, when it is not what the spec asked for
    required: bool = False                 # inference.backend: vllm (no fallback)


def select_backend(spec: InferenceTaskSpec, vllm_here: bool) -> BackendChoice:
    """The engine that runs this task (``vllm_here``: this worker has vLLM).

    ``inference.backend: transformers`` and ``vllm`` are what they say (a worker without
    vLLM never receives a ``vllm`` task: routing, docs/ROUTING.md; one sent to it anyway
    fails naming the field). ``auto`` runs a model with a ``model.vllm`` block on vLLM where
    the worker has it, otherwise on transformers with a note, as the original system did;
    a model without that block runs on transformers.
    """
    wanted = spec.inference.backend if spec.inference is not None else "auto"
    if wanted == "vllm":
        if not vllm_here:
            raise SpecError(BACKEND_FIELD, "'vllm': this worker has no vLLM engine (start it from an "
                                           "environment built by make install-vllm); use auto or transformers")
        return BackendChoice("vllm", required=True)
    if wanted == "transformers":
        notes = ("model.vllm: inference.backend is transformers, so the vllm settings had no effect",) \
            if spec.model.vllm is not None else ()
        return BackendChoice("transformers", notes)
    if spec.model.vllm is None:
        return BackendChoice("transformers")
    if not vllm_here:
        return BackendChoice("transformers", ("model.vllm: this worker has no vLLM engine, so the task ran on "
                                              "transformers (the vllm settings had no effect)",))
    return BackendChoice("vllm")


class InferenceExecutor:
    """Runs ``taskType: inference``; one per worker process, so its model cache stays warm."""

    def __init__(self, cache: ModelCache | None = None, vllm_cache: VllmEngineCache | None = None) -> None:
        self.cache = cache or MODEL_CACHE
        self.vllm_cache = vllm_cache or VLLM_CACHE

    def run(self, spec: TaskSpec, out_dir: Path, progress: Progress,
            shard: PromptRange | None = None, metadata: list[dict[str, Any]] | None = None,
            merged: MergedPrompts | None = None) -> dict[str, Any]:
        """Run every prompt, or with ``shard`` one shard: its spec's data is the prompts of its
        range and ``metadata`` theirs (items keep their index in the whole task; the
        postprocess export is left to whoever merges the shards). With ``merged``, run those
        prompts (several tasks' with ``spec``'s settings) instead of the spec's data;
        ``tasks.merging`` splits the result per task."""
        started = time.monotonic()
        spec = spec_as(spec, InferenceTaskSpec)
        options = spec.inference or InferenceOptions()
        data = merged.prompts if merged is not None else load_prompts(spec, out_dir)
        offset = 0
        if shard is not None:
            if len(data.texts) != shard.size or (metadata is not None and len(metadata) != shard.size):
                raise SpecError("spec.data", f"shard {shard.index} covers prompts {shard.start}-{shard.stop - 1} "
                                             f"but its message has {len(data.texts)} prompts")
            offset = shard.start
            data = Prompts(data.texts, metadata)
        prompts = data.texts
        data_field = "spec.data.items" if spec.inference_data().type == "list" else "spec.data.column"
        if merged is None and not (options.system_prompt or options.chat_template):  # cheap checks first
            empty = next((i for i, p in enumerate(prompts) if not p), None)
            if empty is not None:
                raise SpecError(data_field, f"prompt {empty} is empty")
        choice = select_backend(spec, vllm_here=vllm_installed())
        backend, notes = choice.name, list(choice.notes)
        greedy_note = options.greedy_note()
        if greedy_note:
            notes.append(greedy_note)
        adapter_load, merge = adapter_checkpoint(spec.model.adapters)
        if adapter_load is not None:
            checkpoint = resolve_checkpoint(adapter_load, out_dir, merge=merge, field=ADAPTERS_FIELD)
        else:
            checkpoint = resolve_checkpoint(spec.checkpoint.load if spec.checkpoint else None, out_dir)
        if backend == "vllm":
            try:
                return self._run_vllm(spec, options, data, data_field, checkpoint, progress, out_dir, notes,
                                      started, offset, shard, merged)
            except EngineUnavailable as exc:
                if choice.required:
                    raise ExecutorError(f"{BACKEND_FIELD}: vllm is required but {exc}") from None
                notes.append(f"model.vllm: {exc}; the task ran on transformers")
                backend = "transformers"
        key = self.cache.key_for(spec.model, model_dir=checkpoint.model_dir, adapter_dir=checkpoint.adapter_dir,
                                 merge_adapter=checkpoint.merge, device_map=device_map_for(spec))
        loaded, hit = self.cache.get(key)
        tokenizer = loaded.tokenizer
        texts, templated = render_prompts(prompts, options, tokenizer, spec.model.source.identifier)
        encoded = tokenizer(texts, add_special_tokens=not templated)["input_ids"]
        context = getattr(loaded.model.config, "max_position_embeddings", None)
        bad = self._check_all(encoded, options, context, data_field, offset, merged)

        if options.batch_size is not None:
            batches = plan_batches([len(ids) for ids in encoded], options.max_new_tokens, options.batch_size)
        else:
            max_batch, budget = auto_limits(loaded)
            batches = plan_batches([len(ids) for ids in encoded], options.max_new_tokens,
                                   max_batch=max_batch, token_budget=budget)
        batches = [kept for kept in ([i for i in batch if i not in bad] for batch in batches) if kept]
        if options.seed is not None:
            import torch

            torch.manual_seed(options.seed)

        generated = generate_in_batches(batches, lambda batch: transformers_generate([encoded[i] for i in batch],
                                                                                     options, loaded),
                                        encoded, data, offset, progress, started, merged)
        device = loaded.model.device
        result: dict[str, Any] = {
            "backend": backend,
            **generated,
            "model": {"identifier": spec.model.source.identifier, "revision": spec.model.source.revision,
                      "path": key.weights_dir, "adapter": key.adapter_dir,
                      "adapter_merged": bool(key.adapter_dir and key.merge_adapter),
                      "dtype": str(loaded.model.dtype).removeprefix("torch."), "device": str(device)},
            "model_cache": {"hit": hit, "load_sec": round(0.0 if hit else loaded.load_s, 4),
                            "loads": self.cache.stats.loads, "hits": self.cache.stats.hits},
        }
        return self._finish(result, spec, notes, out_dir, shard, progress.run)

    @staticmethod
    def _finish(result: dict[str, Any], spec: InferenceTaskSpec, notes: list[str], out_dir: Path,
                shard: PromptRange | None, run: int | None = None) -> dict[str, Any]:
        if shard is not None:
            result["shard"] = shard.as_dict()
        export = spec.postprocess.jsonl_export if spec.postprocess is not None else None
        if export is not None and shard is None:
            result["jsonl_export"] = write_export([i for i in result["items"] if i is not None], export, out_dir, run)
        if notes:
            result["notes"] = notes
        return result

    def _run_vllm(self, spec: InferenceTaskSpec, options: InferenceOptions, data: Prompts, data_field: str,
                  checkpoint: CheckpointDirs, progress: Progress, out_dir: Path, notes: list[str],
                  started: float, offset: int, shard: PromptRange | None,
                  merged: MergedPrompts | None = None) -> dict[str, Any]:
        """The same task (or shard: ``offset`` is its first prompt's index) on vLLM
        (``tasks/executors/vllm_engine.py``): same prompts, same token ids, same decoding and
        stop strings; vLLM batches the requests of each chunk itself."""
        device = engine_device()
        wanted_device = device_map_for(spec)
        if wanted_device != "auto" and wanted_device != device:
            why = "enforce_cpu" if spec.enforce_cpu else f"model.transformers.device_map is {wanted_device!r}"
            raise EngineUnavailable(f"{why} and this worker's vLLM runs on {device}")
        key = self.vllm_cache.key_for(spec, model_dir=checkpoint.model_dir, adapter_dir=checkpoint.adapter_dir)
        engine, hit = self.vllm_cache.get(key)
        lora = self.vllm_cache.lora_request(engine, checkpoint.adapter_dir) if checkpoint.adapter_dir else None
        if checkpoint.adapter_dir is not None and checkpoint.merge:
            notes.append("model.adapters: apply merge: vLLM serves the adapter beside the weights "
                         "(the same outputs as merged, no merge needed)")
        prompts = data.texts
        texts, templated = render_prompts(prompts, options, engine.tokenizer, spec.model.source.identifier)
        encoded = engine.tokenizer(texts, add_special_tokens=not templated)["input_ids"]
        bad = self._check_all(encoded, options, engine.max_model_len, data_field, offset, merged)

        kept = [index for index in range(len(prompts)) if index not in bad]
        chunk = options.batch_size or (CPU_CHUNK if device == "cpu" else CUDA_CHUNK)
        chunks = [kept[start:start + chunk] for start in range(0, len(kept), chunk)]
        stops = [s for s in options.stop if s]

        def generate(indices: list[int]) -> list[tuple[str, str, int]]:
            completions = vllm_generate(engine, [encoded[i] for i in indices], [offset + i for i in indices],
                                        options, lora)
            outputs = []
            for completion in completions:
                # Decoded and cut as the transformers backend does, so both give the same text
                # for the same tokens.
                text = engine.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
                text, stopped = cut_at_stop(text, stops)
                reason = "stop" if stopped or completion.finish_reason == "stop" else "length"
                outputs.append((text, reason, len(completion.token_ids)))
            return outputs

        result: dict[str, Any] = {
            "backend": "vllm",
            **generate_in_batches(chunks, generate, encoded, data, offset, progress, started, merged),
            "model": {"identifier": spec.model.source.identifier, "revision": spec.model.source.revision,
                      "path": key.weights_dir, "adapter": str(checkpoint.adapter_dir) if checkpoint.adapter_dir
                      else None, "adapter_merged": False, "dtype": engine.dtype, "device": device},
            "model_cache": {"hit": hit, "load_sec": round(0.0 if hit else engine.load_s, 4),
                            "loads": self.vllm_cache.stats.loads, "hits": self.vllm_cache.stats.hits},
            "engine": {"name": "vllm", "version": engine_version(), "max_model_len": engine.max_model_len,
                       "tensor_parallel_size": key.tensor_parallel_size, "lora_rank": engine.key.max_lora_rank},
        }
        return self._finish(result, spec, notes, out_dir, shard, progress.run)

    @classmethod
    def _check_all(cls, encoded: Sequence[Sequence[int]], options: InferenceOptions, context: int | None,
                   data_field: str, offset: int, merged: MergedPrompts | None) -> set[int]:
        """Check the prompts' lengths; with ``merged`` each task's alone (returns the prompt
        indices of the tasks that fail, which are not run)."""
        if merged is None:
            cls._check_lengths(encoded, options, context, data_field, offset)
            return set()
        return merged.check_each(lambda own: cls._check_lengths(own, options, context, data_field), encoded)

    @staticmethod
    def _check_lengths(encoded: Sequence[Sequence[int]], options: InferenceOptions,
                       context: int | None, data_field: str, offset: int = 0) -> None:
        """``context``: the model's (or engine's) longest sequence; ``offset``: the index of the
        first prompt in the whole task (a shard's start)."""
        for index, ids in enumerate(encoded):
            if not ids:
                raise SpecError(data_field, f"prompt {offset + index} is empty (no tokens)")
        if context:
            longest = max(range(len(encoded)), key=lambda i: len(encoded[i]))
            if len(encoded[longest]) + options.max_new_tokens > context:
                raise SpecError("spec.inference.max_new_tokens",
                                f"prompt {offset + longest} has {len(encoded[longest])} tokens; with "
                                f"max_new_tokens={options.max_new_tokens} it exceeds the model's "
                                f"context of {context} tokens")
