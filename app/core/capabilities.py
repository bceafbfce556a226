"""What a task needs (``Requirement``) and what a worker has (``Capabilities``), and the match.

Pure data and comparisons, no I/O: the submitter names a task's queue from its
requirement (``app.core.routing.queue_for_requirement``), a worker decides from its
capabilities which of those queues it consumes (``Capabilities.unmet``), and the
submission warning says why no live worker fits. docs/ROUTING.md has the scheme.

A requirement is the spec's ``tags``, ``resources.hardware`` (CPU cores, RAM, GPU
count/type/per-GPU memory) and ``features``: capabilities that are not hardware
(software a worker has, e.g. an inference engine). Nothing here rounds: a worker
fits when it has at least what is asked, as the operating system and NVML report it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from app.core.engines import DEEPSPEED, VLLM
from app.core.task_spec.schema import BaseTaskSpec, InferenceTaskSpec, ModelTaskSpec, ResourcesSpec, TrainingTaskSpec
from app.core.task_spec.sizes import format_size_exact
from app.core.task_spec.validation import parse_task_spec

GPU_TYPE_ANY = "any"
# Vendor words a GPU type may carry that NVML product names often leave out ("Tesla T4").
_VENDOR_WORDS = frozenset({"nvidia"})
_WORD_RE = re.compile(r"[a-z0-9]+")


# -- GPU product names ------------------------------------------------------------------------
def gpu_words(text: str) -> list[str]:
    """Lower-case alphanumeric words: ``NVIDIA A100-SXM4-80GB`` → ``[nvidia, a100, sxm4, 80gb]``."""
    return _WORD_RE.findall(text.lower())


def canonical_gpu_type(text: str) -> str:
    """``NVIDIA A100 80GB`` → ``nvidia-a100-80gb`` (how a type is written in a queue name)."""
    return "-".join(gpu_words(text))


def gpu_type_matches(wanted: str | None, product_name: str) -> bool:
    """Whether a GPU named ``product_name`` (NVML) is of type ``wanted``, case-insensitively.

    ``None`` and ``any`` match every GPU. Otherwise every word of ``wanted`` must be a
    word of the product name, or several consecutive words written together
    (``rtx4090`` matches ``GeForce RTX 4090``); ``nvidia`` may be left out of the name.
    So ``nvidia-a100-80gb`` matches ``NVIDIA A100-SXM4-80GB`` and ``NVIDIA A100 80GB PCIe``,
    ``t4`` matches ``Tesla T4``, and ``a10`` does not match an A100.
    """
    if wanted is None or wanted.strip().lower() == GPU_TYPE_ANY:
        return True
    words = gpu_words(product_name)
    known = {"".join(words[i:j]) for i in range(len(words)) for j in range(i + 1, len(words) + 1)}
    wanted_words = [w for w in gpu_words(wanted) if w not in _VENDOR_WORDS] or gpu_words(wanted)
    return bool(wanted_words) and all(word in known for word in wanted_words)


# -- what a task needs -------------------------------------------------------------------------
@dataclass(frozen=True)
class GpuNeed:
    count: int
    type: str | None = None          # canonical (nvidia-a100-80gb); None: any
    memory_bytes: int | None = None  # per GPU


@dataclass(frozen=True)
class Requirement:
    """Everything a worker must have to run a task (tags, hardware, features)."""

    tags: tuple[str, ...] = ()
    cpu_millicores: int | None = None
    memory_bytes: int | None = None
    gpu: GpuNeed | None = None
    features: tuple[str, ...] = ()

    @property
    def needs_capabilities(self) -> bool:
        """True when the task needs more than tags: it goes to a capability queue."""
        return bool(self.cpu_millicores or self.memory_bytes or self.gpu or self.features)

    def name_parts(self) -> list[str]:
        """The parts of its queue name, in a fixed order (``cpu=2``, ``mem=16Gi``, ...)."""
        parts = []
        if self.tags:
            parts.append("tags=" + "+".join(self.tags))
        if self.cpu_millicores:
            millis = self.cpu_millicores
            parts.append(f"cpu={millis // 1000}" if millis % 1000 == 0 else f"cpu={millis}m")
        if self.memory_bytes:
            parts.append(f"mem={format_size_exact(self.memory_bytes)}")
        if self.gpu is not None:
            parts.append(f"gpu={self.gpu.count}")
            if self.gpu.type:
                parts.append(f"gpu_type={self.gpu.type}")
            if self.gpu.memory_bytes:
                parts.append(f"gpu_mem={format_size_exact(self.gpu.memory_bytes)}")
        if self.features:
            parts.append("features=" + "+".join(self.features))
        return parts

    def describe(self) -> str:
        """``cpu=2, mem=16Gi, gpu=1, gpu_type=t4`` (for messages)."""
        return ", ".join(self.name_parts()) or "nothing"

    def to_json(self) -> str:
        data: dict[str, Any] = {"tags": list(self.tags), "cpu_millicores": self.cpu_millicores,
                                "memory_bytes": self.memory_bytes, "features": list(self.features),
                                "gpu": None if self.gpu is None else {
                                    "count": self.gpu.count, "type": self.gpu.type,
                                    "memory_bytes": self.gpu.memory_bytes}}
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Requirement:
        data = json.loads(text)
        gpu = data.get("gpu")
        return cls(tags=tuple(data.get("tags") or ()), cpu_millicores=data.get("cpu_millicores"),
                   memory_bytes=data.get("memory_bytes"), features=tuple(data.get("features") or ()),
                   gpu=None if not gpu else GpuNeed(int(gpu["count"]), gpu.get("type"), gpu.get("memory_bytes")))


def requirement_of(spec: BaseTaskSpec) -> Requirement:
    """The requirement of a validated task spec."""
    return _requirement_of_fields(spec)


def _requirement_of_fields(fields: BaseTaskSpec) -> Requirement:
    """Tags, hardware, engine and training needs of a parsed task spec (a member of ``TaskSpec``,
    or its ``unresolved_member``, whose ``model`` may be absent)."""
    inference = fields.inference if isinstance(fields, InferenceTaskSpec) else None
    backend = inference.backend if inference is not None else None
    model = fields.model if isinstance(fields, ModelTaskSpec) else None
    vllm = model.vllm if model is not None else None
    training = fields.training if isinstance(fields, TrainingTaskSpec) else None
    features = _engine_features(backend) + _training_features(
        training.deepspeed if training is not None else None,
        training.auto_deepspeed_stage if training is not None else None)
    return _requirement(fields.tags, fields.resources, features,
                        _tensor_parallel_gpus(backend, vllm.tensor_parallel_size if vllm is not None else None))


def _training_features(deepspeed: Mapping[str, Any] | None, auto_stage: int | None) -> tuple[str, ...]:
    """ZeRO-3 shards the model itself over the ranks (a model that fits no single device): only
    a worker with DeepSpeed can run it. Stages 1-2 train with plain DDP where DeepSpeed is
    missing (a note says so), so they route anywhere."""
    stage = (deepspeed.get("zero_optimization") or {}).get("stage") if deepspeed else auto_stage
    return (DEEPSPEED,) if stage == 3 else ()


def _tensor_parallel_gpus(backend: str | None, tensor_parallel_size: int | None) -> int:
    """``model.vllm.tensor_parallel_size: N`` spreads the model over N GPUs of one worker: a
    hardware need like ``gpu.count`` (unless ``inference.backend: transformers`` never uses it)."""
    if backend == "transformers" or not tensor_parallel_size or tensor_parallel_size < 2:
        return 0
    return tensor_parallel_size


def _engine_features(backend: str | None) -> tuple[str, ...]:
    """``inference.backend: vllm`` is a routing requirement: only a worker with vLLM runs it
    (``auto`` and ``transformers`` run anywhere)."""
    return (VLLM,) if backend == VLLM else ()


# What routing reads; anything else in a raw spec is left to the worker's parse.
ROUTING_FIELDS = ("tags", "resources", "inference.backend", "model.vllm.tensor_parallel_size",
                  "training.deepspeed", "training.auto_deepspeed_stage")


def _not_routing(path: str) -> bool:
    return not any(path == name or path.startswith(name + ".") for name in ROUTING_FIELDS)


def requirement_of_raw(raw: Mapping[str, Any], prefix: str = "spec") -> Requirement:
    """The requirement of a raw spec (a plain Celery send, a stage typed only once resolved), from
    the one parse of a task spec with every field but routing's left to the worker; ``SpecError``
    naming the field when a routing field (``tags``, ``resources``...) is invalid."""
    spec = parse_task_spec(dict(raw), prefix, unresolved=_not_routing)
    return _requirement_of_fields(spec) if spec is not None else _requirement((), None)


def _requirement(tags: Iterable[str], resources: ResourcesSpec | None,
                 features: tuple[str, ...] = (), min_gpus: int = 0) -> Requirement:
    hardware = resources.hardware if resources is not None else None
    cpu = memory = None
    gpu = None
    if hardware is not None:
        cores = hardware.cpu_cores
        cpu = round(cores * 1000) if cores else None
        memory = hardware.memory_bytes or None
        if hardware.gpu is not None and hardware.gpu.count > 0:
            wanted = hardware.gpu.type
            gpu_type = None if wanted is None or wanted.strip().lower() == GPU_TYPE_ANY else canonical_gpu_type(wanted)
            gpu = GpuNeed(hardware.gpu.count, gpu_type, hardware.gpu.memory_bytes or None)
    if min_gpus and (gpu is None or gpu.count < min_gpus):
        gpu = GpuNeed(min_gpus, gpu.type if gpu else None, gpu.memory_bytes if gpu else None)
    return Requirement(tags=tuple(sorted(set(tags))), cpu_millicores=cpu, memory_bytes=memory, gpu=gpu,
                       features=tuple(sorted(set(features))))


# -- what a worker has -------------------------------------------------------------------------
@dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: int


@dataclass(frozen=True)
class Capabilities:
    """A worker's tags, hardware (from its probe) and features, as its hash records them."""

    tags: tuple[str, ...] = ()
    cpu: int = 1
    memory_bytes: int = 0
    gpus: tuple[Gpu, ...] = ()
    features: tuple[str, ...] = field(default=())

    @classmethod
    def from_hardware(cls, hardware: Mapping[str, Any], tags: Iterable[str] = (),
                      features: Iterable[str] = ()) -> Capabilities:
        """From ``app.worker.hardware.probe()`` (``cpu_count``, ``memory_total_bytes``, ``gpus``)."""
        gpus = tuple(Gpu(str(g.get("name", "")), int(g.get("memory_total_bytes") or 0))
                     for g in hardware.get("gpus") or [])
        return cls(tags=tuple(sorted(set(tags))), cpu=int(hardware.get("cpu_count") or 1),
                   memory_bytes=int(hardware.get("memory_total_bytes") or 0), gpus=gpus,
                   features=tuple(sorted(set(features))))

    def to_dict(self) -> dict[str, Any]:
        return {"tags": list(self.tags), "cpu": self.cpu, "memory_bytes": self.memory_bytes,
                "gpus": [{"name": g.name, "memory_bytes": g.memory_bytes} for g in self.gpus],
                "features": list(self.features)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Capabilities:
        return cls(tags=tuple(data.get("tags") or ()), cpu=int(data.get("cpu") or 1),
                   memory_bytes=int(data.get("memory_bytes") or 0),
                   gpus=tuple(Gpu(str(g["name"]), int(g["memory_bytes"])) for g in data.get("gpus") or []),
                   features=tuple(data.get("features") or ()))

    def summary(self) -> str:
        """``2 cpu, 23.4Gi, 1x NVIDIA A100-SXM4-80GB 80Gi`` (for ``meshq workers``)."""
        parts = [f"{self.cpu} cpu", format_size_exact(self.memory_bytes, approx=True)]
        names = sorted({(g.name, g.memory_bytes) for g in self.gpus})
        for name, memory in names:
            count = sum(1 for g in self.gpus if (g.name, g.memory_bytes) == (name, memory))
            parts.append(f"{count}x {name} {format_size_exact(memory, approx=True)}")
        parts += [f"+{feature}" for feature in self.features]
        return ", ".join(parts)

    def unmet(self, need: Requirement) -> list[str]:
        """What this worker lacks for ``need`` (empty: it can run the task)."""
        missing = []
        absent_tags = [t for t in need.tags if t not in self.tags]
        if absent_tags:
            missing.append(f"tags {'+'.join(absent_tags)}")
        if need.cpu_millicores and self.cpu * 1000 < need.cpu_millicores:
            missing.append(f"cpu {self.cpu} < {need.cpu_millicores / 1000:g}")
        if need.memory_bytes and self.memory_bytes < need.memory_bytes:
            missing.append(f"memory {format_size_exact(self.memory_bytes, approx=True)} < "
                           f"{format_size_exact(need.memory_bytes)}")
        if need.gpu is not None:
            fitting = [g for g in self.gpus if gpu_type_matches(need.gpu.type, g.name)
                       and (not need.gpu.memory_bytes or g.memory_bytes >= need.gpu.memory_bytes)]
            if len(fitting) < need.gpu.count:
                memory = f">= {format_size_exact(need.gpu.memory_bytes)}" if need.gpu.memory_bytes else ""
                what = " ".join(filter(None, [need.gpu.type, memory]))
                have = ", ".join(f"{g.name} {format_size_exact(g.memory_bytes, approx=True)}"
                                 for g in self.gpus) or "none"
                missing.append(f"gpus {len(fitting)} < {need.gpu.count}{(' ' + what) if what else ''} "
                               f"(has: {have})")
        absent = [f for f in need.features if f not in self.features]
        if absent:
            missing.append(f"features {'+'.join(absent)}")
        return missing

    def fits(self, need: Requirement) -> bool:
        return not self.unmet(need)
