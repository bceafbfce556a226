"""Training that diverged: a loss or weight that is no longer a finite number fails the task.

The spec refuses inf and NaN, but a finite setting can still blow training up (a
``learning_rate`` of 1e30 turns the weights into inf/NaN within a step). transformers'
``Trainer`` would log such a loss as 0 and save the broken weights as if all went well;
every training executor instead checks its loss at each logged step and its trainable
weights before they are saved, and fails naming the task type and the step.

Nothing here imports torch at module level (the worker's parent process must not).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from app.core.errors import ExecutorError


class TrainingDiverged(ExecutorError):
    """A training task's loss or weights stopped being finite numbers."""


def _advice(learning_rate: float) -> str:
    return f"lower training.learning_rate (it is {learning_rate:g})"


def check_loss(task_type: str, step: int, name: str, value: Any, learning_rate: float) -> None:
    """Raise ``TrainingDiverged`` when ``value`` (a logged loss or metric) is inf or NaN."""
    number = float(value)
    if not math.isfinite(number):
        raise TrainingDiverged(f"{task_type} training diverged at step {step}: the {name} is {number} "
                               f"(not a finite number); {_advice(learning_rate)}")


def check_weights(task_type: str, step: int, parameters: Iterable[Any], learning_rate: float) -> None:
    """Raise ``TrainingDiverged`` when any of ``parameters`` (the trainable tensors) holds inf or NaN."""
    import torch

    with torch.no_grad():
        for parameter in parameters:
            if not bool(torch.isfinite(parameter).all()):
                raise TrainingDiverged(f"{task_type} training diverged at step {step}: the trained weights "
                                       f"hold inf or NaN values; {_advice(learning_rate)}")
