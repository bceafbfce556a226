"""Loading Hugging Face causal LMs for executors, and the worker's warm model cache.

``load_model_and_tokenizer`` is the one way meshq loads a model: a local directory
or a hub id resolved from the local Hugging Face cache (never downloaded at run
time), with ``revision``, ``dtype``, ``device_map`` and ``trust_remote_code`` from
the spec, optionally with a peft (LoRA) adapter on top. Every problem the user can
fix raises ``SpecError`` naming the spec field and the path.

``ModelCache`` keeps the last loaded model of a worker process between tasks. Its
key is everything that changes the weights (resolved path and a fingerprint of its
files, revision, dtype, device, trust_remote_code, adapter path and fingerprint),
so a task never silently gets another task's model; a different key frees the old
model before loading the new one.

Nothing here imports torch or transformers at module level: the worker's parent
process imports ``tasks`` and must stay free of them.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from app.core.data_roots import check_remote_code, under_allowed_roots, under_results
from app.core.errors import ExecutorError, SpecError
from app.core.task_spec import ModelSpec, ModelTaskSpec

log = logging.getLogger(__name__)

# Workers never download from the model hub; progress bars only clutter worker logs.
for _variable, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"),
                          ("HF_DATASETS_OFFLINE", "1"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                          ("HF_HUB_DISABLE_TELEMETRY", "1"), ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_variable, _value)

IDENTIFIER_FIELD = "spec.model.source.identifier"
DTYPE_FIELD = "spec.model.transformers.dtype"
DEVICE_FIELD = "spec.model.transformers.device_map"
CHECKPOINT_FIELD = "spec.checkpoint.load.path"

CONFIG_NAME = "config.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json",
                   "pytorch_model.bin.index.json")
ADAPTER_WEIGHT_PATTERNS = ("adapter_model.safetensors", "adapter_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?\Z")


# -- locating a model ---------------------------------------------------------------
def _fingerprint(directory: Path) -> tuple[tuple[str, int, int], ...]:
    """(name, size, mtime_ns) of the directory's top-level files: changes when it is rewritten."""
    entries = []
    for path in sorted(directory.iterdir()):
        if path.is_file():
            stat = path.stat()
            entries.append((path.name, stat.st_size, stat.st_mtime_ns))
    return tuple(entries)


def _has_any(directory: Path, patterns: tuple[str, ...]) -> bool:
    return any(next(directory.glob(pattern), None) is not None for pattern in patterns)


def check_model_dir(directory: Path, field: str = IDENTIFIER_FIELD) -> Path:
    """``directory`` if it holds a loadable model (config + weights), else ``SpecError``."""
    if not directory.exists():
        raise SpecError(field, f"model directory {str(directory)!r} does not exist")
    if not directory.is_dir():
        raise SpecError(field, f"{str(directory)!r} is a file, not a model directory")
    if not (directory / CONFIG_NAME).is_file():
        if (directory / ADAPTER_CONFIG_NAME).is_file():
            raise SpecError(field, f"{str(directory)!r} is a LoRA adapter, not a model: name the base "
                                   "model here and the adapter in spec.checkpoint.load")
        raise SpecError(field, f"model directory {str(directory)!r} has no {CONFIG_NAME}")
    if not _has_any(directory, WEIGHT_PATTERNS):
        raise SpecError(field, f"model directory {str(directory)!r} has no weights "
                               "(*.safetensors or pytorch_model*.bin)")
    return directory


def is_adapter_dir(directory: Path) -> bool:
    return (directory / ADAPTER_CONFIG_NAME).is_file()


def check_adapter_dir(directory: Path, field: str = CHECKPOINT_FIELD) -> Path:
    if not directory.is_dir():
        raise SpecError(field, f"adapter directory {str(directory)!r} does not exist")
    if not is_adapter_dir(directory):
        raise SpecError(field, f"{str(directory)!r} has no {ADAPTER_CONFIG_NAME}")
    if not _has_any(directory, ADAPTER_WEIGHT_PATTERNS):
        raise SpecError(field, f"adapter directory {str(directory)!r} has no adapter_model.safetensors")
    return directory


def looks_like_path(identifier: str) -> bool:
    """Anything that cannot be a hub id (``name`` or ``org/name``) is a path."""
    return not HUB_ID_RE.match(identifier)


def resolve_model_dir(identifier: str, revision: str | None = None,
                      field: str = IDENTIFIER_FIELD) -> Path:
    """A local model directory, or the snapshot of hub id ``identifier`` in the local HF cache.

    Models may live anywhere on the worker, but only a path under the data roots
    (``app.core.data_roots``) gets an error saying what is wrong with it (missing, a file, no
    weights...): for any other path, and for a hub id not in the cache, the error is one and
    the same, so a spec cannot probe which paths exist on the worker."""
    local = Path(identifier).expanduser()
    try:
        if local.exists() or looks_like_path(identifier):
            return check_model_dir(local.resolve(), field)
    except SpecError:
        if under_allowed_roots(local):
            raise
        raise _not_a_model(identifier, revision, field) from None
    from huggingface_hub import snapshot_download

    try:
        snapshot = snapshot_download(repo_id=identifier, revision=revision, local_files_only=True)
    except Exception:  # LocalEntryNotFoundError, RepositoryNotFoundError, ...
        raise _not_a_model(identifier, revision, field) from None
    return check_model_dir(Path(snapshot), field)


