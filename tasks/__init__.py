"""Celery tasks (thin wrappers) and their executors (plain classes).

Importing this package registers every meshq task with the Celery app.
"""

from tasks import delivery  # noqa: F401  (installs the http-destination result hook)
from tasks.echo import echo
from tasks.inference import inference
from tasks.training import lora_sft, sft

__all__ = ["echo", "inference", "lora_sft", "sft"]
