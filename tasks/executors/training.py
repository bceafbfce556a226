"""Training executors (full SFT and LoRA) on transformers' ``Trainer``.

``SFTExecutor`` fine-tunes every weight and writes ``final_model/``;
``LoRASFTExecutor`` trains a peft LoRA adapter and writes ``final_lora/``. Both:

* read examples from ``spec.data`` (see ``tasks.executors.training_data``: loss on the
  response only, eos appended so generation stops after the answer);
* start from ``spec.model.source``, or from ``spec.checkpoint.load`` — a full model
  directory (trained from), or a LoRA adapter (LoRA: trained further; SFT: merged
  into the base first);
* save a checkpoint every ``save_steps`` in ``<task dir>/checkpoints/`` and, when
  the same task id runs again (redelivery after a worker died), resume from the
  latest one (``resumed_from_step`` in the result);
* report progress every step and stop at the next step when the task is cancelled
  (``TaskCancelled`` → the task ends REVOKED, "cancelled at step N");
* save ``final_*/`` with the tokenizer, archive it (``output.archive_format``) with
  its sha256, and return the DESIGN §6 fields plus metrics (``save_model: false``:
  no final model, metrics only). Uploading the archive for an ``http`` destination is
  the Celery task's job (``tasks.base``).

The original templates' knobs act as their names say: ``logging_steps``,
``save_strategy`` (steps, epoch, no), ``gradient_checkpointing``, ``packing`` (examples
concatenated into ``max_seq_length`` blocks), ``bf16``/``fp16`` mixed precision,
``lora.use_rslora``/``bias``/``task_type``. What cannot act here says so in the
result's ``notes``: multi-GPU settings (meshq trains on one device), and float16
weights (``model.config.fp16``), which are never trained as float16 master weights:
on CUDA they become fp16 mixed precision over float32 weights, on CPU float32.

Settings that make the ~1M-parameter test model memorise short answers exactly
(greedy generation of the prompt then gives ``separator + answer``), in ~100-150
CPU steps, a few seconds to ~30 s on two busy cores:

    training: {learning_rate: 5.0e-3, lr_scheduler_type: constant, max_steps: 150,
               batch_size: <number of pairs>, save_steps: 1000}
    lora: {r: 16, alpha: 32, dropout: 0.0, target_modules: all-linear}

Adding ``modules_to_save: [norm]`` (train the RMSNorm scales too) gets there in
~100 steps: a random tiny model's logits are bounded by its norm scales, which
LoRA alone cannot change. ``tests/test_training.py`` checks these settings.

Nothing here imports torch, transformers or peft at module level: the worker's
parent process imports ``tasks`` and must stay free of them.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.artifacts.archive import make_archive
from app.artifacts.checkpoints import checkpoint_kind, download_file, fetch_checkpoint
from app.artifacts.run_record import fenced, staging_dir
from app.core.errors import ExecutorError, SpecError, TaskCancelled
from app.core.settings import get_settings
from app.core.task_spec import LoraOptions, TaskSpec, TrainingOptions, TrainingTaskSpec, spec_as
from tasks.executors import models
from tasks.executors.divergence import check_weights
from tasks.executors.failed_training import checkpoints_discarded_on_failure
from tasks.executors.progress import Progress
from tasks.executors.ranks import current_rank, deepspeed_config, plan_ranks, rank_strategy, run_ranks
from tasks.executors.training_data import PaddingCollator, load_examples, pack_rows, tokenize_examples

log = logging.getLogger(__name__)

CHECKPOINTS_DIRNAME = "checkpoints"
LOSS_HISTORY_POINTS = 50  # loss_history in the result is sampled down to about this many points
TRAINING_LOG = "logs/training_log.jsonl"


def last_checkpoint(checkpoints_dir: Path) -> tuple[Path, int] | None:
    """The newest complete ``checkpoint-<step>`` directory and its step, if any."""
    if not checkpoints_dir.is_dir():
        return None
    found = []
    for path in checkpoints_dir.iterdir():
        name = path.name
        if path.is_dir() and name.startswith("checkpoint-") and name[11:].isdigit():
            if (path / "trainer_state.json").is_file():  # written last: the checkpoint is complete
                found.append((int(name[11:]), path))
    if not found:
        return None
    step, path = max(found)
    return path, step


def sample_history(points: list[tuple[int, float]], limit: int = LOSS_HISTORY_POINTS) -> list[list[float]]:
    """At most about ``limit`` evenly spaced ``[step, loss]`` points, always with the last one."""
    if len(points) <= limit:
        chosen = points
    else:
        stride = len(points) / limit
        chosen = [points[int(i * stride)] for i in range(limit)]
        if chosen[-1] != points[-1]:
            chosen.append(points[-1])
    return [[step, round(loss, 6)] for step, loss in chosen]


MULTI_GPU_FIELDS = ("allow_multi_gpu", "visible_devices", "auto_deepspeed_stage", "deepspeed")


def multi_gpu_note(options: TrainingOptions, gpus: int) -> str | None:
    """ppo's note for multi-GPU settings: its own loop trains in one process, so they had no
    effect there (sft, lora_sft and dpo span ranks: ``tasks.executors.ranks``)."""
    given = [name for name in MULTI_GPU_FIELDS if getattr(options, name) not in (None, False)]
    if not given:
        return None
    return (f"training.{', training.'.join(given)}: no effect for ppo; its loop trains in one process on "
            f"one device (this worker has {gpus} GPU(s))")


@dataclass(frozen=True)
class Precision:
    master_dtype: str   # the dtype the weights are loaded (and trained) in
    fp16: bool          # fp16 mixed precision (torch.amp)
    bf16: bool          # bf16 mixed precision
    notes: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return "bf16" if self.bf16 else "fp16" if self.fp16 else self.master_dtype


def training_precision(spec: TrainingTaskSpec, options: TrainingOptions, device: str) -> Precision:
    """Weights dtype and mixed precision for this run. float16 *weights* (``model.config.fp16``,
    or ``transformers.dtype: float16`` on CPU) are never trained as such: Adam's small updates
    vanish in float16, and CPU kernels for it are slow or missing."""
    if options.bf16 and options.fp16:
        raise SpecError("spec.training.bf16", "choose bf16 or fp16, not both")
    if options.fp16 and device != "cuda":
        raise SpecError("spec.training.fp16", "fp16 mixed precision needs a CUDA device; use bf16 on CPU")
    dtype = spec.model.transformers.dtype
    older = spec.model.config is not None and bool(spec.model.config.fp16)
    if dtype == "float16" and (older or device == "cpu"):
        name = "model.config.fp16" if older else "model.transformers.dtype: float16"
        if device == "cuda":
            fp16 = not options.bf16
            how = "fp16 mixed precision over float32 weights" if fp16 else "bf16 mixed precision (training.bf16)"
            return Precision("float32", fp16, options.bf16, (f"{name}: trained with {how}; float16 master "
                                                           "weights would lose the optimiser's small updates",))
        return Precision("float32", False, options.bf16, (f"{name}: this CPU worker trained in float32 "
                                                         f"{'with bf16 mixed precision ' if options.bf16 else ''}"
                                                         "(float16 weights are not trained on CPU)",))
    return Precision("float32" if dtype == "auto" else dtype, options.fp16, options.bf16)


def training_argument_values(options: TrainingOptions, checkpoints_dir: Path, device: str,
                             precision: Precision | None = None) -> dict[str, Any]:
    """The arguments meshq trains with, by ``TrainingArguments`` name (shared by every trainer)."""
    fp16 = precision.fp16 if precision is not None else options.fp16
    bf16 = precision.bf16 if precision is not None else options.bf16
    return {
        "output_dir": str(checkpoints_dir),
        "per_device_train_batch_size": options.batch_size,
        "gradient_accumulation_steps": options.gradient_accumulation_steps,
        "num_train_epochs": options.num_train_epochs,
        "max_steps": options.max_steps or -1,
        "learning_rate": options.learning_rate,
        "lr_scheduler_type": options.lr_scheduler_type,
        "warmup_steps": options.warmup_steps,
        "weight_decay": options.weight_decay,
        "logging_steps": options.logging_steps,
        "logging_first_step": True,
        # Log an inf/NaN loss as it is (transformers would log 0): DivergenceCallback fails on it.
        "logging_nan_inf_filter": False,
        "save_strategy": options.save_strategy,
        "save_steps": options.save_steps,
        "save_total_limit": options.save_total_limit,
        "seed": options.seed,
        "bf16": bf16,
        "fp16": fp16,
        # training.gradient_checkpointing (transformers 5 names it activation checkpointing);
        # non-reentrant, which also works when only an adapter's weights need gradients.
        "activation_checkpointing": options.gradient_checkpointing,
        "activation_checkpointing_kwargs": {"use_reentrant": False} if options.gradient_checkpointing else None,
        "use_cpu": device == "cpu",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "remove_unused_columns": False,
    }


# Older spellings of an argument, for a transformers release that lacks the newer name.
ARGUMENT_FALLBACKS = {"activation_checkpointing": "gradient_checkpointing",
                      "activation_checkpointing_kwargs": "gradient_checkpointing_kwargs"}


def supported_arguments(config_class: type, values: dict[str, Any]) -> Any:
    """``config_class(**values)`` with only the arguments this installed release knows: the
    checkpointing and saving arguments were renamed across transformers 5.x minors (and TRL's
    configs subclass ``TrainingArguments``). A renamed one is passed by its older name; one
    that is not known by either name is dropped with a log line (always an optional knob)."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(config_class)}
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        if name in known:
            kwargs[name] = value
        elif ARGUMENT_FALLBACKS.get(name) in known:
            kwargs[ARGUMENT_FALLBACKS[name]] = value
        else:
            log.info("%s has no argument %r; not passed", config_class.__name__, name)
    return config_class(**kwargs)


