"""Executors: the work of each task type as plain classes that know nothing of Celery.

An executor is ``run(spec, out_dir, progress) -> dict``: a validated spec and the
task's output directory in, the result out, progress and cancellation through
``progress`` (``tasks.executors.progress``). They can be run and tested without a
broker; ``tasks.base.MeshqTask`` is the thin Celery layer around them.

Nothing here imports torch, transformers or peft at module level: the worker's
parent process imports this package (through ``tasks``) and must stay free of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from app.core.task_spec import TaskSpec
from tasks.executors.dpo import DPOExecutor
from tasks.executors.echo import EchoExecutor
from tasks.executors.inference import InferenceExecutor
from tasks.executors.ppo import PPOExecutor
from tasks.executors.progress import Progress
from tasks.executors.training import LoRASFTExecutor, SFTExecutor


class Executor(Protocol):
    """Pure work: spec + output directory in, result dict out, progress via callback.

    An executor whose class sets ``writes_files = False`` promises to leave nothing
    in ``out_dir``: its manifest is then made without reading the directory.
    """

    def run(self, spec: TaskSpec, out_dir: Path, progress: Progress) -> dict[str, Any]: ...


# taskType → executor class. One instance per worker process (``tasks.base``), kept
# between tasks so an executor can keep its model warm.
EXECUTORS: dict[str, type[Executor]] = {
    "echo": EchoExecutor,
    "inference": InferenceExecutor,
    "sft": SFTExecutor,
    "lora_sft": LoRASFTExecutor,
    "dpo": DPOExecutor,
    "ppo": PPOExecutor,
}

__all__ = ["EXECUTORS", "DPOExecutor", "Executor", "EchoExecutor", "InferenceExecutor", "LoRASFTExecutor", "PPOExecutor", "SFTExecutor"]
