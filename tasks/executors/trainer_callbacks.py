"""The ``TrainerCallback`` that connects transformers' ``Trainer`` to a meshq ``Progress``.

Imported only inside a running training task (it imports transformers); the
worker's parent process never loads it.

Every optimiser step it reports ``{step, total_steps, epoch, loss, learning_rate,
eta_s, loss_history}`` (the ``Progress`` rate-limits what reaches Celery; the history
is sampled like the result's, so a running task's loss curve can be drawn) and polls
the cancel flag; a cancelled task stops cooperatively at the end of the current step.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from tasks.executors.divergence import check_loss
from tasks.executors.progress import Progress
from tasks.executors.training import LOSS_HISTORY_POINTS, sample_history

log = logging.getLogger(__name__)
LOG_EVERY_S = 10.0  # a worker-log line about training at most this often


class MeshqProgressCallback(TrainerCallback):
    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.cancelled_at_step: int | None = None
        self.start_step = 0
        self.started = time.monotonic()
        self.last_loss: float | None = None
        self.last_lr: float | None = None
        self.losses: list[tuple[int, float]] = []  # (step, loss) of every logged loss
        self._last_log = 0.0

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **_: Any) -> None:
        self.start_step = state.global_step
        self.started = time.monotonic()
        self.report(state, force=True)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **_: Any) -> None:
        if logs and "loss" in logs:
            self.last_loss = float(logs["loss"])
            self.losses.append((state.global_step, self.last_loss))
            if len(self.losses) > 2 * LOSS_HISTORY_POINTS:  # every other point: bounded, still even
                self.losses = self.losses[::2]
        if logs and "learning_rate" in logs:
            self.last_lr = float(logs["learning_rate"])

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **_: Any) -> None:
        if self.progress.cancelled():
            self.cancelled_at_step = state.global_step
            control.should_training_stop = True
            control.should_epoch_stop = True
            control.should_save = False
            return
        self.report(state, force=state.global_step >= state.max_steps)

    def eta_s(self, state: TrainerState) -> float | None:
        done = state.global_step - self.start_step
        if done <= 0 or not state.max_steps:
            return None
        per_step = (time.monotonic() - self.started) / done
        return round(max(state.max_steps - state.global_step, 0) * per_step, 1)

    def report(self, state: TrainerState, force: bool = False) -> None:
        fields = {"step": state.global_step, "total_steps": state.max_steps,
                  "epoch": round(float(state.epoch or 0.0), 4), "loss": self.last_loss,
                  "learning_rate": self.last_lr, "eta_s": self.eta_s(state)}
        self.progress(force=force, loss_history=sample_history(self.losses), **fields)
        now = time.monotonic()
        if force or now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            log.info("training step %s/%s loss %s lr %s eta %ss", fields["step"], fields["total_steps"],
                     fields["loss"], fields["learning_rate"], fields["eta_s"])


class DivergenceCallback(TrainerCallback):
    """Fails the task at the first logged loss that is inf or NaN (``tasks.executors.divergence``);
    raised from ``on_log``, before the step's checkpoint would be saved."""

    def __init__(self, task_type: str, learning_rate: float) -> None:
        self.task_type = task_type
        self.learning_rate = learning_rate

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **_: Any) -> None:
        if logs and "loss" in logs:
            check_loss(self.task_type, state.global_step, "loss", logs["loss"], self.learning_rate)
