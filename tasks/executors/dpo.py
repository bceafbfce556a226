"""The ``dpo`` task: Direct Preference Optimisation with TRL's ``DPOTrainer``.

Everything but the data and the trainer is the sft flow (``tasks.executors.training``):
the model from ``model.source`` or ``checkpoint.load``, full fine-tuning
(``final_model/``) or, with a ``lora`` block, a LoRA adapter (``final_lora/``);
checkpoints every ``save_steps`` and resume from the newest after a worker died;
progress and cooperative cancel through the same ``TrainerCallback``; the archive,
upload and sha256 as for sft.

The data are ``{prompt, chosen, rejected}`` pairs (``tasks.executors.preference_data``);
``training.beta`` is DPO's temperature (TRL's default, 0.1, when not given). The
reference model is the model the task starts from: a frozen copy of it for full
fine-tuning, the same weights with the adapter switched off for LoRA (TRL's way,
no second copy in memory). The result carries the metrics TRL logs: the implicit
rewards of the chosen and rejected answers, their margin and how often the chosen
one wins (``rewards/accuracies``), with a history of the margin.

Nothing here imports torch, transformers or TRL at module level: the worker's parent
process imports ``tasks`` and must stay free of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.artifacts.checkpoints import download_file
from app.core.task_spec import TrainingOptions, TrainingTaskSpec
from tasks.executors.preference_data import Preference, load_preferences
from tasks.executors.training import TrainingExecutor, sample_history, supported_arguments

# TRL's logged metric → the result field with its last value.
DPO_METRICS = {"rewards/margins": "reward_margin", "rewards/accuracies": "reward_accuracy",
               "rewards/chosen": "reward_chosen", "rewards/rejected": "reward_rejected",
               "logps/chosen": "logps_chosen", "logps/rejected": "logps_rejected"}


class DPOExecutor(TrainingExecutor):
    """DPO on preference pairs; full fine-tuning, or LoRA when the spec has a ``lora`` block."""

    def output_kind(self, spec: TrainingTaskSpec) -> str:
        return "lora" if spec.lora is not None else "model"

    def load_data(self, spec: TrainingTaskSpec, out_dir: Path) -> list[Preference]:
        return load_preferences(spec.training_data(), lambda url: str(download_file(url, out_dir / "inputs")))

    def prepare_rows(self, data: list[Preference], tokenizer: Any, options: TrainingOptions) -> Any:
        import datasets

        datasets.disable_progress_bars()  # TRL tokenises with Dataset.map; no bars in worker logs
        return datasets.Dataset.from_list([{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
                                           for p in data])

    def make_trainer(self, spec: TrainingTaskSpec, model: Any, arguments: dict[str, Any], rows: Any, tokenizer: Any,
                     callback: Any) -> Any:
        return dpo_trainer(spec, model, arguments, rows, tokenizer, [callback])

    def extra_result(self, spec: TrainingTaskSpec, history: list[dict[str, Any]]) -> dict[str, Any]:
        return dpo_metrics(spec.training or TrainingOptions(), history)


def dpo_trainer(spec: TrainingTaskSpec, model: Any, arguments: dict[str, Any], rows: Any, tokenizer: Any,
                callbacks: list[Any]) -> Any:
    """TRL's ``DPOTrainer`` with meshq's arguments (also ``bench/training.py``'s plain TRL script)."""
    import copy

    from peft import PeftModel
    from trl import DPOConfig, DPOTrainer

    options = spec.training or TrainingOptions()
    values = {**arguments, "max_length": options.max_seq_length,
              # TRL turns checkpointing on by default; meshq's training.gradient_checkpointing decides
              "gradient_checkpointing": arguments.get("activation_checkpointing", False),
              "precompute_ref_log_probs": False}
    if options.beta is not None:
        values["beta"] = options.beta
    ref_model = None
    if not isinstance(model, PeftModel):  # LoRA: the reference is the model with its adapter off
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    return DPOTrainer(model=model, ref_model=ref_model, args=supported_arguments(DPOConfig, values),
                      train_dataset=rows, processing_class=tokenizer, callbacks=callbacks)


def dpo_metrics(options: TrainingOptions, history: list[dict[str, Any]]) -> dict[str, Any]:
    logged = [entry for entry in history if "rewards/margins" in entry]
    result: dict[str, Any] = {"beta": options.beta if options.beta is not None else 0.1}
    for metric, name in DPO_METRICS.items():
        values = [float(entry[metric]) for entry in logged if metric in entry]
        result[f"{name}_first"] = round(values[0], 6) if values else None
        result[f"{name}_last"] = round(values[-1], 6) if values else None
    result["reward_margin_history"] = sample_history([(int(e["step"]), float(e["rewards/margins"]))
                                                      for e in logged])
    return result
