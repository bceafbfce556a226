"""The task spec: strict pydantic models (``schema``) and their validation (``validation``).

Pure data and checks, no I/O: every layer may import it (the server and the CLI
validate at submission, pipelines merge stages, the worker validates again before
it loads a model, artifacts read their sections).
"""

from app.core.task_spec.schema import (
    TASK_TYPES,
    TRAINING_TYPES,
    BaseTaskSpec,
    CheckpointLoad,
    CheckpointSpec,
    Destination,
    DpoTaskSpec,
    EchoOptions,
    EchoTaskSpec,
    InferenceData,
    InferenceOptions,
    InferenceTaskSpec,
    LoraOptions,
    ModelSource,
    ModelSpec,
    ModelTaskSpec,
    OutputSpec,
    PpoTaskSpec,
    PromptPair,
    SftTaskSpec,
    TaskSpec,
    TrainingData,
    TrainingOptions,
    TrainingTaskSpec,
    TransformersOptions,
    spec_as,
)
from app.core.task_spec.validation import error_messages, parse_task_spec, spec_error_from, spec_error_from_messages

__all__ = [
    "TASK_TYPES", "TRAINING_TYPES", "BaseTaskSpec", "CheckpointLoad", "CheckpointSpec", "Destination",
    "DpoTaskSpec", "EchoOptions", "EchoTaskSpec", "InferenceData", "InferenceOptions", "InferenceTaskSpec",
    "LoraOptions", "ModelSource", "ModelSpec", "ModelTaskSpec", "OutputSpec", "PpoTaskSpec", "PromptPair",
    "SftTaskSpec", "TaskSpec", "TrainingData", "TrainingOptions", "TrainingTaskSpec", "TransformersOptions",
    "error_messages", "parse_task_spec", "spec_as", "spec_error_from", "spec_error_from_messages",
]