def training_arguments(options: TrainingOptions, checkpoints_dir: Path, device: str,
                       precision: Precision | None = None) -> Any:
    """The ``TrainingArguments`` meshq trains with (also used by ``bench/training.py``'s plain script)."""
    from transformers import TrainingArguments

    return supported_arguments(TrainingArguments, training_argument_values(options, checkpoints_dir, device,
                                                                           precision))


class TrainingExecutor:
    """Shared training flow; subclasses decide how the model is built and what is saved."""

    kind = "model"  # final_<kind>/ and final_<kind>_* result fields

    def output_kind(self, spec: TrainingTaskSpec) -> str:
        """``model`` (every weight trains, ``final_model/``) or ``lora`` (an adapter, ``final_lora/``)."""
        return self.kind

    def run(self, spec: TaskSpec, out_dir: Path, progress: Progress) -> dict[str, Any]:
        with checkpoints_discarded_on_failure(spec.taskType, out_dir / CHECKPOINTS_DIRNAME, progress.run):
            return self.train(spec_as(spec, TrainingTaskSpec), out_dir, progress)

    def train(self, spec: TrainingTaskSpec, out_dir: Path, progress: Progress) -> dict[str, Any]:
        """The training run itself: data, model, steps, final weights and the result."""
        import torch
        from transformers.trainer_callback import PrinterCallback, ProgressCallback
        from transformers.utils import logging as hf_logging

        # Lazy: it imports transformers, which the worker's parent process must never load.
        from tasks.executors.trainer_callbacks import DivergenceCallback, MeshqProgressCallback

        hf_logging.disable_progress_bar()
        # The pool child lives on: a model kept warm by an earlier inference task must
        # not sit in (GPU) memory beside the one being trained.
        models.release_cached_model()
        started = time.monotonic()
        options = spec.training or TrainingOptions()
        device = self._device(spec, options)
        precision = training_precision(spec, options, device)
        notes = list(precision.notes)
        rank, world_size = current_rank()
        if world_size == 1:  # the pool process: one rank, or the launcher of several
            plan = plan_ranks(options, device, torch.cuda.device_count() if device == "cuda" else 0,
                              get_settings().cpu_ranks)
            if plan.spans_ranks:
                progress.check_cancelled("before starting the ranks")
                ranked = run_ranks(spec, out_dir, progress, plan)
                if plan.notes:
                    ranked["notes"] = [*plan.notes, *ranked.get("notes", [])]
                return ranked
            notes.extend(plan.notes)
        is_main = rank == 0  # rank 0 alone writes the task's outputs
        progress.check_cancelled("before loading the model")
        kind = self.output_kind(spec)
        data = self.load_data(spec, out_dir)

        base_dir, init_dir, init_kind, tokenizer = self.load_starting_point(spec, out_dir)
        rows = self.prepare_rows(data, tokenizer, options)

        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        model = self.build_model(spec, base_dir, init_dir, init_kind, options, precision.master_dtype)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())

        checkpoints = out_dir / CHECKPOINTS_DIRNAME
        resume = last_checkpoint(checkpoints)
        resumed_from_step = resume[1] if resume else 0
        if resume:
            log.info("resuming %s from %s (step %d)", progress.task_id, resume[0], resumed_from_step)

        callback = MeshqProgressCallback(progress)
        arguments = training_argument_values(options, checkpoints, device, precision)
        backend = ("nccl" if device == "cuda" else "gloo") if world_size > 1 else None
        if backend is not None:  # the Trainer's DDP (or DeepSpeed) over the ranks torchrun started
            arguments.update(ddp_backend=backend, ddp_find_unused_parameters=False)
            zero = deepspeed_config(options)
            if zero is not None:
                arguments["deepspeed"] = zero
        trainer = self.make_trainer(spec, model, arguments, rows, tokenizer, callback)
        trainer.remove_callback(PrinterCallback)  # one stdout line per step; our callback logs instead
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(DivergenceCallback(spec.taskType, options.learning_rate))
        try:
            output = trainer.train(resume_from_checkpoint=str(resume[0]) if resume else None)
            if callback.cancelled_at_step is not None:
                raise TaskCancelled(progress.task_id, f"at step {callback.cancelled_at_step}")
            # The last step's update is seen by no logged loss: check the weights it leaves.
            check_weights(spec.taskType, trainer.state.global_step,
                          (p for p in trainer.model.parameters() if p.requires_grad), options.learning_rate)
            final_dir = (self._save_final(trainer, tokenizer, out_dir, kind)
                         if options.save_model and is_main else None)
            history = list(trainer.state.log_history)
            steps = trainer.state.global_step
            max_steps = trainer.state.max_steps
            epoch = float(trainer.state.epoch or 0.0)
        finally:
            peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
            del trainer, model
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()

        if not is_main:  # its share of the work is done; rank 0 writes and reports
            return {}
        write_training_log(out_dir, history, progress.run)
        losses = [(int(entry["step"]), float(entry["loss"])) for entry in history if "loss" in entry]
        outcome = TrainingOutcome(
            final_dir=final_dir, kind=kind, steps=steps, total_steps=max_steps, samples=len(rows),
            resumed_from_step=resumed_from_step, train_runtime=float(output.metrics.get("train_runtime", 0.0)),
            started=started, trainable_params=trainable, total_params=total, base_dir=base_dir, init_dir=init_dir,
            device=device, precision=precision.name, peak_gpu_memory=peak, notes=notes)
        metrics = {
            "train_loss": round(float(output.training_loss), 6),
            "loss_first": losses[0][1] if losses else None,
            "loss_last": losses[-1][1] if losses else None,
            "loss_history": sample_history(losses),
        }
        details = {
            "epochs": round(epoch, 4),
            "world_size": world_size,
            "backend": backend,
            "strategy": rank_strategy(options) if world_size > 1 else "single-process",
            "global_batch": options.batch_size * options.gradient_accumulation_steps * world_size,
            "packed": options.packing,
            "gradient_checkpointing": options.gradient_checkpointing,
            **self.extra_result(spec, history),
        }
        return training_result(outcome, metrics, details, spec.output.archive_format, out_dir, progress.run)

    # -- pieces subclasses share or override ---------------------------------------------
    def load_data(self, spec: TrainingTaskSpec, out_dir: Path) -> Any:
        """The task's training data, read before any model is loaded (bad data fails fast)."""
        return load_examples(spec.training_data(), lambda url: str(download_file(url, out_dir / "inputs")))

    def prepare_rows(self, data: Any, tokenizer: Any, options: TrainingOptions) -> Any:
        """What the trainer iterates over: tokenised examples (prompt masked, eos appended, packed)."""
        rows = tokenize_examples(data, tokenizer, options.max_seq_length)
        if options.packing:
            rows = pack_rows(rows, options.max_seq_length)
        return rows

    def make_trainer(self, spec: TrainingTaskSpec, model: Any, arguments: dict[str, Any], rows: Any, tokenizer: Any,
                     callback: Any) -> Any:
        """The ``Trainer`` (or a subclass of it, such as TRL's) that runs the steps."""
        from transformers import Trainer, TrainingArguments

        return Trainer(model=model, args=supported_arguments(TrainingArguments, arguments),
                       train_dataset=rows, data_collator=PaddingCollator(tokenizer.pad_token_id),
                       processing_class=tokenizer, callbacks=[callback])

    def extra_result(self, spec: TrainingTaskSpec, history: list[dict[str, Any]]) -> dict[str, Any]:
        """Result fields of this task type beyond the shared ones (the trainer's own metrics)."""
        return {}

    @staticmethod
    def _device(spec: TrainingTaskSpec, options: TrainingOptions) -> str:
        return models.training_device(models.device_map_for(spec))

    def load_starting_point(self, spec: TrainingTaskSpec, out_dir: Path) -> tuple[Path, Path | None, str | None, Any]:
        """The base model's directory, the ``checkpoint.load`` weights to start from (directory and
        kind, or None) and the tokenizer: the checkpoint's own when it has one, else the base's."""
        base_dir = models.resolve_model_dir(spec.model.source.identifier, spec.model.source.revision)
        init_dir, init_kind = self._initial_checkpoint(spec, out_dir)
        tokenizer_dir = init_dir if init_dir is not None and models.has_tokenizer(init_dir) else base_dir
        tokenizer = models.load_tokenizer(tokenizer_dir, trust_remote_code=spec.model.transformers.trust_remote_code)
        if tokenizer.pad_token_id is None:
            raise ExecutorError(f"{tokenizer_dir}: the tokenizer has neither a pad nor an eos token",
                                path=str(tokenizer_dir))
        return base_dir, init_dir, init_kind, tokenizer

    @staticmethod
    def _initial_checkpoint(spec: TrainingTaskSpec, out_dir: Path) -> tuple[Path | None, str | None]:
        load = spec.checkpoint.load if spec.checkpoint else None
        if load is None:
            return None, None
        directory = fetch_checkpoint(load, out_dir)
        return directory, checkpoint_kind(directory)

    @staticmethod
    def load_causal_lm(directory: Path, spec: TrainingTaskSpec, field: str, dtype: str) -> Any:
        # Master weights in ``dtype`` (training_precision); the device is the Trainer's choice.
        return models.load_causal_lm(directory, dtype, spec.model.transformers.trust_remote_code, field)

    def build_model(self, spec: TrainingTaskSpec, base_dir: Path, init_dir: Path | None, init_kind: str | None,
                    options: TrainingOptions, dtype: str) -> Any:
        """The model to train: all its weights (``model``) or a LoRA adapter on it (``lora``)."""
        if self.output_kind(spec) == "lora":
            return self.build_lora_model(spec, base_dir, init_dir, init_kind, options, dtype)
        return self.build_full_model(spec, base_dir, init_dir, init_kind, dtype)

    def build_full_model(self, spec: TrainingTaskSpec, base_dir: Path, init_dir: Path | None, init_kind: str | None,
                         dtype: str) -> Any:
        """Full fine-tuning: the base model, a full checkpoint, or the base with an adapter merged in."""
        if init_kind == "model" and init_dir is not None:
            return self.load_causal_lm(init_dir, spec, "spec.checkpoint.load", dtype)
        model = self.load_causal_lm(base_dir, spec, "spec.model.source.identifier", dtype)
        if init_kind == "lora" and init_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(init_dir)).merge_and_unload()
            model.requires_grad_(True)  # peft froze the base weights; full fine-tuning trains them all
        return model

    def build_lora_model(self, spec: TrainingTaskSpec, base_dir: Path, init_dir: Path | None, init_kind: str | None,
                         options: TrainingOptions, dtype: str) -> Any:
        """A new LoRA adapter (``spec.lora``) on the base or a full checkpoint, or an earlier adapter
        trained further."""
        from peft import LoraConfig, PeftModel, get_peft_model
        from transformers import set_seed

        if init_kind == "lora" and init_dir is not None:  # continue training an earlier adapter
            base = self.load_causal_lm(base_dir, spec, "spec.model.source.identifier", dtype)
            try:
                return PeftModel.from_pretrained(base, str(init_dir), is_trainable=True)
            except Exception as exc:
                raise ExecutorError(f"spec.checkpoint.load: cannot apply the adapter {str(init_dir)!r} to "
                                    f"{str(base_dir)!r}: {type(exc).__name__}: {exc}", path=str(init_dir)) from None
        source = init_dir if init_kind == "model" and init_dir is not None else base_dir
        field = "spec.checkpoint.load" if source is init_dir else "spec.model.source.identifier"
        base = self.load_causal_lm(source, spec, field, dtype)
        lora = spec.lora or LoraOptions()
        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias=lora.bias,
                            target_modules=lora.target_modules, modules_to_save=lora.modules_to_save,
                            task_type=lora.task_type, use_rslora=lora.use_rslora)
        set_seed(options.seed)  # the adapter's initial weights
        try:
            return get_peft_model(base, config)
        except ValueError as exc:  # e.g. target modules not found in the model
            raise SpecError("spec.lora.target_modules", str(exc)) from None

    @staticmethod
    def _save_final(trainer: Any, tokenizer: Any, out_dir: Path, kind: str) -> Path:
        """Stage ``final_<kind>/`` (weights + tokenizer) for its fenced commit (``save_final``)."""
        return save_final(lambda tmp: trainer.save_model(str(tmp)), tokenizer, out_dir, kind)


