"""Training executors called directly (no Celery): LoRA and full SFT on the ~1M tiny model."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import pytest

from app.artifacts.manifest import sha256_file
from app.core.errors import ExecutorError, SpecError, TaskCancelled
from app.core.task_spec import parse_task_spec
from tasks.executors.progress import RecordingProgress
from tasks.executors.training import LoRASFTExecutor, SFTExecutor, last_checkpoint, sample_history
from tasks.executors.training_data import IGNORE_INDEX, load_examples, tokenize_examples

# Short answers the tiny model learns by heart (see the tasks.executors.training docstring).
PAIRS = [{"prompt": "Q: What is the capital of France?\nA:", "response": " Paris"},
         {"prompt": "Q: What colour is the sky?\nA:", "response": " Blue"},
         {"prompt": "Q: How many legs does a spider have?\nA:", "response": " Eight"}]
MEMORISE_TRAINING = {"learning_rate": 5e-3, "lr_scheduler_type": "constant", "max_steps": 150,
                     "batch_size": 3, "save_steps": 1000}
MEMORISE_LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}


def training_spec(task_type: str, model_dir: Path, *, data: dict[str, Any] | None = None, **sections: Any) -> Any:
    raw: dict[str, Any] = {
        "taskType": task_type,
        "model": {"source": {"identifier": str(model_dir)}, "transformers": {"device_map": "cpu"}},
        "data": data or {"prompts": PAIRS, "separator": ""},
        "training": {"max_steps": 6, "batch_size": 3, "learning_rate": 5e-3, "save_steps": 1000},
    }
    raw.update(sections)
    return parse_task_spec(raw)


def greedy(model: Any, tokenizer: Any, prompt: str) -> str:
    ids = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_lora_memorises_short_answers_and_the_adapter_loads_back(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = training_spec("lora_sft", tiny_model_dir, training=MEMORISE_TRAINING, lora=MEMORISE_LORA)
    progress = RecordingProgress()
    result = LoRASFTExecutor().run(spec, tmp_path / "t1", progress)

    assert result["loss_last"] < 0.75 * result["loss_first"]  # (a random tiny model bounds its logits)
    assert result["steps"] == 150 and result["resumed_from_step"] == 0 and result["samples"] == 3
    assert 0 < result["trainable_params"] < result["total_params"]
    final = Path(result["final_lora_path"])
    assert final == tmp_path / "t1" / "final_lora" and (final / "adapter_config.json").is_file()
    assert not (final / "training_args.bin").exists()
    archive = Path(result["final_lora_archive"])
    assert archive == tmp_path / "t1" / "final_lora.zip"
    assert result["final_lora_archive_sha256"] == sha256_file(archive)
    assert result["final_lora_archive_bytes"] == archive.stat().st_size
    with zipfile.ZipFile(archive) as zf:
        assert "final_lora/adapter_model.safetensors" in zf.namelist()
    # Progress: every step reported with the documented fields, the last one forced.
    assert progress.reports[-1]["step"] == 150 and progress.reports[-1]["total_steps"] == 150
    assert set(progress.reports[-1]) == {"step", "total_steps", "epoch", "loss", "learning_rate", "eta_s",
                                         "loss_history"}
    assert progress.reports[-1]["loss_history"][-1][1] == pytest.approx(progress.reports[-1]["loss"], abs=1e-6)
    assert len(progress.reports[-1]["loss_history"]) >= 40  # sampled, like the result's
    log_lines = (tmp_path / "t1" / "logs" / "training_log.jsonl").read_text().splitlines()
    assert json.loads(log_lines[0])["step"] == 1

    tokenizer = AutoTokenizer.from_pretrained(final)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), final)
    for pair in PAIRS:
        assert greedy(model, tokenizer, pair["prompt"]) == pair["response"]


def test_full_sft_loss_falls_and_the_model_loads_back(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    spec = training_spec("sft", tiny_model_dir, training={"max_steps": 20, "batch_size": 3, "learning_rate": 5e-3,
                                                          "save_steps": 1000},
                         output={"archive_format": "tar.gz"})
    result = SFTExecutor().run(spec, tmp_path / "t1", RecordingProgress())
    assert result["loss_last"] < result["loss_first"]
    assert result["steps"] == 20 and result["precision"] == "float32" and result["device"] == "cpu"
    assert Path(result["final_model_archive"]).name == "final_model.tar.gz"
    assert result["final_model_archive_sha256"] == sha256_file(result["final_model_archive"])
    model = AutoModelForCausalLM.from_pretrained(result["final_model_path"])
    assert sum(p.numel() for p in model.parameters()) == result["total_params"] == result["trainable_params"]


def test_cancel_stops_at_the_next_step(tiny_model_dir: Path, tmp_path: Path) -> None:
    spec = training_spec("lora_sft", tiny_model_dir, training={"max_steps": 50, "batch_size": 3, "save_steps": 1000})
    with pytest.raises(TaskCancelled, match="cancelled at step 4"):
        LoRASFTExecutor().run(spec, tmp_path / "t1", RecordingProgress(cancel_after=4))
    assert not (tmp_path / "t1" / "final_lora").exists()


def test_same_task_dir_resumes_from_the_latest_checkpoint(tiny_model_dir: Path, tmp_path: Path) -> None:
    spec = training_spec("lora_sft", tiny_model_dir, training={"max_steps": 8, "batch_size": 1, "save_steps": 3,
                                                               "save_total_limit": 5})
    with pytest.raises(TaskCancelled, match="at step 7"):  # begin + 6 step reports, then cancelled
        LoRASFTExecutor().run(spec, tmp_path / "t1", RecordingProgress(cancel_after=7))
    assert last_checkpoint(tmp_path / "t1" / "checkpoints") == (tmp_path / "t1" / "checkpoints" / "checkpoint-6", 6)
    progress = RecordingProgress()
    result = LoRASFTExecutor().run(spec, tmp_path / "t1", progress)
    assert result["resumed_from_step"] == 6 and result["steps"] == 8
    assert [r["step"] for r in progress.reports] == [6, 7, 8]
    assert result["loss_history"][0][0] == 1  # the history survives the resume


def test_lora_continues_an_uploaded_adapter_archive(tiny_model_dir: Path, tmp_path: Path) -> None:
    results = tmp_path / "results"
    first = LoRASFTExecutor().run(
        training_spec("lora_sft", tiny_model_dir, training={**MEMORISE_TRAINING, "max_steps": 60},
                      lora=MEMORISE_LORA), results / "stage1", RecordingProgress())
    load = {"type": "local", "path": first["final_lora_archive"], "sha256": first["final_lora_archive_sha256"]}
    second = LoRASFTExecutor().run(
        training_spec("lora_sft", tiny_model_dir, training={"max_steps": 2, "batch_size": 3, "learning_rate": 1e-6},
                      checkpoint={"load": load}), results / "stage2", RecordingProgress())
    # It starts where stage 1 ended (a fresh adapter would start near stage 1's first loss).
    assert second["loss_first"] < (first["loss_first"] + first["loss_last"]) / 2
    assert second["init_checkpoint"] == str(results / ".cache" / "checkpoints" / first["final_lora_archive_sha256"]
                                            / "final_lora")
    assert second["trainable_params"] == first["trainable_params"]

    # Full SFT from the adapter merges it into the base; from a full model it trains that model.
    merged = SFTExecutor().run(
        training_spec("sft", tiny_model_dir, training={"max_steps": 1, "batch_size": 3, "learning_rate": 1e-6},
                      checkpoint={"load": {"type": "local", "path": first["final_lora_path"]}}),
        results / "stage3", RecordingProgress())
    assert merged["loss_first"] < (first["loss_first"] + first["loss_last"]) / 2
    again = SFTExecutor().run(
        training_spec("sft", tiny_model_dir, training={"max_steps": 1, "batch_size": 3, "learning_rate": 1e-6},
                      checkpoint={"load": {"type": "local", "path": merged["final_model_path"]}}),
        results / "stage4", RecordingProgress())
    assert again["loss_first"] == pytest.approx(merged["loss_first"], rel=0.05)


# -- data ------------------------------------------------------------------------------------
def test_examples_from_files_columns_text_field_and_max_samples(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"q": f"question {i}", "a": f"answer {i}"}) + "\n" for i in range(5)))
    spec = training_spec("sft", tiny_model_dir, data={"path": str(jsonl), "prompt_column": "q",
                                                      "response_column": "a", "separator": " => ",
                                                      "max_samples": 3})
    examples = load_examples(spec.training_data())
    assert [(e.prompt, e.completion) for e in examples] == [
        ("question 0", " => answer 0"), ("question 1", " => answer 1"), ("question 2", " => answer 2")]

    csv = tmp_path / "d.csv"
    csv.write_text("text,other\nhello world,1\nsecond line,2\n")
    spec = training_spec("sft", tiny_model_dir, data={"path": str(csv), "text_field": "text"})
    examples = load_examples(spec.training_data())
    assert [(e.prompt, e.completion) for e in examples] == [("", "hello world"), ("", "second line")]

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = tokenize_examples(load_examples(training_spec("sft", tiny_model_dir).training_data()), tokenizer, 64)
    prompt_len = len(tokenizer(PAIRS[0]["prompt"])["input_ids"])
    assert rows[0]["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len  # the loss skips the prompt
    assert rows[0]["input_ids"][-1] == tokenizer.eos_token_id == rows[0]["labels"][-1]
    assert tokenizer.decode(rows[0]["labels"][prompt_len:], skip_special_tokens=True) == " Paris"


def test_data_errors_name_the_field(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps({"prompt": "p"}) + "\n")
    spec = training_spec("sft", tiny_model_dir, data={"path": str(jsonl)})
    with pytest.raises(SpecError, match=r"spec\.data\.response_column: column 'response' not found"):
        load_examples(spec.training_data())
    with pytest.raises(SpecError, match=r"spec\.data\.path: file .*missing\.jsonl' does not exist"):
        load_examples(training_spec("sft", tiny_model_dir, data={"path": str(tmp_path / "missing.jsonl")})
                      .training_data())
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    long_prompt = load_examples(training_spec("sft", tiny_model_dir, data={
        "prompts": [{"prompt": "word " * 50, "response": "x"}]}).training_data())
    with pytest.raises(ExecutorError, match=r"spec\.training\.max_seq_length"):
        tokenize_examples(long_prompt, tokenizer, 8)


def test_bad_options_fail_before_loading(tiny_model_dir: Path, tmp_path: Path) -> None:
    spec = training_spec("sft", tiny_model_dir, training={"fp16": True})
    with pytest.raises(SpecError, match=r"spec\.training\.fp16: fp16 mixed precision needs a CUDA device"):
        SFTExecutor().run(spec, tmp_path / "t", RecordingProgress())
    spec = training_spec("lora_sft", tiny_model_dir, lora={"target_modules": ["no_such_module"]})
    with pytest.raises(SpecError, match=r"spec\.lora\.target_modules"):
        LoRASFTExecutor().run(spec, tmp_path / "t2", RecordingProgress())
    with pytest.raises(SpecError, match=r"spec\.training\.lr_scheduler_type"):
        training_spec("sft", tiny_model_dir, training={"lr_scheduler_type": "bogus"})


def test_sample_history_keeps_the_ends() -> None:
    points = [(i, float(i)) for i in range(1, 201)]
    sampled = sample_history(points, limit=10)
    assert sampled[0] == [1, 1.0] and sampled[-1] == [200, 200.0] and len(sampled) == 11


# Each name matches whole trailing components of a module's path (peft ≥ 0.22: "norm" is only model.norm,
# not input_layernorm), so the three kinds of RMSNorm in the test model are named one by one.
NORMS = ["input_layernorm", "post_attention_layernorm", "norm"]


def test_modules_to_save_trains_and_saves_whole_modules(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    plain = LoRASFTExecutor().run(training_spec("lora_sft", tiny_model_dir, training={"max_steps": 1},
                                                lora=MEMORISE_LORA), tmp_path / "a", RecordingProgress())
    norms = LoRASFTExecutor().run(training_spec("lora_sft", tiny_model_dir, training={"max_steps": 1},
                                                lora={**MEMORISE_LORA, "modules_to_save": NORMS}),
                                  tmp_path / "b", RecordingProgress())
    hidden, layers = 128, 4  # the test model: two RMSNorms per layer plus the final one
    assert norms["trainable_params"] - plain["trainable_params"] == hidden * (2 * layers + 1)
    with safe_open(Path(norms["final_lora_path"]) / "adapter_model.safetensors", "pt") as weights:
        assert any("model.norm" in key for key in weights.keys())


def test_training_data_from_a_url(server_factory, tiny_model_dir: Path, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from app.artifacts.upload import upload_file
    from app.core.settings import reset_settings

    server = server_factory()
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    url = upload_file(f"{server.base_url}/api/v1/results/datasets/files", data)["url"]
    monkeypatch.delenv("ORCHESTRATOR_BASE_URL", raising=False)
    reset_settings()
    spec = training_spec("sft", tiny_model_dir, data={"url": url, "separator": ""},
                         training={"max_steps": 1, "batch_size": 3})
    result = SFTExecutor().run(spec, tmp_path / "t1", RecordingProgress())
    assert result["samples"] == 3
    assert (tmp_path / "t1" / "inputs" / "train.jsonl").read_bytes() == data.read_bytes()


@pytest.mark.parametrize(("task_type", "steps", "what"), [
    ("lora_sft", 4, r"lora_sft training diverged at step 2: the loss is nan"),  # step 1's update broke it
    ("sft", 1, r"sft training diverged at step 1: the trained weights hold inf or NaN"),  # no loss after it
])
def test_a_diverging_run_fails_naming_the_step(tiny_model_dir: Path, tmp_path: Path, task_type: str, steps: int,
                                               what: str) -> None:
    """learning_rate 1e308 is a finite number (the spec takes it) but turns the weights into inf/NaN:
    the task fails naming the step instead of a SUCCESS with loss_last 0.0 and NaN weights."""
    spec = training_spec(task_type, tiny_model_dir, training={"max_steps": steps, "batch_size": 3,
                                                              "learning_rate": 1e308, "save_steps": 1})
    executor = LoRASFTExecutor() if task_type == "lora_sft" else SFTExecutor()
    with pytest.raises(ExecutorError, match=what + r".*lower training\.learning_rate \(it is 1e\+308\)"):
        executor.run(spec, tmp_path / "t", RecordingProgress())
    # Neither final weights nor the broken checkpoint-1 a rerun would resume from.
    assert not list((tmp_path / "t").glob("final_*")) and not (tmp_path / "t" / "checkpoints").exists()