def _not_a_model(identifier: str, revision: str | None, field: str) -> SpecError:
    where = f" at revision {revision!r}" if revision else ""
    return SpecError(field, f"{identifier!r} is neither a model directory (config.json and weights) nor a model "
                            f"in the local Hugging Face cache{where}; this worker does not download models "
                            "(what is wrong with a local path is said for paths under RESULTS_DIR and "
                            "MESHQ_DATA_DIRS only)")


# -- loading --------------------------------------------------------------------------
def torch_dtype(name: str) -> Any:
    """``auto`` stays ``auto`` (the checkpoint's own dtype); otherwise the torch dtype."""
    if name == "auto":
        return "auto"
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def resolve_device(device_map: str) -> str:
    """``auto`` stays ``auto`` when a GPU is visible (accelerate places the weights), else ``cpu``;
    ``cuda`` without a GPU is refused."""
    import torch

    if device_map == "cuda" and not torch.cuda.is_available():
        raise SpecError(DEVICE_FIELD, "'cuda' requested but this worker has no CUDA device")
    if device_map == "auto":
        return "auto" if torch.cuda.is_available() else "cpu"
    return device_map


def device_map_for(spec: ModelTaskSpec) -> str:
    """The spec's device map, or ``cpu`` when ``enforce_cpu`` says to run on CPU even where a
    GPU exists."""
    return "cpu" if spec.enforce_cpu else spec.model.transformers.device_map


def training_device(device_map: str) -> str:
    """The one device a training run uses: ``cuda`` when asked or available (``auto``), else ``cpu``."""
    return "cpu" if resolve_device(device_map) == "cpu" else "cuda"


def load_tokenizer(model_dir: str | Path, *, trust_remote_code: bool = False,
                   field: str = IDENTIFIER_FIELD) -> Any:
    from transformers import AutoTokenizer

    check_remote_code(trust_remote_code, from_artifact=under_results(model_dir), field=field)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code,
                                                  local_files_only=True)
    except Exception as exc:
        raise SpecError(field, f"cannot load a tokenizer from {str(model_dir)!r}: "
                               f"{type(exc).__name__}: {exc}") from None
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # common for Llama-style tokenizers
    return tokenizer


