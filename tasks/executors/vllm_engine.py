"""The vLLM backend of the inference executor: a warm ``vllm.LLM`` per worker process.

``InferenceExecutor`` (``tasks/executors/inference.py``) reads, renders and tokenizes the
prompts exactly as for transformers and hands the token ids to ``generate`` here, so
both engines see the same input; outputs are decoded with the same tokenizer and cut
at the same stop strings. vLLM schedules the requests itself (continuous batching,
paged attention); meshq sends them in chunks only so that progress is reported and a
cancel is seen between chunks.

``VllmEngineCache`` keeps the last engine between tasks. Its key is what changes the
weights or the engine's shape (path and fingerprint, dtype, ``model.vllm`` settings,
the LoRA rank it was built for); an engine built for LoRA serves tasks without an
adapter too. Loading an engine releases the transformers model cache and the reverse
(``tasks/executors/models.py``), and a training task releases both: one process never
holds two models' memory. LoRA adapters are served with vLLM's LoRA support (never
merged); each adapter directory (the checkpoint cache unpacks an archive once per
digest) gets a stable id, so vLLM keeps it loaded between tasks.

The engine runs inside the worker's pool child (``VLLM_ENABLE_V1_MULTIPROCESSING=0``):
a cancel or time limit that ends the child ends the engine with it, and releasing it
frees its memory in this process. vLLM is imported inside functions only.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.core.data_roots import check_remote_code, under_results
from app.core.errors import ExecutorError, SpecError
from app.core.task_spec import InferenceOptions, InferenceTaskSpec
from tasks.executors.models import (
    CHECKPOINT_FIELD,
    IDENTIFIER_FIELD,
    _fingerprint,
    check_adapter_dir,
    check_model_dir,
    has_tokenizer,
    load_tokenizer,
    register_cache,
    release_other_caches,
    resolve_model_dir,
)

log = logging.getLogger(__name__)

# Requests per ``LLM.generate`` call: vLLM batches inside a call; between calls meshq reports
# progress and sees a cancel. Big enough that the scheduler always has a full batch.
CPU_CHUNK = 64
CUDA_CHUNK = 1024
# KV cache of a CPU engine when VLLM_CPU_KVCACHE_SPACE (GiB) is not set: vLLM's own default
# takes a fraction of the machine's RAM, too much for a worker that shares it.
CPU_KV_CACHE_BYTES = 2 * 1024**3
# vLLM's supported LoRA ranks; an engine is built for the smallest that fits the adapter.
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


class EngineUnavailable(Exception):
    """vLLM cannot run this task here (a device it was not built for, a model it cannot
    load); ``auto`` falls back to transformers and says why."""


def _prepare_environment() -> None:
    # The engine core in this process (see the module docstring); quiet, no usage reports.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_DO_NOT_TRACK", "1")


def engine_device() -> str:
    """``cuda`` for vLLM's CUDA build on a machine with a GPU, ``cpu`` for its CPU build."""
    _prepare_environment()
    from vllm.platforms import current_platform

    return "cpu" if current_platform.is_cpu() else str(current_platform.device_type or "cuda")


def engine_version() -> str:
    import vllm

    return str(vllm.__version__)


def _adapter_config(adapter_dir: Path) -> dict[str, Any]:
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise SpecError(CHECKPOINT_FIELD, f"cannot read {str(adapter_dir / 'adapter_config.json')!r}: "
                                          f"{exc}") from None
    return config if isinstance(config, dict) else {}


def check_adapter_served(adapter_dir: Path) -> None:
    """``EngineUnavailable`` for an adapter vLLM's LoRA cannot serve: one that also trained whole
    modules (``modules_to_save``, e.g. the norms) or is not a LoRA."""
    config = _adapter_config(adapter_dir)
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise EngineUnavailable(f"the adapter is {config.get('peft_type')}, vLLM serves LoRA adapters only")
    if config.get("modules_to_save"):
        raise EngineUnavailable(f"the adapter also trains whole modules (modules_to_save: "
                                f"{', '.join(map(str, config['modules_to_save']))}), which vLLM's LoRA does not serve")


def lora_rank_for(adapter_dir: Path) -> int:
    """The smallest rank vLLM supports that holds this adapter's ``r``."""
    rank = int(_adapter_config(adapter_dir).get("r") or 8)
    fitting = [r for r in LORA_RANKS if r >= rank]
    if not fitting:
        raise SpecError(CHECKPOINT_FIELD, f"adapter rank {rank} exceeds vLLM's largest LoRA rank {LORA_RANKS[-1]}")
    return fitting[0]


