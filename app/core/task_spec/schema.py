"""The task spec (DESIGN §5) as strict pydantic models, in meshq's and the original spelling.

Unknown fields are errors (never silently dropped); ``app.core.task_spec.validation`` turns
pydantic's errors into a ``SpecError`` naming the dotted path of the field.

Templates of the original system (``apiVersion: mloc/v1``, ``../shared/SEED-SPEC.md``)
are part of the schema: where two names mean one thing the original name is an
alias (``max_tokens`` = ``max_new_tokens``, ``steps`` = ``max_steps``,
``per_device_train_batch_size`` = ``batch_size``, ``save_freq`` = ``save_steps``,
``taskId`` = ``task_id``, ``config_name`` = ``name``); giving both spellings with
different values is an error. ``model.config`` (the older training spelling of
dtype/device map) is folded into ``model.transformers``.
"""

from __future__ import annotations

import functools
import typing
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from app.core.names import check_name
from app.core.settings import TAG_RE
from app.core.task_spec.sizes import parse_cpu, parse_size

TASK_TYPES = ("inference", "sft", "lora_sft", "dpo", "ppo", "echo")
TRAINING_TYPES = ("sft", "lora_sft", "dpo", "ppo")
LORA_TYPES = ("lora_sft", "dpo", "ppo")  # task types that may train a LoRA adapter (a ``lora`` block)
# Task types of the original system that need services meshq workers do not have.
REFUSED_TASK_TYPES = {
    "agent": "needs outside services (web search, tools) that meshq workers do not provide",
    "rag": "needs outside services (a vector database, web search) that meshq workers do not provide",
}


class Strict(BaseModel):
    # allow_inf_nan=False: every float field of every spec model refuses inf and NaN (YAML
    # ``1e400``, ``.inf``, the string "inf", JSON ``Infinity``) — one rule for all numeric fields.
    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, data: Any) -> Any:
        """``true``/``false`` in a numeric field is an error: pydantic would take it as 1/0
        (a bool is an int in Python), so ``max_shards: true`` would quietly mean 1."""
        if isinstance(data, dict):
            for key in _number_field_keys(cls):
                if isinstance(data.get(key), bool):
                    raise ValueError(f"{key}: must be a number, not {str(data[key]).lower()}")
        return data


@functools.cache
def _number_field_keys(model: type[BaseModel]) -> tuple[str, ...]:
    """The names (and aliases) of ``model``'s fields that take a number but not a boolean."""
    keys = []
    for name, info in model.model_fields.items():
        types = typing.get_args(info.annotation) or (info.annotation,)
        if bool not in types and any(t in (int, float) for t in types):
            aliases = info.validation_alias.choices if isinstance(info.validation_alias, AliasChoices) else []
            keys.extend([name, *(alias for alias in aliases if isinstance(alias, str))])
    return tuple(keys)


def one_spelling(data: Any, *names: str) -> Any:
    """Refuse two spellings of one field with different values (``max_tokens`` and
    ``max_new_tokens``); keep one of them when they agree."""
    if not isinstance(data, dict):
        return data
    given = [name for name in names if name in data]
    if len(given) > 1:
        values = {repr(data[name]) for name in given}
        if len(values) > 1:
            raise ValueError(f"{given[0]}: also given as {given[1]!r} with another value; "
                             f"{' and '.join(given)} mean the same, give one")
        data = {k: v for k, v in data.items() if k not in given[1:]}
    return data


# -- model ------------------------------------------------------------------------------------
class ModelSource(Strict):
    type: Literal["huggingface", "local"] | None = None  # informational: a hub id or a local path
    identifier: str = Field(min_length=1)
    revision: str | None = None
    trust_remote_code: bool | None = None  # the same as model.transformers.trust_remote_code


class TransformersOptions(Strict):
    device_map: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    trust_remote_code: bool = False
    low_cpu_mem_usage: bool | None = None


class ModelConfig(Strict):
    """The older training-template spelling: ``fp16: true`` is ``dtype: float16``,
    ``device_map_auto: true`` is ``device_map: auto``."""

    fp16: bool | None = None
    device_map_auto: bool | None = None


