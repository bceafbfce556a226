"""The ``dpo`` task: through a real worker (the trained model prefers the chosen answers), and its
executor called directly (LoRA, resume, data sources, metrics)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from app.core.errors import ExecutorError, SpecError, TaskCancelled
from app.core.task_spec import parse_task_spec
from tasks.executors.dpo import DPOExecutor
from tasks.executors.preference_data import load_preferences
from tasks.executors.progress import RecordingProgress
from tasks.executors.training import last_checkpoint

PREFERENCES = [{"prompt": "Q: What is the capital of France?\nA:", "chosen": " Paris", "rejected": " London"},
               {"prompt": "Q: What colour is the sky?\nA:", "chosen": " Blue", "rejected": " Green"},
               {"prompt": "Q: How many legs does a spider have?\nA:", "chosen": " Eight", "rejected": " Six"}]


def dpo_spec(model_dir: Path, *, data: dict[str, Any] | None = None, **sections: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "taskType": "dpo",
        "model": {"source": {"identifier": str(model_dir)}, "transformers": {"device_map": "cpu"}},
        "data": data or {"preferences": PREFERENCES, "separator": ""},
        "training": {"max_steps": 8, "batch_size": 3, "learning_rate": 5e-3, "beta": 0.1, "save_steps": 1000,
                     "lr_scheduler_type": "constant"},
    }
    raw.update(sections)
    return raw


def answer_logprob(model: Any, tokenizer: Any, prompt: str, answer: str) -> float:
    """log p(answer | prompt): the sum over the answer's tokens, prompt and answer tokenised together
    as TRL does."""
    import torch

    prompt_len = len(tokenizer(prompt)["input_ids"])
    ids = tokenizer(prompt + answer, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    logps = torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    return float(logps[prompt_len - 1:].sum())


def preference_margin(model: Any, tokenizer: Any, pairs: list[dict[str, str]]) -> float:
    """Mean of log p(chosen) - log p(rejected) over the pairs."""
    margins = [answer_logprob(model, tokenizer, p["prompt"], p["chosen"])
               - answer_logprob(model, tokenizer, p["prompt"], p["rejected"]) for p in pairs]
    return sum(margins) / len(margins)


def submit(spec: dict[str, Any]) -> Any:
    from app.celery import app
    from tasks.submit import submit_task

    return app.AsyncResult(submit_task(spec).task_id)


@pytest.mark.slow
def test_dpo_through_a_worker_raises_the_chosen_answers_margin(worker_factory, tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    worker = worker_factory()
    handle = submit(dpo_spec(tiny_model_dir))
    result = handle.get(timeout=240)

    assert result["taskType"] == "dpo" and result["worker_id"] == worker.worker_id
    assert result["steps"] == 8 and result["samples"] == 3 and result["beta"] == 0.1
    assert result["loss_last"] < result["loss_first"]
    assert result["reward_margin_last"] > 0 and result["reward_accuracy_last"] == 1.0
    assert len(result["reward_margin_history"]) == 8
    task_dir = worker.results_dir / handle.id
    assert json.loads((task_dir / "responses.json").read_text()) == result
    assert (task_dir / "final_model.zip").is_file()
    assert "rewards/margins" in (task_dir / "logs" / "training_log.jsonl").read_text()

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trained = AutoModelForCausalLM.from_pretrained(result["final_model_path"])
    before = preference_margin(base, tokenizer, PREFERENCES)
    after = preference_margin(trained, tokenizer, PREFERENCES)
    assert after > before + 1.0, (before, after)
    for pair in PREFERENCES:  # every pair, not only on average
        assert (answer_logprob(trained, tokenizer, pair["prompt"], pair["chosen"])
                - answer_logprob(trained, tokenizer, pair["prompt"], pair["rejected"])
                > answer_logprob(base, tokenizer, pair["prompt"], pair["chosen"])
                - answer_logprob(base, tokenizer, pair["prompt"], pair["rejected"]))


def test_dpo_with_lora_writes_an_adapter_that_prefers_the_chosen_answers(tiny_model_dir: Path,
                                                                         tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = parse_task_spec(dpo_spec(tiny_model_dir, lora={"r": 8, "alpha": 16, "dropout": 0.0,
                                                          "target_modules": "all-linear"}))
    progress = RecordingProgress()
    result = DPOExecutor().run(spec, tmp_path / "t", progress)
    assert Path(result["final_lora_path"]) == tmp_path / "t" / "final_lora"
    assert (tmp_path / "t" / "final_lora.zip").is_file() and "final_model_path" not in result
    assert 0 < result["trainable_params"] < result["total_params"]
    assert progress.reports[-1]["step"] == 8 and progress.reports[-1]["total_steps"] == 8

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = preference_margin(base, tokenizer, PREFERENCES)
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                        result["final_lora_path"])
    assert preference_margin(trained, tokenizer, PREFERENCES) > before + 0.5


def test_dpo_resumes_from_its_newest_checkpoint(tiny_model_dir: Path, tmp_path: Path) -> None:
    raw = dpo_spec(tiny_model_dir)
    raw["training"].update({"max_steps": 6, "save_steps": 2, "save_total_limit": 5})
    spec = parse_task_spec(raw)
    with pytest.raises(TaskCancelled, match="at step 5"):  # begin + 4 step reports, then cancelled
        DPOExecutor().run(spec, tmp_path / "t", RecordingProgress(cancel_after=5))
    assert last_checkpoint(tmp_path / "t" / "checkpoints") == (tmp_path / "t" / "checkpoints" / "checkpoint-4", 4)
    progress = RecordingProgress()
    result = DPOExecutor().run(spec, tmp_path / "t", progress)
    assert result["resumed_from_step"] == 4 and result["steps"] == 6
    assert [r["step"] for r in progress.reports] == [4, 5, 6]


def test_preference_pairs_from_a_jsonl_file_and_a_table(tiny_model_dir: Path, tmp_path: Path) -> None:
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps({"q": f"question {i}", "good": f"yes {i}", "bad": f"no {i}"}) + "\n"
                             for i in range(4)))
    spec = parse_task_spec(dpo_spec(tiny_model_dir, data={
        "jsonl": {"path": str(jsonl), "prompt_field": "q", "chosen_field": "good", "rejected_field": "bad"},
        "separator": " ", "max_samples": 3}))
    pairs = load_preferences(spec.training_data())
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        (f"question {i}", f" yes {i}", f" no {i}") for i in range(3)]

    table = tmp_path / "pairs.csv"
    table.write_text("prompt,chosen,rejected\nq0,a0,b0\nq1,a1,b1\n")
    spec = parse_task_spec(dpo_spec(tiny_model_dir, data={"path": str(table), "separator": ""}))
    assert [(p.prompt, p.chosen, p.rejected) for p in load_preferences(spec.training_data())] == [
        ("q0", "a0", "b0"), ("q1", "a1", "b1")]


def test_a_preference_row_without_rejected_names_the_field(tiny_model_dir: Path, tmp_path: Path) -> None:
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
                     + json.dumps({"prompt": "p2", "chosen": "a2"}) + "\n")
    spec = parse_task_spec(dpo_spec(tiny_model_dir, data={"jsonl": {"path": str(jsonl)}}))
    with pytest.raises(SpecError, match=r"spec\.data\.jsonl\.rejected_field: row 1 has no 'rejected'"):
        DPOExecutor().run(spec, tmp_path / "t", RecordingProgress())
    assert not (tmp_path / "t" / "final_model").exists()


def test_a_diverging_dpo_run_fails_naming_the_step(tiny_model_dir: Path, tmp_path: Path) -> None:
    raw = dpo_spec(tiny_model_dir)
    raw["training"].update({"max_steps": 4, "learning_rate": 1e308})
    with pytest.raises(ExecutorError, match=r"dpo training diverged at step 2: the loss is nan"):
        DPOExecutor().run(parse_task_spec(raw), tmp_path / "t", RecordingProgress())
    assert not list((tmp_path / "t").glob("final_*"))