@dataclass(frozen=True)
class EngineKey:
    """Everything that decides which engine a task gets."""

    weights_dir: str
    weights_fingerprint: tuple[tuple[str, int, int], ...]
    tokenizer_dir: str
    dtype: str
    trust_remote_code: bool
    tensor_parallel_size: int
    gpu_memory_utilization: float
    max_model_len: int | None
    max_lora_rank: int = 0  # 0: built without LoRA

    def serves(self, wanted: EngineKey) -> bool:
        """Whether an engine built for ``self`` can run a task that wants ``wanted``."""
        same = {**self.__dict__, "max_lora_rank": 0} == {**wanted.__dict__, "max_lora_rank": 0}
        return same and (wanted.max_lora_rank == 0 or self.max_lora_rank >= wanted.max_lora_rank)


@dataclass
class LoadedEngine:
    key: EngineKey
    llm: Any
    tokenizer: Any
    load_s: float
    device: str
    dtype: str
    max_model_len: int
    lora_ids: dict[tuple[str, tuple[tuple[str, int, int], ...]], int] = field(default_factory=dict)


@dataclass
class EngineStats:
    loads: int = 0
    hits: int = 0


class VllmEngineCache:
    """Holds the last vLLM engine of this process; ``get`` returns it when it serves the key."""

    def __init__(self) -> None:
        self._current: LoadedEngine | None = None
        self._lock = threading.RLock()
        self.stats = EngineStats()
        register_cache(self)

    def key_for(self, spec: InferenceTaskSpec, *, model_dir: Path | None, adapter_dir: Path | None) -> EngineKey:
        """Validate the spec's paths and build the key (cheap: nothing is loaded)."""
        options = spec.model.transformers
        vllm_options = spec.model.vllm
        base_dir = resolve_model_dir(spec.model.source.identifier, spec.model.source.revision)
        weights_dir = check_model_dir(model_dir, CHECKPOINT_FIELD) if model_dir else base_dir
        tokenizer_dir = weights_dir if has_tokenizer(weights_dir) else base_dir
        if adapter_dir:
            check_adapter_served(check_adapter_dir(adapter_dir))
        rank = lora_rank_for(adapter_dir) if adapter_dir else 0
        remote_code = options.trust_remote_code or bool(vllm_options and vllm_options.trust_remote_code)
        check_remote_code(remote_code, from_artifact=under_results(weights_dir) or under_results(tokenizer_dir),
                          field=CHECKPOINT_FIELD if model_dir else "spec.model.source.identifier")
        return EngineKey(
            weights_dir=str(weights_dir), weights_fingerprint=_fingerprint(weights_dir),
            tokenizer_dir=str(tokenizer_dir), dtype=options.dtype,
            trust_remote_code=remote_code,
            tensor_parallel_size=vllm_options.tensor_parallel_size if vllm_options else 1,
            gpu_memory_utilization=vllm_options.gpu_memory_utilization if vllm_options else 0.9,
            max_model_len=vllm_options.max_model_len if vllm_options else None,
            max_lora_rank=rank)

    def get(self, key: EngineKey) -> tuple[LoadedEngine, bool]:
        """``(engine, hit)``: the warm engine if it serves ``key``, else a new one."""
        with self._lock:
            current = self._current
            if current is not None and current.key.serves(key):
                self.stats.hits += 1
                return current, True
            self.release()
            release_other_caches(self)  # the transformers model, if one is warm
            loaded = _build_engine(key)
            self._current = loaded
            self.stats.loads += 1
            return loaded, False

    def lora_request(self, engine: LoadedEngine, adapter_dir: Path) -> Any:
        """vLLM's ``LoRARequest`` for ``adapter_dir``, with the same id for the same files."""
        from vllm.lora.request import LoRARequest

        identity = (str(adapter_dir), _fingerprint(adapter_dir))
        number = engine.lora_ids.setdefault(identity, len(engine.lora_ids) + 1)
        return LoRARequest(f"adapter-{number}", number, str(adapter_dir))

    @property
    def current_key(self) -> EngineKey | None:
        return self._current.key if self._current is not None else None

    def release(self) -> None:
        """Shut the engine down and give its memory back (GPU memory too)."""
        with self._lock:
            current, self._current = self._current, None
            if current is None:
                return
            log.info("releasing vLLM engine %s", current.key.weights_dir)
            engine_core = getattr(getattr(current.llm, "llm_engine", None), "engine_core", None)
            if engine_core is not None and hasattr(engine_core, "shutdown"):
                try:
                    engine_core.shutdown()
                except Exception as exc:  # already stopped; freeing the memory is what matters
                    log.warning("vLLM engine shutdown: %s: %s", type(exc).__name__, exc)
            del current
            try:
                from vllm.distributed.parallel_state import (
                    destroy_distributed_environment,
                    destroy_model_parallel,
                )

                destroy_model_parallel()
                destroy_distributed_environment()
            except Exception as exc:
                log.warning("vLLM distributed clean-up: %s: %s", type(exc).__name__, exc)
            gc.collect()
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _build_engine(key: EngineKey) -> LoadedEngine:
    _prepare_environment()
    from vllm import LLM

    device = engine_device()
    kwargs: dict[str, Any] = {
        "model": key.weights_dir, "tokenizer": key.tokenizer_dir, "dtype": key.dtype,
        "trust_remote_code": key.trust_remote_code, "tensor_parallel_size": key.tensor_parallel_size,
        "gpu_memory_utilization": key.gpu_memory_utilization, "seed": 0,
    }
    if key.max_model_len is not None:
        kwargs["max_model_len"] = key.max_model_len
    if key.max_lora_rank:
        kwargs.update(enable_lora=True, max_lora_rank=key.max_lora_rank, max_loras=1)
    if device == "cpu":
        # Compiling the model takes minutes on a few cores; eager mode starts in seconds.
        kwargs["enforce_eager"] = True
        if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            kwargs["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
    started = time.monotonic()
    try:
        llm = LLM(**kwargs)
    except Exception as exc:  # unsupported architecture, head size, out of memory, ...
        raise EngineUnavailable(f"vLLM cannot load {key.weights_dir!r}: {type(exc).__name__}: {exc}") from exc
    tokenizer = load_tokenizer(key.tokenizer_dir, trust_remote_code=key.trust_remote_code,
                               field=IDENTIFIER_FIELD)
    model_config = llm.llm_engine.model_config
    loaded = LoadedEngine(key, llm, tokenizer, load_s=time.monotonic() - started, device=device,
                          dtype=str(model_config.dtype).removeprefix("torch."),
                          max_model_len=int(model_config.max_model_len))
    log.info("vLLM engine for %s on %s (%s, LoRA rank %s) ready in %.2fs", key.weights_dir, device,
             loaded.dtype, key.max_lora_rank or "none", loaded.load_s)
    return loaded


def sampling_params(options: InferenceOptions, index: int) -> Any:
    """``SamplingParams`` for one prompt: greedy unless sampling (``do_sample``, temperature > 0);
    with a ``seed`` each prompt gets ``seed + index``, so its output does not depend on the other prompts."""
    from vllm import SamplingParams

    sample = options.sampling
    return SamplingParams(
        max_tokens=options.max_new_tokens,
        temperature=options.temperature if sample else 0.0,
        top_p=options.top_p if sample else 1.0,
        top_k=(options.top_k or 0) if sample else 0,
        repetition_penalty=options.repetition_penalty,
        stop=[s for s in options.stop if s] or None,
        seed=None if options.seed is None else options.seed + index,
        ignore_eos=options.ignore_eos,
        skip_special_tokens=True,
    )


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]
    finish_reason: str  # vLLM's: stop (eos or a stop string) or length


def generate(engine: LoadedEngine, rows: Sequence[Sequence[int]], indices: Sequence[int],
             options: InferenceOptions, lora: Any = None) -> list[Completion]:
    """One chunk of requests (token ids in, token ids out), in the order given."""
    prompts = [{"prompt_token_ids": list(ids)} for ids in rows]
    params = [sampling_params(options, index) for index in indices]
    try:
        outputs = engine.llm.generate(prompts, params, use_tqdm=False, lora_request=lora)
    except Exception as exc:
        raise ExecutorError(f"vLLM generation failed: {type(exc).__name__}: {exc}") from exc
    completions = []
    for output in outputs:
        first = output.outputs[0]
        completions.append(Completion(list(first.token_ids), str(first.finish_reason or "length")))
    return completions


# The worker process's engine; ``release_cached_model()`` (a training task) releases it too.
VLLM_CACHE = VllmEngineCache()
