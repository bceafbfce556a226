"""The Celery tasks, one per task type (``meshq.<taskType>``), registered with the app.

Each is a ``MeshqTask`` naming its task type; the work is its executor's
(``tasks.executors.EXECUTORS``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.celery import app
from app.core.task_spec import InferenceTaskSpec, TaskSpec, spec_as
from tasks.base import MeshqTask
from tasks.executors.shards import PromptRange
from tasks.merging import run_with_merges
from tasks.shards import InferenceMergeTask, split_inference


class EchoTask(MeshqTask):
    name = "meshq.echo"
    task_type = "echo"


class InferenceTask(MeshqTask):
    name = "meshq.inference"
    task_type = "inference"

    def split(self, spec: TaskSpec, raw_spec: Any, out_dir: Path, progress: Any,
              pipeline: dict[str, Any] | None) -> None:
        split_inference(self, spec_as(spec, InferenceTaskSpec), raw_spec, out_dir)  # parallel.max_shards / resources.replicas

    def executor_options(self, shard: dict[str, Any] | None) -> dict[str, Any]:
        return {"shard": PromptRange.from_dict(shard), "metadata": shard.get("metadata")} if shard else {}

    def run_executor(self, executor: Any, spec: TaskSpec, out_dir: Path, progress: Any,
                     shard: dict[str, Any] | None) -> dict[str, Any]:
        # Waiting tasks of the same model and settings join this one's generation (tasks.merging).
        merged = None if shard else run_with_merges(self, executor, spec, out_dir, progress)
        return merged if merged is not None else super().run_executor(executor, spec, out_dir, progress, shard)


class SFTTask(MeshqTask):
    name = "meshq.sft"
    task_type = "sft"


class LoRASFTTask(MeshqTask):
    name = "meshq.lora_sft"
    task_type = "lora_sft"


class DPOTask(MeshqTask):
    name = "meshq.dpo"
    task_type = "dpo"


class PPOTask(MeshqTask):
    name = "meshq.ppo"
    task_type = "ppo"


echo = app.register_task(EchoTask())
inference = app.register_task(InferenceTask())
sft = app.register_task(SFTTask())
lora_sft = app.register_task(LoRASFTTask())
dpo = app.register_task(DPOTask())
ppo = app.register_task(PPOTask())
inference_merge = app.register_task(InferenceMergeTask())
