"""The Celery tasks, one per task type (``meshq.<taskType>``), registered with the app.

Each is a ``MeshqTask`` naming its task type; the work is its executor's
(``tasks.executors.EXECUTORS``).
"""

from __future__ import annotations

from app.celery import app
from tasks.base import MeshqTask


class EchoTask(MeshqTask):
    name = "meshq.echo"
    task_type = "echo"


class InferenceTask(MeshqTask):
    name = "meshq.inference"
    task_type = "inference"


class SFTTask(MeshqTask):
    name = "meshq.sft"
    task_type = "sft"


class LoRASFTTask(MeshqTask):
    name = "meshq.lora_sft"
    task_type = "lora_sft"


class DPOTask(MeshqTask):
    name = "meshq.dpo"
    task_type = "dpo"


echo = app.register_task(EchoTask())
inference = app.register_task(InferenceTask())
sft = app.register_task(SFTTask())
lora_sft = app.register_task(LoRASFTTask())
dpo = app.register_task(DPOTask())
