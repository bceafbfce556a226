"""The ``ppo`` task: PPO against a reward model, a small loop of meshq's own.

TRL 1.x no longer ships a ``PPOTrainer`` that works with transformers 5 (its PPO lives
in older releases only), so the loop is written on transformers/peft pieces, following
the PPO recipe of TRL's classic trainer. One step (rollout, score, advantages, update)
is ``PPOLoop`` (``tasks/executors/ppo_loop.py``); here are the task around it: the
prompts (``tasks.executors.preference_data.load_queries``) in a seeded order, epoch
after epoch, the reward model (``RewardScorer``), checkpoints and the result.

``steps`` (``max_steps``) is the number of rollouts; without it, ``num_train_epochs``
passes over the prompts. The rest behaves like the other training tasks: progress every
step (``step``, ``total_steps``, ``reward``, ``kl``, ``eta_s``), cooperative cancel,
a checkpoint every ``save_steps`` in ``checkpoints/checkpoint-<step>/`` (trainable
weights, value head, optimiser, history; ``trainer_state.json`` written last) and resume
from the newest after a worker died (``resumed_from_step``), ``checkpoint.load`` to start
from an earlier stage's weights, ``final_model/`` or ``final_lora/`` (``lora`` block)
with archive/upload. The result has the mean reward and KL of every step.

Nothing here imports torch, transformers or peft at module level: the worker's parent
process imports ``tasks`` and must stay free of them.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.artifacts.checkpoints import download_file
from app.core.data_roots import check_remote_code, under_results
from app.core.errors import ExecutorError, SpecError, TaskCancelled
from app.core.task_spec import PpoTaskSpec, TrainingOptions, TrainingTaskSpec, spec_as
from app.core.task_spec.schema import GenerationOptions, RewardModelSpec
from tasks.executors import models
from tasks.executors.divergence import check_loss, check_weights
from tasks.executors.ppo_loop import KL_COEF, PPOLoop, loop_mini_batch
from tasks.executors.preference_data import load_queries
from tasks.executors.progress import Progress
from tasks.executors.training import (
    CHECKPOINTS_DIRNAME,
    TrainingExecutor,
    TrainingOutcome,
    last_checkpoint,
    multi_gpu_note,
    sample_history,
    save_final,
    training_precision,
    training_result,
    write_training_log,
)

log = logging.getLogger(__name__)

REWARD_FIELD = "spec.reward_model.identifier"
STATE_FILE = "trainer_state.json"  # written last: the checkpoint is complete
LOG_EVERY_S = 10.0


@dataclass
class PPOState:
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


class RewardScorer:
    """The reward model of a ``ppo`` task: token ids (or texts) in, one score per sequence out."""

    def __init__(self, spec: RewardModelSpec, policy_tokenizer: Any, device: str, trust_remote_code: bool) -> None:
        from transformers import AutoModelForSequenceClassification

        directory = models.resolve_model_dir(spec.identifier, spec.revision, field=REWARD_FIELD)
        check_remote_code(trust_remote_code, from_artifact=under_results(directory), field=REWARD_FIELD)
        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(
                str(directory), local_files_only=True, trust_remote_code=trust_remote_code).to(device).eval()
        except Exception as exc:
            raise ExecutorError(f"{REWARD_FIELD}: cannot load a sequence classifier from {str(directory)!r}: "
                                f"{type(exc).__name__}: {exc}", path=str(directory)) from None
        self.model.requires_grad_(False)
        self.device = device
        self.index = self._score_index(spec)
        self.tokenizer = (models.load_tokenizer(directory, trust_remote_code=trust_remote_code, field=REWARD_FIELD)
                          if models.has_tokenizer(directory) else policy_tokenizer)
        self.same_vocabulary = self.tokenizer.get_vocab() == policy_tokenizer.get_vocab()
        self.policy_tokenizer = policy_tokenizer
        if self.model.config.pad_token_id is None:  # the classifier finds the last token by the pad id
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def _score_index(self, spec: RewardModelSpec) -> int:
        config = self.model.config
        labels = {str(name): int(index) for index, name in (config.id2label or {}).items()}
        count = int(config.num_labels)
        if spec.positive_label is not None:
            if isinstance(spec.positive_label, int):
                if not 0 <= spec.positive_label < count:
                    raise SpecError("spec.reward_model.positive_label",
                                    f"{spec.positive_label} is not a class index of a {count}-class model")
                return spec.positive_label
            if spec.positive_label not in labels:
                raise SpecError("spec.reward_model.positive_label",
                                f"{spec.positive_label!r} is not one of the model's labels ({', '.join(labels)})")
            return labels[spec.positive_label]
        if count == 1:
            return 0
        for name, index in labels.items():
            if name.lower() in ("positive", "pos", "label_positive"):
                return index
        return count - 1

    def __call__(self, sequences: Any, attention: Any) -> Any:
        """Scores of right-padded ``sequences`` (policy token ids) with their attention mask."""
        import torch

        with torch.no_grad():
            if self.same_vocabulary:
                ids, mask = sequences, attention
            else:
                texts = [self.policy_tokenizer.decode(row[m.bool()], skip_special_tokens=True)
                         for row, m in zip(sequences, attention, strict=True)]
                batch = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                                       max_length=512).to(self.device)
                ids, mask = batch["input_ids"], batch["attention_mask"]
            logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
        return logits[:, self.index]


class PPOExecutor(TrainingExecutor):
    """PPO on prompts against a reward model; full fine-tuning, or LoRA with a ``lora`` block."""

    def output_kind(self, spec: TrainingTaskSpec) -> str:
        return "lora" if spec.lora is not None else "model"

    def train(self, spec: TrainingTaskSpec, out_dir: Path, progress: Progress) -> dict[str, Any]:
        import torch

        models.release_cached_model()
        started = time.monotonic()
        spec = spec_as(spec, PpoTaskSpec)
        options = spec.training or TrainingOptions()
        generation = spec.generation or GenerationOptions()
        device = self._device(spec, options)
        precision = training_precision(spec, options, device)
        if precision.fp16 or precision.bf16:
            raise SpecError("spec.training.bf16" if precision.bf16 else "spec.training.fp16",
                            "mixed precision is not implemented for ppo; it trains in the weights' dtype")
        notes = list(precision.notes)
        note = multi_gpu_note(options, torch.cuda.device_count() if device == "cuda" else 0)
        if note:
            notes.append(note)
        if options.gradient_checkpointing:
            notes.append("training.gradient_checkpointing: not used by the ppo loop")
        progress.check_cancelled("before loading the model")
        kind = self.output_kind(spec)
        queries = load_queries(spec.training_data(), lambda url: str(download_file(url, out_dir / "inputs")))

        base_dir, init_dir, init_kind, tokenizer = self.load_starting_point(spec, out_dir)
        query_ids = [list(tokenizer(q)["input_ids"])[-options.max_seq_length:] for q in queries]

        torch.manual_seed(options.seed)
        policy = self.build_model(spec, base_dir, init_dir, init_kind, options, precision.master_dtype).to(device)
        reference = None if kind == "lora" else _frozen_copy(policy)
        scorer = RewardScorer(spec.reward_model, tokenizer, device, spec.model.transformers.trust_remote_code)
        hidden = int(policy.get_input_embeddings().weight.shape[1])
        value_head = torch.nn.Linear(hidden, 1).to(device=device, dtype=policy.get_input_embeddings().weight.dtype)
        torch.nn.init.zeros_(value_head.weight)
        torch.nn.init.zeros_(value_head.bias)
        trainable = [p for p in policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW([*trainable, *value_head.parameters()], lr=options.learning_rate,
                                      weight_decay=options.weight_decay)

        per_epoch = math.ceil(len(queries) / options.batch_size)
        total_steps = options.max_steps or max(1, math.ceil(options.num_train_epochs * per_epoch))
        checkpoints = out_dir / CHECKPOINTS_DIRNAME
        state = PPOState()
        resume = last_checkpoint(checkpoints)
        if resume:
            state = _load_checkpoint(resume[0], policy, value_head, optimizer, device)
            log.info("resuming %s from %s (step %d)", progress.task_id, resume[0], state.step)
        resumed_from_step = state.step
        save_every = per_epoch if options.save_strategy == "epoch" else options.save_steps
        loop = PPOLoop(policy, reference, value_head, optimizer, scorer, tokenizer, options, generation, device)

        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        run_started = time.monotonic()
        last_log = 0.0
        progress(force=True, step=state.step, total_steps=total_steps, reward=None, kl=None, eta_s=None)
        try:
            while state.step < total_steps:
                if progress.cancelled():
                    raise TaskCancelled(progress.task_id, f"at step {state.step}")
                batch = _batch_for_step(query_ids, state.step, options.batch_size, options.seed)
                torch.manual_seed(options.seed + state.step)  # sampling: the same rollouts after a resume
                stats = loop.step(batch)
                state.step += 1
                stats["step"] = state.step
                check_weights(spec.taskType, state.step, [*trainable, *value_head.parameters()],
                              options.learning_rate)  # the next rollout would sample from them
                for name in ("policy_loss", "value_loss", "kl"):
                    check_loss(spec.taskType, state.step, name.replace("_", " "), stats[name], options.learning_rate)
                state.history.append(stats)
                if options.optimize_cuda_cache and device == "cuda":
                    torch.cuda.empty_cache()
                done = state.step - resumed_from_step
                eta = round((time.monotonic() - run_started) / done * (total_steps - state.step), 1)
                progress(force=state.step >= total_steps, step=state.step, total_steps=total_steps,
                         reward=stats["reward_mean"], kl=stats["kl"], eta_s=eta)
                now = time.monotonic()
                if now - last_log >= LOG_EVERY_S or state.step >= total_steps:
                    last_log = now
                    log.info("ppo step %d/%d reward %.4f kl %.4f eta %ss", state.step, total_steps,
                             stats["reward_mean"], stats["kl"], eta)
                if options.save_strategy != "no" and state.step % save_every == 0 and state.step < total_steps:
                    _save_checkpoint(checkpoints, state, policy, value_head, optimizer, options.save_total_limit)
            train_runtime = time.monotonic() - run_started
            final_dir = None
            if options.save_model:
                save_weights = policy.save_pretrained
                final_dir = save_final(lambda tmp: save_weights(str(tmp)), tokenizer, out_dir, kind)
                del save_weights  # holds the policy: let the finally below free it
            total_params = sum(p.numel() for p in policy.parameters())
            trainable_params = sum(p.numel() for p in trainable)
        finally:
            peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
            del loop, policy, reference, scorer, optimizer, trainable
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()

        write_training_log(out_dir, state.history, progress.run)
        rewards = [(int(h["step"]), float(h["reward_mean"])) for h in state.history]
        kls = [(int(h["step"]), float(h["kl"])) for h in state.history]
        outcome = TrainingOutcome(
            final_dir=final_dir, kind=kind, steps=state.step, total_steps=total_steps, samples=len(queries),
            resumed_from_step=resumed_from_step, train_runtime=train_runtime, started=started,
            trainable_params=trainable_params, total_params=total_params, base_dir=base_dir, init_dir=init_dir,
            device=device, precision=precision.name, peak_gpu_memory=peak, notes=notes)
        metrics = {
            "reward_first": rewards[0][1] if rewards else None,
            "reward_last": rewards[-1][1] if rewards else None,
            "reward_history": sample_history(rewards),
            "kl_history": sample_history(kls),
            "kl_last": kls[-1][1] if kls else None,
        }
        details = {
            "reward_model": spec.reward_model.identifier,
            "ppo": {"batch_size": options.batch_size, "mini_batch_size": loop_mini_batch(options),
                    "ppo_epochs": options.ppo_epochs or 4, "target_kl": options.target_kl,
                    "kl_coef": KL_COEF, "implementation": "meshq (TRL 1.x has no PPOTrainer for transformers 5)"},
        }
        return training_result(outcome, metrics, details, spec.output.archive_format, out_dir, progress.run)


# -- helpers -------------------------------------------------------------------------------
def _frozen_copy(model: Any) -> Any:
    import copy

    return copy.deepcopy(model).eval().requires_grad_(False)


def _batch_for_step(query_ids: list[list[int]], step: int, batch_size: int, seed: int) -> list[list[int]]:
    """The prompts of rollout ``step``: a seeded permutation per epoch, batches cut across epochs."""
    import numpy as np

    picked = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, index = divmod(position, len(query_ids))
        order = np.random.default_rng(seed + epoch).permutation(len(query_ids))
        picked.append(query_ids[int(order[index])])
    return picked


def _trainable_state(policy: Any) -> dict[str, Any]:
    return {name: p.detach().cpu().clone() for name, p in policy.named_parameters() if p.requires_grad}


def _save_checkpoint(checkpoints: Path, state: PPOState, policy: Any, value_head: Any, optimizer: Any,
                     keep: int | None) -> None:
    import torch

    directory = checkpoints / f"checkpoint-{state.step}"
    tmp = checkpoints / f".checkpoint-{state.step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(_trainable_state(policy), tmp / "policy.pt")
    torch.save(value_head.state_dict(), tmp / "value_head.pt")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / STATE_FILE).write_text(json.dumps({"global_step": state.step, "history": state.history}))
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    if keep:
        found = sorted((int(p.name[11:]), p) for p in checkpoints.iterdir()
                       if p.is_dir() and p.name.startswith("checkpoint-") and p.name[11:].isdigit())
        for _, old in found[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(directory: Path, policy: Any, value_head: Any, optimizer: Any, device: str) -> PPOState:
    import torch

    try:
        weights = torch.load(directory / "policy.pt", map_location=device, weights_only=True)
        missing = set(_trainable_state(policy)) - set(weights)
        if missing:
            raise ValueError(f"it lacks {len(missing)} trainable tensors (e.g. {sorted(missing)[0]})")
        policy.load_state_dict(weights, strict=False)
        value_head.load_state_dict(torch.load(directory / "value_head.pt", map_location=device, weights_only=True))
        optimizer.load_state_dict(torch.load(directory / "optimizer.pt", map_location=device, weights_only=True))
        saved = json.loads((directory / STATE_FILE).read_text())
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ExecutorError(f"cannot resume from {directory}: {type(exc).__name__}: {exc}",
                            path=str(directory)) from None
    return PPOState(int(saved["global_step"]), list(saved.get("history") or []))
