"""Celery tasks (thin wrappers, ``tasks.base``) around executors (plain classes, ``tasks.executors``).

Importing this package registers every meshq task with the Celery app.
"""

from tasks.definitions import dpo, echo, inference, lora_sft, ppo, sft

__all__ = ["dpo", "echo", "inference", "lora_sft", "ppo", "sft"]