class SFTExecutor(TrainingExecutor):
    """Full supervised fine-tuning: every weight trains; writes ``final_model/``."""

    kind = "model"


class LoRASFTExecutor(TrainingExecutor):
    """LoRA fine-tuning with peft: only the adapter trains; writes ``final_lora/``."""

    kind = "lora"


def save_final(save_weights: Callable[[Path], None], tokenizer: Any, out_dir: Path, kind: str) -> Path:
    """``final_<kind>/`` (``save_weights(dir)`` + the tokenizer) written into a staging
    directory of this run's own (``app.artifacts.run_record.staging_dir``), never where
    another run of the task writes; ``final_weights_fields`` commits it into ``out_dir``."""
    staged = staging_dir(out_dir) / f"final_{kind}"
    save_weights(staged)
    tokenizer.save_pretrained(str(staged))
    (staged / "training_args.bin").unlink(missing_ok=True)  # a pickle; the result has the arguments
    return staged


def final_weights_fields(staged: Path | None, kind: str, archive_format: str, notes: list[str],
                         out_dir: Path, run: int | None) -> dict[str, Any]:
    """The result fields of a training task's ``final_<kind>/`` (its path and archive), or a note
    when ``training.save_model: false`` kept none. Shared by every training executor.

    The staged ``final_<kind>/`` (``save_final``) is archived beside itself, then both are
    renamed into ``out_dir`` under the run fence: a late run of the task (a paused worker's)
    never replaces a later run's weights (``LeaseLost``, nothing written)."""
    if staged is None:
        notes.append(f"training.save_model: false; no final_{kind}/ was kept (metrics only)")
        return {}
    final_dir = out_dir / staged.name
    try:
        archive = make_archive(staged, archive_format)
        target = out_dir / archive.path.name
        with fenced(out_dir, run):
            if final_dir.exists():
                shutil.rmtree(final_dir)
            staged.rename(final_dir)
            os.replace(archive.path, target)
    finally:
        shutil.rmtree(staged.parent, ignore_errors=True)
    return {
        f"final_{kind}_path": str(final_dir),
        f"final_{kind}_archive": str(target),
        f"final_{kind}_archive_sha256": archive.sha256,
        f"final_{kind}_archive_bytes": archive.bytes,
        f"final_{kind}_archive_format": archive.format,
    }


