"""One PPO step of the ``ppo`` task (``tasks/executors/ppo.py``): ``PPOLoop``.

It follows the PPO recipe of TRL's classic trainer (Ouyang et al., 2022; Huang et al.,
"The N+ implementation details of RLHF with PPO", 2024). One step:

1. **rollout**: ``batch_size`` prompts (chosen by ``tasks.executors.ppo`` in a seeded
   order, epoch after epoch) are completed by the policy with the task's
   ``generation`` settings; a response ends at its first eos;
2. **score**: the reward model (``reward_model``, a sequence classifier, loaded by
   ``tasks.executors.ppo.RewardScorer``) scores prompt +
   response: its single logit, or the logit of the positive class (``positive_label``;
   else the label named positive, else the last one — for every ``type``). A reward
   model with the policy's vocabulary reads the token ids as they are (as TRL's PPO
   does); another one reads the decoded text through its own tokenizer;
3. **advantages**: per-token rewards are the score on the last token minus
   ``KL_COEF`` × the log-ratio of the policy to the reference model (the model the
   task started from: a frozen copy, or for LoRA the same weights with the adapter
   off); a value head on the policy's last hidden state gives GAE advantages
   (γ = 1, λ = 0.95), whitened;
4. **update**: ``ppo_epochs`` passes over the rollout in shuffled mini-batches of
   ``mini_batch_size``: the clipped policy loss plus the clipped value loss, one
   optimiser step (AdamW, ``learning_rate``, gradient norm clipped to 1) per
   mini-batch. With ``target_kl`` the passes stop early once the policy has moved
   more than 1.5 × ``target_kl`` (approximate KL) from the one that generated the
   rollout (``early_stopping: false`` turns this off).

torch is imported inside functions only: the worker's parent process imports ``tasks``
and must stay free of it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from app.core.task_spec import TrainingOptions
from app.core.task_spec.schema import GenerationOptions

KL_COEF = 0.05  # weight of the per-token KL penalty against the reference model (TRL's default)
CLIP_RANGE = 0.2  # policy ratio clipping
CLIP_RANGE_VALUE = 0.2  # value clipping
VALUE_COEF = 0.1  # weight of the value loss
GAMMA, LAM = 1.0, 0.95  # GAE
MAX_GRAD_NORM = 1.0
EARLY_STOP_FACTOR = 1.5  # stop a step's passes when approx KL > 1.5 × target_kl (TRL's rule)

# The reward model (``tasks.executors.ppo.RewardScorer``): right-padded token ids and their
# attention mask in, one score per sequence out.
Scorer = Callable[[Any, Any], Any]


def loop_mini_batch(options: TrainingOptions) -> int:
    return min(options.mini_batch_size or options.batch_size, options.batch_size)


class PPOLoop:
    """Rollout, score, advantages and clipped updates of one PPO step."""

    def __init__(self, policy: Any, reference: Any, value_head: Any, optimizer: Any, scorer: Scorer,
                 tokenizer: Any, options: TrainingOptions, generation: GenerationOptions, device: str) -> None:
        self.policy, self.reference, self.value_head = policy, reference, value_head
        self.optimizer, self.scorer, self.tokenizer = optimizer, scorer, tokenizer
        self.options, self.generation, self.device = options, generation, device
        self.mini_batch = loop_mini_batch(options)
        self.epochs = options.ppo_epochs or 4
        self.target_kl = options.target_kl if options.early_stopping is not False else None

    # -- rollout -------------------------------------------------------------------------
    def generate(self, batch: list[list[int]]) -> tuple[Any, Any, int]:
        """Left-padded prompts + sampled responses; ``(sequences, attention, prompt_width)``."""
        import torch

        pad = self.tokenizer.pad_token_id
        width = max(len(ids) for ids in batch)
        prompts = torch.full((len(batch), width), pad, dtype=torch.long)
        prompt_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, ids in enumerate(batch):
            prompts[i, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            prompt_mask[i, width - len(ids):] = 1
        prompts, prompt_mask = prompts.to(self.device), prompt_mask.to(self.device)
        g = self.generation
        self.policy.eval()
        sampling: dict[str, Any] = {"do_sample": g.do_sample}
        if g.do_sample:
            sampling.update(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k or 0)
        with torch.no_grad():
            out = self.policy.generate(input_ids=prompts, attention_mask=prompt_mask,
                                       max_new_tokens=g.max_new_tokens, min_new_tokens=1, **sampling,
                                       pad_token_id=pad, eos_token_id=self.tokenizer.eos_token_id)
        responses = out[:, width:]
        # A response ends at its first eos (kept); what follows is padding.
        eos = self.tokenizer.eos_token_id
        response_mask = torch.ones_like(responses)
        if eos is not None:
            ended = (responses == eos).long().cumsum(dim=1)
            response_mask = ((ended == 0) | ((ended == 1) & (responses == eos))).long()
        responses = torch.where(response_mask.bool(), responses, torch.full_like(responses, pad))
        sequences = torch.cat([prompts, responses], dim=1)
        attention = torch.cat([prompt_mask, response_mask], dim=1)
        return sequences, attention, width

    def forward(self, model: Any, sequences: Any, attention: Any, width: int,
                with_values: bool) -> tuple[Any, Any]:
        """Log-probs of the response tokens (at the sampling temperature) and, if asked, values."""
        import torch

        positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
        out = model(input_ids=sequences, attention_mask=attention, position_ids=positions,
                    output_hidden_states=with_values)
        logits = out.logits[:, width - 1:-1].float()
        if self.generation.do_sample:
            logits = logits / self.generation.temperature
        logprobs = torch.log_softmax(logits, dim=-1).gather(2, sequences[:, width:, None])[:, :, 0]
        values = None
        if with_values:
            hidden = out.hidden_states[-1][:, width - 1:-1]
            values = self.value_head(hidden.to(self.value_head.weight.dtype))[:, :, 0].float()
        return logprobs, values

    def reference_logprobs(self, sequences: Any, attention: Any, width: int) -> Any:
        import torch

        with torch.no_grad():
            if self.reference is not None:
                return self.forward(self.reference, sequences, attention, width, False)[0]
            with self.policy.disable_adapter():  # LoRA: the reference is the model without its adapter
                return self.forward(self.policy, sequences, attention, width, False)[0]

    # -- one step ------------------------------------------------------------------------
    def step(self, batch: list[list[int]]) -> dict[str, Any]:
        import torch

        sequences, attention, width = self.generate(batch)
        mask = attention[:, width:].float()
        # Right-aligned copies for the reward model (its last token is the last non-pad one).
        scores = self.scorer(*_right_padded(sequences, attention, self.tokenizer.pad_token_id))
        with torch.no_grad():
            self.policy.eval()
            old_logprobs, old_values = self.forward(self.policy, sequences, attention, width, True)
            ref_logprobs = self.reference_logprobs(sequences, attention, width)
        kl = (old_logprobs - ref_logprobs) * mask
        rewards = -KL_COEF * kl
        last = (mask.sum(dim=1).long() - 1).clamp(min=0)
        rows = torch.arange(len(batch), device=rewards.device)
        rewards[rows, last] += scores.to(rewards.device)
        advantages, returns = _gae(rewards, old_values * mask, mask)

        self.policy.train()
        stats: dict[str, list[float]] = {"policy_loss": [], "value_loss": [], "approx_kl": [], "clip_fraction": []}
        stopped_early = False
        for _ in range(self.epochs):
            order = torch.randperm(len(batch))
            for start in range(0, len(batch), self.mini_batch):
                idx = order[start:start + self.mini_batch].to(sequences.device)
                logprobs, values = self.forward(self.policy, sequences[idx], attention[idx], width, True)
                m = mask[idx]
                ratio = torch.exp(logprobs - old_logprobs[idx])
                adv = advantages[idx]
                pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - CLIP_RANGE, 1 + CLIP_RANGE))
                policy_loss = _masked_mean(pg, m)
                clipped = old_values[idx] + (values - old_values[idx]).clamp(-CLIP_RANGE_VALUE, CLIP_RANGE_VALUE)
                vf = torch.max((values - returns[idx]) ** 2, (clipped - returns[idx]) ** 2)
                value_loss = 0.5 * _masked_mean(vf, m)
                loss = policy_loss + VALUE_COEF * value_loss
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                params = [p for group in self.optimizer.param_groups for p in group["params"]]
                torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
                self.optimizer.step()
                with torch.no_grad():
                    approx_kl = float(_masked_mean(0.5 * (logprobs - old_logprobs[idx]) ** 2, m))
                    stats["policy_loss"].append(float(policy_loss))
                    stats["value_loss"].append(float(value_loss))
                    stats["approx_kl"].append(approx_kl)
                    stats["clip_fraction"].append(float(_masked_mean(((ratio - 1).abs() > CLIP_RANGE).float(), m)))
            if self.target_kl is not None and stats["approx_kl"][-1] > EARLY_STOP_FACTOR * self.target_kl:
                stopped_early = True
                break
        self.policy.eval()
        return {
            "reward_mean": round(float(scores.mean()), 6),
            "reward_std": round(float(scores.std()) if len(batch) > 1 else 0.0, 6),
            "kl": round(float(kl.sum(dim=1).mean()), 6),
            "response_length": round(float(mask.sum(dim=1).mean()), 3),
            "policy_loss": round(sum(stats["policy_loss"]) / len(stats["policy_loss"]), 6),
            "value_loss": round(sum(stats["value_loss"]) / len(stats["value_loss"]), 6),
            "approx_kl": round(stats["approx_kl"][-1], 6),
            "clip_fraction": round(sum(stats["clip_fraction"]) / len(stats["clip_fraction"]), 6),
            "stopped_early": stopped_early,
        }


# -- helpers -------------------------------------------------------------------------------
def _right_padded(sequences: Any, attention: Any, pad: int) -> tuple[Any, Any]:
    """The same rows with their tokens moved to the left and padding to the right."""
    import torch

    out = torch.full_like(sequences, pad)
    mask = torch.zeros_like(attention)
    for i in range(sequences.shape[0]):
        tokens = sequences[i][attention[i].bool()]
        out[i, :len(tokens)] = tokens
        mask[i, :len(tokens)] = 1
    width = int(mask.sum(dim=1).max())
    return out[:, :width], mask[:, :width]


def _masked_mean(values: Any, mask: Any) -> Any:
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def _gae(rewards: Any, values: Any, mask: Any) -> tuple[Any, Any]:
    """Generalised advantage estimates (whitened over the real tokens) and returns."""
    import torch

    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], device=rewards.device)
    length = rewards.shape[1]
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        delta = rewards[:, t] + GAMMA * next_value - values[:, t]
        running = delta + GAMMA * LAM * running
        advantages[:, t] = running
    advantages = advantages * mask
    returns = advantages + values
    mean = _masked_mean(advantages, mask)
    var = _masked_mean((advantages - mean) ** 2, mask)
    whitened = (advantages - mean) * torch.rsqrt(var + 1e-8) * mask
    return whitened.detach(), returns.detach()