class VllmOptions(Strict):
    """Serve the model with vLLM where the worker has it (issue: the vLLM engine)."""

    tensor_parallel_size: int = Field(default=1, ge=1, le=64)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    max_model_len: int | None = Field(default=None, ge=1)
    trust_remote_code: bool = False


class AdapterSpec(Strict):
    """A LoRA adapter applied at inference: a local path, an archive URL, or an
    archive the orchestrator holds for ``taskId`` (``filename``; by default that task's one
    ``final_lora``/``final_model`` archive) — or several of them, the first that works on the
    worker wins (``tasks.sources``). ``merge`` merges it into the weights."""

    type: Literal["lora"] = "lora"
    path: str | None = None
    url: str | None = None
    task_id: str | None = Field(default=None, validation_alias=AliasChoices("task_id", "taskId"))
    filename: str | None = None
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")  # Rust regex: $ is the very end
    apply: Literal["merge", "attach"] = "merge"
    name: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _spellings(cls, data: Any) -> Any:
        return one_spelling(data, "task_id", "taskId")

    @model_validator(mode="after")
    def _where(self) -> AdapterSpec:
        if not any((self.path, self.url, self.task_id)):
            raise ValueError("path: give path, url or taskId (several: the first that works on the worker)")
        _check_names(self, ("task_id", "filename"))
        return self