@dataclass
class TrainingOutcome:
    """How a training run ended, whatever ran its steps (the ``Trainer`` or the ppo loop):
    what ``training_result`` turns into the fields every training task reports."""

    final_dir: Path | None  # the staged final_<kind>/ (save_final); None with save_model: false
    kind: str  # "model" or "lora"
    steps: int
    total_steps: int
    samples: int
    resumed_from_step: int
    train_runtime: float  # seconds spent in this run's steps
    started: float  # time.monotonic() when the task started
    trainable_params: int
    total_params: int
    base_dir: Path
    init_dir: Path | None  # the checkpoint.load weights it started from
    device: str
    precision: str  # Precision.name
    peak_gpu_memory: int | None
    notes: list[str]


def training_result(outcome: TrainingOutcome, metrics: dict[str, Any], details: dict[str, Any],
                    archive_format: str, out_dir: Path, run: int | None) -> dict[str, Any]:
    """A training task's result, built here for every training executor: the final weights'
    fields (committed under the run fence: ``final_weights_fields``), the loop's ``metrics``
    (its loss or reward history), the fields every training task has, the task type's own
    ``details``, then the peak GPU memory and the notes."""
    import torch

    result = final_weights_fields(outcome.final_dir, outcome.kind, archive_format, outcome.notes, out_dir, run)
    result.update(metrics)
    run_steps = outcome.steps - outcome.resumed_from_step
    runtime = outcome.train_runtime
    result.update({
        "steps": outcome.steps,
        "total_steps": outcome.total_steps,
        "samples": outcome.samples,
        "resumed_from_step": outcome.resumed_from_step,
        "train_runtime_sec": round(runtime, 3),
        # None when this run took no step (it resumed at the end): no speed to report.
        "steps_per_second": round(run_steps / runtime, 4) if runtime > 0 and run_steps else None,
        "runtime_sec": round(time.monotonic() - outcome.started, 3),
        "trainable_params": outcome.trainable_params,
        "total_params": outcome.total_params,
        "base_model": str(outcome.base_dir),
        "init_checkpoint": str(outcome.init_dir) if outcome.init_dir is not None else None,
        "device": outcome.device,
        "torch_threads": torch.get_num_threads(),
        "precision": outcome.precision,
    })
    result.update(details)
    if outcome.peak_gpu_memory is not None:
        result["peak_gpu_memory_bytes"] = int(outcome.peak_gpu_memory)
    if outcome.notes:
        result["notes"] = outcome.notes
    return result


def write_training_log(out_dir: Path, history: list[dict[str, Any]], run: int | None) -> None:
    """``logs/training_log.jsonl``, under the run fence like the weights."""
    with fenced(out_dir, run):
        _write_log(out_dir / TRAINING_LOG, history)


def _write_log(path: Path, history: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for entry in history:
            fh.write(json.dumps(entry, sort_keys=True) + "\n")

