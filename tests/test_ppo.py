"""The ``ppo`` task: through a real worker (greedy generations earn more reward than the base
model's), and its executor called directly (LoRA, cancel and resume, data, reward model errors).

The reward model is built here by hand: a one-layer Llama sequence classifier whose score
rises with the share of tokens that begin with a space (``Ġ…`` in the byte-level BPE), from
about -2.8 (none) to +2.8 (all). Its attention is uniform (zero queries and keys) and copies
each token's ±direction into the last position, so the score is a smooth function of that
share: a reward a policy can climb a little at a time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from app.core.errors import ExecutorError, SpecError, TaskCancelled
from app.core.task_spec import parse_task_spec
from tasks.executors.ppo import PPOExecutor
from tasks.executors.preference_data import load_queries
from tasks.executors.progress import RecordingProgress
from tasks.executors.training import last_checkpoint

PROMPTS = ["Q: What is the capital of France?\nA:", "Q: What colour is the sky?\nA:", "Tell me a story:",
           "Numbers:"]
GENERATION = {"max_new_tokens": 4, "do_sample": True}


def build_reward_model(policy_dir: Path, out_dir: Path) -> Path:
    """A sequence classifier scoring the share of space-initial tokens (see the module docstring)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    vocab, hidden = len(tokenizer), 16
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=1,
                         num_key_value_heads=1, intermediate_size=16, num_labels=1, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model = LlamaForSequenceClassification(config)
    pattern = torch.tensor([tokenizer.convert_ids_to_tokens(i).startswith("Ġ") for i in range(vocab)])
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()  # q/k (uniform attention), the MLP's output, everything not set below
        up, bias = torch.eye(hidden)[0], torch.eye(hidden)[1]
        # Every token: a constant part (keeps the final norm from erasing the share) ± the pattern.
        model.model.embed_tokens.weight.copy_(1e-3 * (bias + torch.where(pattern[:, None], up, -up)))
        layer = model.model.layers[0]
        for norm in (layer.input_layernorm, layer.post_attention_layernorm, model.model.norm):
            norm.weight.fill_(1.0)
        layer.self_attn.v_proj.weight.copy_(torch.eye(hidden))
        layer.self_attn.o_proj.weight.copy_(torch.eye(hidden))
        model.score.weight[0] = up * 4.0 / hidden ** 0.5
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def reward_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_reward_model(tiny_model_dir, tmp_path_factory.mktemp("reward") / "model")


def ppo_spec(model_dir: Path, reward_dir: Path, *, data: dict[str, Any] | None = None,
             **sections: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "taskType": "ppo",
        "model": {"source": {"identifier": str(model_dir)}, "transformers": {"device_map": "cpu"}},
        "reward_model": {"identifier": str(reward_dir)},
        "data": data or {"prompts": PROMPTS},
        "generation": GENERATION,
        "training": {"steps": 20, "batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 2, "learning_rate": 1e-3,
                     "save_freq": 1000, "seed": 0},
    }
    raw.update(sections)
    return raw


def greedy_reward(model: Any, tokenizer: Any, reward_model: Any) -> float:
    """Mean reward of greedy generations (as long as the rollouts') on the training prompts."""
    import torch

    scores = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=GENERATION["max_new_tokens"], do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            scores.append(float(reward_model(input_ids=out).logits[0, 0]))
    return sum(scores) / len(scores)


def submit(spec: dict[str, Any]) -> Any:
    from app.celery import app
    from tasks.submit import submit_task

    return app.AsyncResult(submit_task(spec).task_id)


