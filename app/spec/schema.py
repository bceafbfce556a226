"""The task spec (DESIGN §5) as strict pydantic models.

Unknown fields are errors (never silently dropped); ``app.spec.validation`` turns
pydantic's errors into a ``SpecError`` naming the dotted path of the field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.names import check_name
from app.settings import TAG_RE

TASK_TYPES = ("inference", "sft", "lora_sft", "echo")
TRAINING_TYPES = ("sft", "lora_sft")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModelSource(Strict):
    identifier: str = Field(min_length=1)
    revision: str | None = None


class TransformersOptions(Strict):
    device_map: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    trust_remote_code: bool = False


class ModelSpec(Strict):
    source: ModelSource
    transformers: TransformersOptions = Field(default_factory=TransformersOptions)


class InferenceData(Strict):
    type: Literal["list", "dataset"] = "list"
    items: list[str] | None = None
    path: str | None = None
    url: str | None = None
    name: str | None = None  # HF dataset config name
    column: str = "prompt"
    split: str = "train"

    @model_validator(mode="after")
    def _source(self) -> InferenceData:
        if self.type == "list":
            if not self.items:
                raise ValueError("items: a list of at least one prompt is required for type 'list'")
        elif not (self.path or self.url):
            raise ValueError("path: a dataset path, url or cached dataset name is required for type 'dataset'")
        return self


class PromptPair(Strict):
    prompt: str
    response: str = ""


class TrainingData(Strict):
    prompts: list[str | PromptPair] | None = None
    path: str | None = None
    url: str | None = None
    name: str | None = None  # HF dataset config name
    split: str = "train"
    prompt_column: str = "prompt"
    response_column: str | None = "response"
    text_field: str | None = None
    separator: str = "\n"
    max_samples: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _source(self) -> TrainingData:
        if not self.prompts and not (self.path or self.url):
            raise ValueError("prompts: give a non-empty prompts list or a dataset path")
        return self


class EchoOptions(Strict):
    """The echo task: the smallest real job; optional sleep in steps with progress."""

    message: Any = None
    sleep_s: float = Field(default=0.0, ge=0, le=3600)
    steps: int = Field(default=1, ge=1, le=100_000)


class InferenceOptions(Strict):
    max_new_tokens: int = Field(default=64, ge=1, le=32768)
    temperature: float = Field(default=1.0, gt=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    do_sample: bool = False
    repetition_penalty: float = Field(default=1.0, gt=0)
    stop: list[str] = Field(default_factory=list)
    system_prompt: str | None = None
    batch_size: int | None = Field(default=None, ge=1, le=4096)
    chat_template: bool | str | None = None
    seed: int | None = None


class TrainingOptions(Strict):
    num_train_epochs: float = Field(default=1.0, gt=0)
    max_steps: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=4, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    learning_rate: float = Field(default=2e-4, gt=0)
    max_seq_length: int = Field(default=512, ge=8)
    save_steps: int = Field(default=50, ge=1)
    save_total_limit: int | None = Field(default=2, ge=1)
    logging_steps: int = Field(default=1, ge=1)
    warmup_steps: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    lr_scheduler_type: Literal["linear", "constant", "constant_with_warmup", "cosine"] = "linear"
    seed: int = 42
    bf16: bool = False
    fp16: bool = False


class LoraOptions(Strict):
    r: int = Field(default=8, ge=1)
    alpha: int = Field(default=16, ge=1)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    bias: Literal["none", "all", "lora_only"] = "none"
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None  # e.g. ["norm"]: also train (and save) these whole modules
    task_type: Literal["CAUSAL_LM"] = "CAUSAL_LM"


class CheckpointLoad(Strict):
    type: Literal["http", "local"]
    url: str | None = None
    path: str | None = None
    task_id: str | None = None
    filename: str | None = None
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")
    archive_format: Literal["zip", "tar.gz"] | None = None

    @model_validator(mode="after")
    def _where(self) -> CheckpointLoad:
        if self.type == "local" and not self.path:
            raise ValueError("path: required when type is 'local'")
        if self.type == "http" and not self.url and not (self.task_id and self.filename):
            raise ValueError("url: required when type is 'http' (or task_id and filename)")
        for name in ("task_id", "filename"):
            value = getattr(self, name)
            if value is not None and not value.startswith("${"):  # a reference is checked once resolved
                try:
                    check_name(value, name)
                except ValueError as exc:
                    raise ValueError(str(exc)) from None
        return self


class CheckpointSpec(Strict):
    load: CheckpointLoad | None = None


class Destination(Strict):
    type: Literal["local", "http"] = "local"
    path: str | None = None
    url: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    timeoutSec: float = Field(default=300.0, gt=0)


class OutputSpec(Strict):
    destination: Destination = Field(default_factory=Destination)
    archive_format: Literal["zip", "tar.gz"] = "zip"
    artifacts: list[str] = Field(default_factory=list)


class TaskSpec(Strict):
    taskType: str
    tags: list[str] = Field(default_factory=list)
    model: ModelSpec | None = None
    data: dict[str, Any] | None = None
    inference: InferenceOptions | None = None
    training: TrainingOptions | None = None
    lora: LoraOptions | None = None
    checkpoint: CheckpointSpec | None = None
    output: OutputSpec = Field(default_factory=OutputSpec)
    echo: EchoOptions | None = None

    @field_validator("taskType")
    @classmethod
    def _known_type(cls, value: str) -> str:
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

    @model_validator(mode="after")
    def _sections(self) -> TaskSpec:
        if self.taskType in ("inference", *TRAINING_TYPES):
            if self.model is None:
                raise ValueError(f"model: required for taskType {self.taskType!r}")
            if self.data is None:
                raise ValueError(f"data: required for taskType {self.taskType!r}")
        if self.taskType == "inference" and (self.training is not None or self.lora is not None):
            raise ValueError("training: not allowed for taskType 'inference'")
        if self.taskType != "lora_sft" and self.lora is not None:
            raise ValueError(f"lora: only allowed for taskType 'lora_sft', not {self.taskType!r}")
        if self.taskType != "echo" and self.echo is not None:
            raise ValueError(f"echo: only allowed for taskType 'echo', not {self.taskType!r}")
        return self

    # Typed views of ``data`` for each task type (validated in ``parse_task_spec``).
    def inference_data(self) -> InferenceData:
        return InferenceData.model_validate(self.data or {})

    def training_data(self) -> TrainingData:
        return TrainingData.model_validate(self.data or {})


DATA_MODELS: dict[str, type[Strict]] = {
    "inference": InferenceData,
    "sft": TrainingData,
    "lora_sft": TrainingData,
}