class ModelSpec(Strict):
    source: ModelSource
    transformers: TransformersOptions = Field(default_factory=TransformersOptions)
    config: ModelConfig | None = None
    vllm: VllmOptions | None = None
    adapters: list[AdapterSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _fold_spellings(self) -> ModelSpec:
        """``model.config`` and ``source.trust_remote_code`` into ``model.transformers``."""
        given = self.transformers.model_fields_set
        if self.config is not None:
            if self.config.fp16:
                if "dtype" in given and self.transformers.dtype != "float16":
                    raise ValueError(f"config: fp16 true, but transformers.dtype is "
                                     f"{self.transformers.dtype!r}; give one")
                self.transformers.dtype = "float16"
            if self.config.device_map_auto:
                if "device_map" in given and self.transformers.device_map != "auto":
                    raise ValueError(f"config: device_map_auto true, but transformers.device_map is "
                                     f"{self.transformers.device_map!r}; give one")
                self.transformers.device_map = "auto"
        if self.source.trust_remote_code is not None:
            if "trust_remote_code" in given and self.transformers.trust_remote_code != self.source.trust_remote_code:
                raise ValueError("source: trust_remote_code differs from transformers.trust_remote_code; give one")
            self.transformers.trust_remote_code = self.source.trust_remote_code
        return self


class RewardModelSpec(Strict):
    """The reward model of a ``ppo`` task: a sequence classifier. Every type scores a
    sequence the same way (the classifier's ``positive_label`` logit, else a label named
    positive, else the last label; a one-label model's single logit): ``sentiment`` and
    ``classification`` are the original templates' names, ``sequence_classification`` meshq's."""

    identifier: str = Field(min_length=1)
    type: Literal["sentiment", "classification", "sequence_classification"] = "sequence_classification"
    revision: str | None = None
    positive_label: str | int | None = None


# -- data -------------------------------------------------------------------------------------
class GraphTemplateColumn(Strict):
    label: str | None = None
    node: str | None = None
    path: str | None = None
    expr: str | None = None  # <node>.<path>, instead of node + path
    default: Any = None      # the value when the path leads nowhere or to null


class GraphTemplateOptions(Strict):
    intro: str | list[str] | None = None
    closing: str | list[str] | None = None
    role: str | None = None  # the default intro's role ("energy strategist")


class GraphTemplate(Strict):
    """Prompts built from earlier graph nodes' results (``two_column_briefing``, or an
    inline ``text`` with ``{label}`` placeholders)."""

    name: str | None = None
    text: str | None = None
    columns: list[GraphTemplateColumn] = Field(default_factory=list)
    options: GraphTemplateOptions = Field(default_factory=GraphTemplateOptions)


class InferenceData(Strict):
    type: Literal["list", "dataset", "graph_template"] = "list"
    items: list[str] | None = None
    path: str | None = None
    url: str | None = None  # a hub id from the local cache, an http(s) URL, or a local path
    name: str | None = Field(default=None, validation_alias=AliasChoices("name", "config_name"))
    column: str = "prompt"
    split: str = "train"  # with slicing: train[:200], validation[:150], train[:2%]
    shuffle: bool = False
    seed: int | None = None
    trust_remote_code: bool = False
    metadata_columns: dict[str, str] | list[str] | None = None  # {column: alias} carried into each item
    max_samples: int | None = Field(default=None, ge=1)
    template: GraphTemplate | None = None
    notes: Any = None  # informational

    @model_validator(mode="before")
    @classmethod
    def _spellings(cls, data: Any) -> Any:
        return one_spelling(data, "name", "config_name")

    @model_validator(mode="after")
    def _source(self, info: ValidationInfo) -> InferenceData:
        if self.type == "list":
            if not self.items and not (info.context or {}).get(PROMPTS_IN_SHARDS):
                raise ValueError("items: a list of at least one prompt is required for type 'list'")
        elif self.type == "dataset":
            if not (self.path or self.url):
                raise ValueError("url: a dataset (hub id in the local cache, http(s) URL or path) "
                                 "is required for type 'dataset'")
        elif self.template is None:
            raise ValueError("template: required for type 'graph_template'")
        return self


class PromptPair(Strict):
    prompt: str
    response: str = ""


class PreferencePair(Strict):
    prompt: str
    chosen: str
    rejected: str


class JsonlSource(Strict):
    """A JSONL file (often an earlier stage's ``jsonl_export``) with named fields: its
    ``path``, its ``url``, or both (the path where the worker can read it, else the URL)."""

    path: str | None = None
    url: str | None = None
    prompt_field: str | None = None
    response_field: str | None = None
    query_field: str | None = None
    chosen_field: str | None = None
    rejected_field: str | None = None
    text_field: str | None = None

    @model_validator(mode="after")
    def _where(self) -> JsonlSource:
        if not (self.path or self.url):
            raise ValueError("path: give path or url (both: the path where the worker can read it, else the url)")
        return self


class TrainingData(Strict):
    type: Literal["list", "dataset", "jsonl"] | None = None  # informational: the source decides
    prompts: list[str | PromptPair] | None = None
    preferences: list[PreferencePair] | None = None
    jsonl: JsonlSource | None = None
    path: str | None = None
    url: str | None = None
    dataset_name: str | None = None  # a hub dataset in the local cache, or a local path
    name: str | None = Field(default=None, validation_alias=AliasChoices("name", "config_name"))
    split: str = "train"
    prompt_column: str = "prompt"
    response_column: str | None = "response"
    query_column: str | None = None
    chosen_column: str | None = None
    rejected_column: str | None = None
    text_field: str | None = None
    separator: str = "\n"
    max_samples: int | None = Field(default=None, ge=1)
    shuffle: bool = False
    seed: int | None = None
    trust_remote_code: bool = False
    notes: Any = None  # informational

    @model_validator(mode="before")
    @classmethod
    def _spellings(cls, data: Any) -> Any:
        return one_spelling(data, "name", "config_name")

    # What a task type does not train on: {a source field: why, naming what it takes instead}.
    refused_sources: ClassVar[dict[str, str]] = {}

    @model_validator(mode="after")
    def _source(self) -> TrainingData:
        sources = [name for name in ("prompts", "preferences", "jsonl", "path", "url", "dataset_name")
                   if getattr(self, name)]
        if not sources:
            raise ValueError("prompts: give prompts, preferences, a jsonl file, a dataset path, url "
                             "or dataset_name")
        if len(sources) > 1:
            raise ValueError(f"{sources[1]}: give one data source, not {' and '.join(sources)}")
        refused = next((name for name in self.refused_sources if getattr(self, name)), None)
        if refused is not None:
            raise ValueError(f"{refused}: {self.refused_sources[refused]}")
        return self


class SftData(TrainingData):
    """What ``sft`` and ``lora_sft`` train on: prompts (or prompt/response pairs), a table or a jsonl file."""

    refused_sources = {"preferences": "preference pairs are dpo data; sft and lora_sft train on prompts, "
                                      "a table or a jsonl file"}


class DpoData(TrainingData):
    """What ``dpo`` trains on: preference pairs ``{prompt, chosen, rejected}`` (inline, a table or a jsonl file)."""

    refused_sources = {"prompts": "dpo trains on preference pairs {prompt, chosen, rejected}: give "
                                  "data.preferences, a jsonl file or a table with those columns"}

    @model_validator(mode="after")
    def _no_plain_text(self) -> DpoData:
        if self.text_field or (self.jsonl is not None and self.jsonl.text_field):
            where = "text_field" if self.text_field else "jsonl.text_field"
            raise ValueError(f"{where}: dpo trains on preference pairs, not plain text")
        return self


class PpoData(TrainingData):
    """What ``ppo`` generates from: prompts (inline, a table's ``query_column`` or a jsonl ``query_field``)."""

    refused_sources = {"preferences": "ppo generates from prompts: give data.prompts, a jsonl file "
                                      "(query_field) or a table (query_column)"}


# -- per-task options -------------------------------------------------------------------------
class EchoOptions(Strict):
    """The echo task: the smallest real job; optional sleep in steps with progress."""

    message: Any = None
    sleep_s: float = Field(default=0.0, ge=0, le=3600)
    steps: int = Field(default=1, ge=1, le=100_000)


class InferenceOptions(Strict):
    max_new_tokens: int = Field(default=64, ge=1, le=32768,
                                validation_alias=AliasChoices("max_new_tokens", "max_tokens"))
    temperature: float = Field(default=1.0, ge=0)  # 0: greedy decoding, as vLLM and OpenAI-style APIs mean it
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    do_sample: bool = False
    repetition_penalty: float = Field(default=1.0, gt=0)
    stop: list[str] = Field(default_factory=list)
    system_prompt: str | None = None
    batch_size: int | None = Field(default=None, ge=1, le=4096)
    chat_template: bool | str | None = None
    seed: int | None = None
    backend: Literal["auto", "vllm", "transformers"] = "auto"
    # Generate max_new_tokens for every prompt, whatever the model says (benchmarks).
    ignore_eos: bool = False

    @model_validator(mode="before")
    @classmethod
    def _spellings(cls, data: Any) -> Any:
        return one_spelling(data, "max_new_tokens", "max_tokens")

    @property
    def sampling(self) -> bool:
        """Whether tokens are sampled: ``do_sample`` with a temperature above 0 (else greedy)."""
        return self.do_sample and self.temperature > 0

    def greedy_note(self) -> str | None:
        """The result's note when ``temperature: 0`` overrode ``do_sample: true``."""
        if self.do_sample and self.temperature == 0:
            return "inference.temperature: 0 means greedy decoding; do_sample: true had no effect"
        return None


class GenerationOptions(Strict):
    """Generation settings of a ``ppo`` task's rollouts."""

    max_new_tokens: int = Field(default=32, ge=1, le=32768,
                                validation_alias=AliasChoices("max_new_tokens", "max_tokens"))
    temperature: float = Field(default=1.0, gt=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    do_sample: bool = True

    @model_validator(mode="before")
    @classmethod
    def _spellings(cls, data: Any) -> Any:
        return one_spelling(data, "max_new_tokens", "max_tokens")


class TrainingOptions(Strict):
    num_train_epochs: float = Field(default=1.0, gt=0)
    max_steps: int | None = Field(default=None, ge=1, validation_alias=AliasChoices("max_steps", "steps"))
    batch_size: int = Field(default=4, ge=1,
                            validation_alias=AliasChoices("batch_size", "per_device_train_batch_size"))
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    learning_rate: float = Field(default=2e-4, gt=0)
    max_seq_length: int = Field(default=512, ge=8)
    save_steps: int = Field(default=50, ge=1, validation_alias=AliasChoices("save_steps", "save_freq"))
    save_strategy: Literal["steps", "epoch", "no"] = "steps"
    save_model: bool = True  # false: no final model is kept (metrics only)
    save_total_limit: int | None = Field(default=2, ge=1)
    logging_steps: int = Field(default=1, ge=1)
    warmup_steps: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    lr_scheduler_type: Literal["linear", "constant", "constant_with_warmup", "cosine"] = "linear"
    seed: int = 42
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False
    packing: bool = False
    # Multi-GPU data parallel on a worker with several GPUs (accepted; see the result's notes).
    allow_multi_gpu: bool = False
    visible_devices: list[int] | str | None = None
    auto_deepspeed_stage: int | None = Field(default=None, ge=0, le=3)
    deepspeed: dict[str, Any] | None = None
    # dpo
    beta: float | None = Field(default=None, gt=0)
    # ppo
    mini_batch_size: int | None = Field(default=None, ge=1)
    ppo_epochs: int | None = Field(default=None, ge=1)
    target_kl: float | None = Field(default=None, gt=0)
    early_stopping: bool | None = None
    optimize_cuda_cache: bool | None = None
    # experiment trackers of the original system: informational (meshq reports to none)
    log_with: str | None = None
    tracker_project_name: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _spellings(cls, data: Any) -> Any:
        for names in (("max_steps", "steps"), ("batch_size", "per_device_train_batch_size"),
                      ("save_steps", "save_freq")):
            data = one_spelling(data, *names)
        return data

    @model_validator(mode="after")
    def _mini_batch(self) -> TrainingOptions:
        if self.mini_batch_size is not None and self.mini_batch_size > self.batch_size:
            raise ValueError(f"mini_batch_size: {self.mini_batch_size} is larger than batch_size "
                             f"{self.batch_size} (a ppo mini-batch is a part of one rollout batch)")
        return self


DPO_TRAINING_FIELDS = ("beta",)
PPO_TRAINING_FIELDS = ("mini_batch_size", "ppo_epochs", "target_kl", "early_stopping", "optimize_cuda_cache")


class LoraOptions(Strict):
    r: int = Field(default=8, ge=1)
    alpha: int = Field(default=16, ge=1)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    bias: Literal["none", "all", "lora_only"] = "none"
    target_modules: list[str] | str | None = None
    # e.g. ["lm_head"]: also train (and save) these whole modules; peft matches a name against the
    # trailing components of each module's path ("norm" is model.norm, not input_layernorm)
    modules_to_save: list[str] | None = None
    task_type: Literal["CAUSAL_LM"] = "CAUSAL_LM"
    use_rslora: bool = False


class JsonlExportField(Strict):
    """One field of an exported row: the generation, a metadata column, the prompt, or a
    constant (``from: literal`` with ``value``, any JSON value; or ``value`` alone)."""

    from_: Literal["output", "metadata", "prompt", "literal"] | None = Field(default=None, alias="from")
    key: str | None = None
    value: Any = None

    @model_validator(mode="after")
    def _what(self) -> JsonlExportField:
        if self.from_ is None and self.value is None:
            raise ValueError("from: give from (output, metadata, prompt or literal) or a constant value")
        if self.from_ == "literal" and "value" not in self.model_fields_set:
            raise ValueError("value: required with from: literal (the constant written in every row)")
        if self.from_ == "metadata" and not self.key:
            raise ValueError("key: required with from: metadata (the metadata column's name)")
        return self


class JsonlExport(Strict):
    path: str = "export.jsonl"
    fields: dict[str, JsonlExportField] = Field(min_length=1)
    required_fields: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _required(self) -> JsonlExport:
        unknown = [name for name in self.required_fields if name not in self.fields]
        if unknown:
            raise ValueError(f"required_fields: {unknown[0]!r} is not one of the fields")
        if not self.path.startswith("${"):  # a reference is checked once resolved
            parts = self.path.split("/")
            try:
                for part in parts:
                    check_name(part, "path")
            except ValueError:
                raise ValueError(f"path: {self.path!r} must be a relative path in the task directory "
                                 "(components of [A-Za-z0-9._-], no '..')") from None
        return self


class PostprocessSpec(Strict):
    jsonl_export: JsonlExport | None = None


def _check_names(model: BaseModel, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(model, name)
        if value is not None and not value.startswith("${"):  # a reference is checked once resolved
            try:
                check_name(value, name)
            except ValueError as exc:
                raise ValueError(str(exc)) from None


class CheckpointLoad(Strict):
    type: Literal["http", "local"]
    url: str | None = None
    path: str | None = None
    task_id: str | None = Field(default=None, validation_alias=AliasChoices("task_id", "taskId"))
    filename: str | None = None
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")  # Rust regex: $ is the very end
    archive_format: Literal["zip", "tar.gz"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _spellings(cls, data: Any) -> Any:
        return one_spelling(data, "task_id", "taskId")

    @model_validator(mode="after")
    def _where(self) -> CheckpointLoad:
        # One source must agree with ``type``; with several (path, url, taskId) the first that
        # works on the worker wins whatever the type says (tasks.sources).
        several = sum(1 for source in (self.path, self.url, self.task_id) if source) > 1
        if self.type == "local" and not self.path and not several:
            raise ValueError("path: required when type is 'local'")
        if self.type == "http" and not self.url and not self.task_id and not several:
            raise ValueError("url: required when type is 'http' (or taskId, with an optional filename)")
        _check_names(self, ("task_id", "filename"))
        return self


class CheckpointSpec(Strict):
    load: CheckpointLoad | None = None


class Destination(Strict):
    type: Literal["local", "http"] = "local"
    path: str | None = None  # informational: results stay in RESULTS_DIR/<task_id>/
    url: str | None = None
    method: Literal["POST", "PUT"] = "POST"
    headers: dict[str, str] = Field(default_factory=dict)
    timeoutSec: float = Field(default=300.0, gt=0)


class OutputSpec(Strict):
    destination: Destination = Field(default_factory=Destination)
    archive_format: Literal["zip", "tar.gz"] = "zip"
    artifacts: list[str] = Field(default_factory=list)


# -- placement --------------------------------------------------------------------------------
class GpuRequirement(Strict):
    count: int = Field(default=1, ge=0, le=64)
    type: str | None = None  # "any" or a product name such as nvidia-a100-80gb
    memory: str | int | None = None  # per GPU: 46Gi

    @field_validator("type")
    @classmethod
    def _type(cls, value: str | None) -> str | None:
        if value is not None and not any(ch.isalnum() for ch in value):
            raise ValueError(f"{value!r} is not a GPU product name such as nvidia-a100-80gb, or any")
        return value

    @field_validator("memory")
    @classmethod
    def _memory(cls, value: str | int | None) -> str | int | None:
        if value is not None:
            parse_size(value)
        return value

    @property
    def memory_bytes(self) -> int | None:
        return parse_size(self.memory) if self.memory is not None else None


class HardwareRequirement(Strict):
    cpu: str | float | None = None  # cores: 16, "16", "500m"
    memory: str | int | None = None  # RAM: 64Gi
    gpu: GpuRequirement | None = None

    @field_validator("cpu")
    @classmethod
    def _cpu(cls, value: str | float | None) -> str | float | None:
        if value is not None:
            parse_cpu(value)
        return value

    @field_validator("memory")
    @classmethod
    def _memory(cls, value: str | int | None) -> str | int | None:
        if value is not None:
            parse_size(value)
        return value

    @property
    def cpu_cores(self) -> float | None:
        return parse_cpu(self.cpu) if self.cpu is not None else None

    @property
    def memory_bytes(self) -> int | None:
        return parse_size(self.memory) if self.memory is not None else None


class ResourcesSpec(Strict):
    replicas: int = Field(default=1, ge=1, le=1024)  # how many workers may share the task
    hardware: HardwareRequirement | None = None


class ParallelSpec(Strict):
    """Data-parallel sharding of an inference task's prompts across workers."""

    enabled: bool = False
    max_shards: int = Field(default=2, ge=1, le=1024)


# -- the task ---------------------------------------------------------------------------------
# The sections not every task type has, and the types whose member of ``TaskSpec`` declares each;
# a section given to another type is refused naming them (``BaseTaskSpec._misplaced_sections``),
# the first in this order. ``sft`` shares its member with ``lora_sft`` but has no ``lora``.
SECTION_TYPES: dict[str, tuple[str, ...]] = {
    "training": TRAINING_TYPES,
    "lora": LORA_TYPES,
    "echo": ("echo",),
    "inference": ("inference",),
    "postprocess": ("inference",),
    "parallel": ("inference",),
    "reward_model": ("ppo",),
    "generation": ("ppo",),
    "model": ("inference", *TRAINING_TYPES),
    "checkpoint": ("inference", *TRAINING_TYPES),
}


def misplaced_section_message(name: str, task_type: str) -> str:
    """Why ``name`` is refused for ``task_type``: the type(s) that use it where they are few."""
    users = SECTION_TYPES[name]
    if len(users) == 1:
        return f"{name}: only allowed for taskType {users[0]!r}, not {task_type!r}"
    if name == "lora":
        return f"lora: only allowed for taskType {', '.join(users)}, not {task_type!r}"
    return f"{name}: not allowed for taskType {task_type!r}"


class BaseTaskSpec(Strict):
    """What every task type shares; each member of ``TaskSpec`` narrows ``taskType``, types its
    ``data`` and declares the sections its type uses (``SECTION_TYPES``)."""

    taskType: str
    tags: list[str] = Field(default_factory=list)
    resources: ResourcesSpec | None = None
    enforce_cpu: bool = False
    sloSeconds: float | None = Field(default=None, gt=0)
    data: Any = None  # typed by each member of TaskSpec
    output: OutputSpec = Field(default_factory=OutputSpec)

    @model_validator(mode="before")
    @classmethod
    def _misplaced_sections(cls, data: Any) -> Any:
        """A section of another task type is refused naming the types that use it, not as an
        unknown field; an empty one (``lora: null``) is dropped. With a ``taskType`` that names no
        type the sections cannot be judged: they are dropped and the type is the one error."""
        if not isinstance(data, dict):
            return data
        kind = data.get("taskType")
        if not (isinstance(kind, str) and kind in TASK_TYPES):
            return {key: value for key, value in data.items() if key not in SECTION_TYPES}
        misplaced = [name for name, users in SECTION_TYPES.items() if name in data and kind not in users]
        for name in misplaced:
            if data[name] is not None:
                raise ValueError(misplaced_section_message(name, kind))
        return {key: value for key, value in data.items() if key not in misplaced}

    @field_validator("taskType")
    @classmethod
    def _known_type(cls, value: str) -> str:
        if value in REFUSED_TASK_TYPES:
            raise ValueError(f"{value!r} {REFUSED_TASK_TYPES[value]}")
        if value not in TASK_TYPES:
            raise ValueError(f"unknown task type {value!r}; expected one of {', '.join(TASK_TYPES)}")
        return value

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: list[str]) -> list[str]:
        for tag in value:
            if not TAG_RE.match(tag):
                raise ValueError(f"tag {tag!r} is not 1-32 characters of [A-Za-z0-9_-]")
        return sorted(set(value))

    # ``data`` as the type the caller reads (parsed once, with the spec; no copy, no check again).
    def inference_data(self) -> InferenceData:
        if not isinstance(self.data, InferenceData):
            raise TypeError(f"taskType {self.taskType!r} has no inference data")
        return self.data

    def training_data(self) -> TrainingData:
        if not isinstance(self.data, TrainingData):
            raise TypeError(f"taskType {self.taskType!r} has no training data")
        return self.data

    @property
    def shards(self) -> int:
        """How many workers may share this task: ``resources.replicas`` (1: none)."""
        return self.resources.replicas if self.resources is not None else 1


class ModelTaskSpec(BaseTaskSpec):
    """A task that loads a model: inference and every training type."""

    model: ModelSpec
    checkpoint: CheckpointSpec | None = None

    @model_validator(mode="after")
    def _across_sections(self) -> ModelTaskSpec:
        self._type_checks()
        model = self.model  # None only in a spec typed around unresolved references (``unresolved_member``)
        if model is None:
            return self
        if self.enforce_cpu and model.transformers.device_map == "cuda":
            raise ValueError("enforce_cpu: true, but model.transformers.device_map is 'cuda'; give one")
        load = self.checkpoint.load if self.checkpoint else None
        if model.adapters and load is not None:
            raise ValueError("model: adapters and checkpoint.load both name weights to start from; give one")
        remote_code = model.transformers.trust_remote_code or bool(model.vllm and model.vllm.trust_remote_code)
        downloads = (load is not None and load.type == "http") or any(not a.path for a in model.adapters)
        if remote_code and downloads:
            raise ValueError("model: trust_remote_code is never allowed with weights downloaded from a URL or "
                             "the orchestrator (checkpoint.load, model.adapters): their code would run on the worker")
        return self

    def _type_checks(self) -> None:
        """The checks of one kind of task, before those across its model sections."""


class InferenceTaskSpec(ModelTaskSpec):
    taskType: Literal["inference"]
    data: InferenceData
    inference: InferenceOptions | None = None
    postprocess: PostprocessSpec | None = None
    parallel: ParallelSpec | None = None

    @property
    def shards(self) -> int:
        """``parallel.max_shards`` when enabled, else ``resources.replicas`` (1: none)."""
        if self.parallel is not None and self.parallel.enabled:
            return self.parallel.max_shards
        return super().shards


class TrainingTaskSpec(ModelTaskSpec):
    """A task that trains a model (``TRAINING_TYPES``)."""

    training: TrainingOptions | None = None
    lora: LoraOptions | None = None

    def _type_checks(self) -> None:
        kind = self.taskType
        if self.training is not None:
            given = self.training.model_fields_set
            if kind in ("dpo", "ppo") and self.training.packing:
                raise ValueError(f"training: packing concatenates sft examples; it has no meaning for {kind!r}")
            if kind == "ppo" and (self.training.bf16 or self.training.fp16):
                raise ValueError("training: bf16/fp16 mixed precision is not implemented for ppo "
                                 "(it trains in the weights' dtype, model.transformers.dtype)")
            if kind != "dpo" and "beta" in given:
                raise ValueError(f"training: beta is a dpo setting, not for taskType {kind!r}")
            ppo_only = [name for name in PPO_TRAINING_FIELDS if name in given]
            if kind != "ppo" and ppo_only:
                raise ValueError(f"training: {ppo_only[0]} is a ppo setting, not for taskType {kind!r}")
        if self.model is not None and self.model.adapters:
            raise ValueError(f"model: adapters are applied at inference; for taskType {kind!r} "
                             "use checkpoint.load")


class EchoTaskSpec(BaseTaskSpec):
    taskType: Literal["echo"]
    data: dict[str, Any] | None = None  # echoed back as given
    echo: EchoOptions | None = None


class SftTaskSpec(TrainingTaskSpec):
    taskType: Literal["sft", "lora_sft"]
    data: SftData


class DpoTaskSpec(TrainingTaskSpec):
    taskType: Literal["dpo"]
    data: DpoData


class PpoTaskSpec(TrainingTaskSpec):
    taskType: Literal["ppo"]
    data: PpoData
    reward_model: RewardModelSpec
    generation: GenerationOptions | None = None


# A task spec: one member per task type, chosen by ``taskType`` (``app.core.task_spec.validation.parse_task_spec``).
TaskSpec = Annotated[InferenceTaskSpec | EchoTaskSpec | SftTaskSpec | DpoTaskSpec | PpoTaskSpec,
                     Field(discriminator="taskType")]
TASK_SPEC_MODELS: dict[str, type[BaseTaskSpec]] = {
    "inference": InferenceTaskSpec,
    "echo": EchoTaskSpec,
    "sft": SftTaskSpec,
    "lora_sft": SftTaskSpec,
    "dpo": DpoTaskSpec,
    "ppo": PpoTaskSpec,
}
# Sections a member of TaskSpec requires (``app.core.task_spec.validation`` names the type in the message).
REQUIRED_SECTIONS = ("model", "data", "reward_model")


@functools.cache
def unresolved_member(task_type: str) -> type[BaseTaskSpec]:
    """The member of ``task_type`` as a spec is typed at submission while some fields wait for
    ``${...}`` references the worker resolves (``validation._typed_around``): a subclass of the
    member (routing reads its sections through ``isinstance``) whose ``data`` is untyped and whose
    required sections may be absent; every other field and check is the member's."""
    member = TASK_SPEC_MODELS[task_type]
    loosened: dict[str, Any] = {"data": (Any, None)}
    if issubclass(member, ModelTaskSpec):
        loosened["model"] = (ModelSpec | None, None)
    if issubclass(member, PpoTaskSpec):
        loosened["reward_model"] = (RewardModelSpec | None, None)
    return create_model(f"Unresolved{member.__name__}", __base__=member, **loosened)


SpecT = TypeVar("SpecT", bound=BaseTaskSpec)


def spec_as(spec: BaseTaskSpec, member: type[SpecT]) -> SpecT:
    """``spec`` as the member (or group of members) an executor runs: the task layer sends each
    task type to its own executor, so anything else is a programming error."""
    if not isinstance(spec, member):
        raise TypeError(f"taskType {spec.taskType!r} is not a {member.__name__}")
    return spec


# Validation context: the prompts of a sharded task's merge went to its shards (``data.items`` may be absent).
PROMPTS_IN_SHARDS = "prompts_in_shards"