@pytest.mark.slow
def test_ppo_through_a_worker_raises_the_reward_of_greedy_generations(worker_factory, tiny_model_dir: Path,
                                                                      reward_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    worker = worker_factory()
    handle = submit(ppo_spec(tiny_model_dir, reward_model_dir))
    result = handle.get(timeout=300)

    assert result["taskType"] == "ppo" and result["worker_id"] == worker.worker_id
    assert result["steps"] == 20 and result["total_steps"] == 20 and result["resumed_from_step"] == 0
    assert len(result["reward_history"]) == len(result["kl_history"]) == 20
    assert result["kl_history"][0][1] == pytest.approx(0.0, abs=1e-4)  # the first rollout is the reference's
    task_dir = worker.results_dir / handle.id
    assert json.loads((task_dir / "responses.json").read_text()) == result
    assert (task_dir / "final_model.zip").is_file()
    history = [json.loads(line) for line in (task_dir / "logs" / "training_log.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == list(range(1, 21))

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    reward_model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir)
    before = greedy_reward(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer, reward_model)
    after = greedy_reward(AutoModelForCausalLM.from_pretrained(result["final_model_path"]), tokenizer,
                          reward_model)
    assert after > before + 0.5, (before, after)


def test_ppo_with_lora_cancels_and_resumes_from_its_checkpoint(tiny_model_dir: Path, reward_model_dir: Path,
                                                               tmp_path: Path) -> None:
    raw = ppo_spec(tiny_model_dir, reward_model_dir, lora={"r": 4, "alpha": 8, "dropout": 0.0})
    raw["training"].update({"steps": 4, "save_freq": 2})
    spec = parse_task_spec(raw)
    with pytest.raises(TaskCancelled, match="at step 2"):  # begin + 2 step reports, then cancelled
        PPOExecutor().run(spec, tmp_path / "t", RecordingProgress(cancel_after=3))
    assert last_checkpoint(tmp_path / "t" / "checkpoints") == (tmp_path / "t" / "checkpoints" / "checkpoint-2", 2)
    assert not (tmp_path / "t" / "final_lora").exists()

    progress = RecordingProgress()
    result = PPOExecutor().run(spec, tmp_path / "t", progress)
    assert result["resumed_from_step"] == 2 and result["steps"] == 4
    assert [r["step"] for r in progress.reports] == [2, 3, 4]
    assert set(progress.reports[-1]) == {"step", "total_steps", "reward", "kl", "eta_s"}
    assert [point[0] for point in result["reward_history"]] == [1, 2, 3, 4]  # the history survives the resume
    assert (Path(result["final_lora_path"]) / "adapter_config.json").is_file()
    assert 0 < result["trainable_params"] < result["total_params"]


def test_ppo_prompts_from_a_jsonl_query_field(tiny_model_dir: Path, reward_model_dir: Path,
                                              tmp_path: Path) -> None:
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("".join(json.dumps({"query": f"q{i}", "prompt": f"p{i}"}) + "\n" for i in range(3)))
    spec = parse_task_spec(ppo_spec(tiny_model_dir, reward_model_dir, data={"jsonl": {"path": str(jsonl)}}))
    assert load_queries(spec.training_data()) == ["q0", "q1", "q2"]  # query wins over prompt
    spec = parse_task_spec(ppo_spec(tiny_model_dir, reward_model_dir, data={
        "jsonl": {"path": str(jsonl), "query_field": "prompt"}}))
    assert load_queries(spec.training_data()) == ["p0", "p1", "p2"]
    jsonl.write_text(json.dumps({"query": "q0"}) + "\n" + json.dumps({"other": 1}) + "\n")
    spec = parse_task_spec(ppo_spec(tiny_model_dir, reward_model_dir, data={"jsonl": {"path": str(jsonl)}}))
    with pytest.raises(SpecError, match=r"spec\.data\.jsonl\.query_field: row 1 has no 'query'"):
        load_queries(spec.training_data())


def test_reward_model_problems_name_the_field(tiny_model_dir: Path, reward_model_dir: Path,
                                              tmp_path: Path) -> None:
    spec = parse_task_spec(ppo_spec(tiny_model_dir, tmp_path / "no-such-reward-model"))
    with pytest.raises(SpecError, match=r"spec\.reward_model\.identifier"):
        PPOExecutor().run(spec, tmp_path / "t1", RecordingProgress())
    raw = ppo_spec(tiny_model_dir, reward_model_dir)
    raw["reward_model"]["positive_label"] = "POSITIVE"
    with pytest.raises(SpecError, match=r"spec\.reward_model\.positive_label: 'POSITIVE' is not one of"):
        PPOExecutor().run(parse_task_spec(raw), tmp_path / "t2", RecordingProgress())
    with pytest.raises(SpecError, match=r"spec\.reward_model: required for taskType 'ppo'"):
        parse_task_spec({k: v for k, v in ppo_spec(tiny_model_dir, reward_model_dir).items()
                         if k != "reward_model"})


@pytest.mark.parametrize("kind", ["classification", "sentiment", "sequence_classification"])
def test_every_reward_model_type_scores_the_positive_or_last_label(kind: str, tiny_model_dir: Path,
                                                                   tmp_path: Path) -> None:
    """The original templates' ``type: classification`` (and ``sentiment``) read a multi-label
    classifier's score as documented: the label named positive, else the last label."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from app.core.task_spec.schema import RewardModelSpec
    from tasks.executors.ppo import RewardScorer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=1,
                         num_key_value_heads=1, intermediate_size=16, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id, num_labels=3,
                         id2label={0: "bad", 1: "neutral", 2: "good"})
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "three")
    scorer = RewardScorer(RewardModelSpec(identifier=str(tmp_path / "three"), type=kind), tokenizer, "cpu", False)
    ids = torch.tensor([tokenizer("Tell me a story:")["input_ids"]])
    logits = scorer.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert scorer.index == 2 and torch.equal(scorer(ids, torch.ones_like(ids)), logits[:, 2])

    config.id2label = {0: "NEGATIVE", 1: "POSITIVE", 2: "other"}
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "named")
    assert RewardScorer(RewardModelSpec(identifier=str(tmp_path / "named"), type=kind),
                        tokenizer, "cpu", False).index == 1


def test_ppo_starts_from_an_earlier_stage_and_uses_it_as_the_reference(tiny_model_dir: Path,
                                                                        reward_model_dir: Path,
                                                                        tmp_path: Path) -> None:
    raw = ppo_spec(tiny_model_dir, reward_model_dir)
    raw["training"].update({"steps": 2, "learning_rate": 5e-3})
    first = PPOExecutor().run(parse_task_spec(raw), tmp_path / "first", RecordingProgress())
    assert first["kl_history"][1][1] != pytest.approx(0.0, abs=1e-6)  # the policy moved off the base model

    raw["checkpoint"] = {"load": {"type": "local", "path": first["final_model_path"]}}
    raw["training"]["steps"] = 1
    second = PPOExecutor().run(parse_task_spec(raw), tmp_path / "second", RecordingProgress())
    assert second["init_checkpoint"] == first["final_model_path"]
    # The first rollout's KL is measured against the loaded weights, not the base model.
    assert second["kl_history"] == [[1, pytest.approx(0.0, abs=1e-4)]]


def test_a_diverging_ppo_run_fails_naming_the_step(tiny_model_dir: Path, reward_model_dir: Path,
                                                   tmp_path: Path) -> None:
    raw = ppo_spec(tiny_model_dir, reward_model_dir)
    raw["training"].update({"steps": 3, "learning_rate": 1e308, "save_freq": 1})
    with pytest.raises(ExecutorError, match=r"ppo training diverged at step 1: the trained weights hold inf"):
        PPOExecutor().run(parse_task_spec(raw), tmp_path / "t", RecordingProgress())
    assert not list((tmp_path / "t").glob("final_*")) and not (tmp_path / "t" / "checkpoints").exists()