def load_model_and_tokenizer(model_spec: ModelSpec, *, adapter_dir: str | Path | None = None,
                             model_dir: str | Path | None = None, dtype: str | None = None,
                             device_map: str | None = None, is_trainable: bool = False,
                             ) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` as the spec says; no cache (see ``ModelCache``).

    ``model_dir`` replaces the spec's identifier (a full fine-tuned checkpoint); its
    tokenizer is used if it has one, else the base model's. ``adapter_dir`` puts a peft
    adapter on top (trainable if ``is_trainable``). ``dtype``/``device_map`` override
    the spec's ``model.transformers`` options.
    """
    options = model_spec.transformers
    base_dir = resolve_model_dir(model_spec.source.identifier, model_spec.source.revision)
    weights_dir = check_model_dir(Path(model_dir), CHECKPOINT_FIELD) if model_dir else base_dir
    device = resolve_device(device_map or options.device_map)
    adapter = check_adapter_dir(Path(adapter_dir)) if adapter_dir else None
    return _load(weights_dir, base_dir, dtype or options.dtype, device, options.trust_remote_code,
                 adapter, is_trainable)


def _load(weights_dir: Path, base_dir: Path, dtype: str, device: str, trust_remote_code: bool,
          adapter_dir: Path | None, is_trainable: bool = False, merge_adapter: bool = False) -> tuple[Any, Any]:
    tokenizer_dir = weights_dir if has_tokenizer(weights_dir) else base_dir
    tokenizer = load_tokenizer(tokenizer_dir, trust_remote_code=trust_remote_code)
    field = CHECKPOINT_FIELD if weights_dir != base_dir else IDENTIFIER_FIELD
    model = load_causal_lm(weights_dir, dtype, trust_remote_code, field, device_map=device)
    if adapter_dir is not None:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=is_trainable)
        except Exception as exc:
            raise ExecutorError(f"{CHECKPOINT_FIELD}: cannot apply the adapter {str(adapter_dir)!r} to "
                                f"{str(weights_dir)!r}: {type(exc).__name__}: {exc}",
                                path=str(adapter_dir)) from None
        if merge_adapter and not is_trainable:  # model.adapters[].apply: merge
            model = model.merge_and_unload()
    if not is_trainable:
        model.eval()
    return model, tokenizer


def has_tokenizer(directory: Path) -> bool:
    """Whether ``directory`` carries its own tokenizer (a fine-tuned model saved with one)."""
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def load_causal_lm(directory: Path, dtype: str, trust_remote_code: bool, field: str,
                   device_map: str | None = None) -> Any:
    """``AutoModelForCausalLM`` from a local directory; a failure names ``field`` and the path."""
    from transformers import AutoModelForCausalLM

    check_remote_code(trust_remote_code, from_artifact=under_results(directory), field=field)
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(directory), dtype=torch_dtype(dtype), device_map=device_map,
            trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as exc:
        raise ExecutorError(f"{field}: cannot load a causal LM from {str(directory)!r}: "
                            f"{type(exc).__name__}: {exc}", path=str(directory)) from None


# -- the warm cache -------------------------------------------------------------------
class ReleasableCache(Protocol):
    def release(self) -> None: ...


# Every model cache of this process (transformers models, vLLM engines), so that loading into
# one releases the others and a training task releases them all.
_CACHES: weakref.WeakSet[ReleasableCache] = weakref.WeakSet()


def register_cache(cache: ReleasableCache) -> None:
    _CACHES.add(cache)


@dataclass(frozen=True)
class ModelKey:
    """Everything that decides which weights a task gets."""

    weights_dir: str
    weights_fingerprint: tuple[tuple[str, int, int], ...]
    base_dir: str
    revision: str | None
    dtype: str
    device: str
    trust_remote_code: bool
    adapter_dir: str | None = None
    adapter_fingerprint: tuple[tuple[str, int, int], ...] = ()
    merge_adapter: bool = False


@dataclass
class LoadedModel:
    key: ModelKey
    model: Any
    tokenizer: Any
    load_s: float
    uses: int = 0


@dataclass
class CacheStats:
    loads: int = 0
    hits: int = 0


class ModelCache:
    """Holds the last loaded model; ``get`` returns it when the key matches, else reloads."""

    def __init__(self) -> None:
        self._current: LoadedModel | None = None
        self._lock = threading.Lock()
        self.stats = CacheStats()
        register_cache(self)

    def key_for(self, model_spec: ModelSpec, *, model_dir: str | Path | None = None,
                adapter_dir: str | Path | None = None, merge_adapter: bool = False,
                device_map: str | None = None) -> ModelKey:
        """Validate the spec's paths and build the cache key (cheap: no model is loaded)."""
        options = model_spec.transformers
        base_dir = resolve_model_dir(model_spec.source.identifier, model_spec.source.revision)
        weights_dir = check_model_dir(Path(model_dir), CHECKPOINT_FIELD) if model_dir else base_dir
        adapter = check_adapter_dir(Path(adapter_dir).resolve()) if adapter_dir else None
        return ModelKey(
            weights_dir=str(weights_dir), weights_fingerprint=_fingerprint(weights_dir),
            base_dir=str(base_dir), revision=model_spec.source.revision, dtype=options.dtype,
            device=resolve_device(device_map or options.device_map), trust_remote_code=options.trust_remote_code,
            adapter_dir=str(adapter) if adapter else None,
            adapter_fingerprint=_fingerprint(adapter) if adapter else (),
            merge_adapter=bool(adapter) and merge_adapter)

    def get(self, key: ModelKey) -> tuple[LoadedModel, bool]:
        """``(loaded model, hit)``: the cached model if ``key`` matches, else a fresh load."""
        with self._lock:
            current = self._current
            if current is not None and current.key == key:
                current.uses += 1
                self.stats.hits += 1
                return current, True
            self.release()
            release_other_caches(self)  # a warm vLLM engine, if one is loaded
            started = time.monotonic()
            model, tokenizer = _load(Path(key.weights_dir), Path(key.base_dir), key.dtype, key.device,
                                     key.trust_remote_code,
                                     Path(key.adapter_dir) if key.adapter_dir else None,
                                     merge_adapter=key.merge_adapter)
            loaded = LoadedModel(key, model, tokenizer, load_s=time.monotonic() - started, uses=1)
            self._current = loaded
            self.stats.loads += 1
            log.info("loaded model %s (adapter %s) on %s in %.2fs", key.weights_dir, key.adapter_dir,
                     key.device, loaded.load_s)
            return loaded, False

    @property
    def current_key(self) -> ModelKey | None:
        return self._current.key if self._current is not None else None

    def release(self) -> None:
        """Drop the cached model and give its memory back (GPU memory too)."""
        if self._current is None:
            return
        log.info("releasing cached model %s", self._current.key.weights_dir)
        self._current = None
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# The worker process's cache. Executors that load big models (training) call
# ``release_cached_model()`` first so the inference model does not hold the memory.
MODEL_CACHE = ModelCache()


def release_other_caches(owner: object) -> None:
    """Release every model cache of this process except ``owner``: one process holds one
    model's memory at a time (a vLLM engine and a transformers model never both)."""
    for cache in list(_CACHES):
        if cache is not owner:
            cache.release()


def release_cached_model() -> None:
    """Free every cached model of this process (the transformers model and a vLLM engine)."""
    for cache in list(_CACHES):
        cache.release()
