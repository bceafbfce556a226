"""The vLLM backend of the inference executor, run in this process (no Celery): the same
contract as the transformers backend, compared with it on the same tiny model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here (make install-vllm; make test-vllm)")

from app.core.errors import TaskCancelled  # noqa: E402
from app.core.task_spec import parse_task_spec  # noqa: E402
from cli.tiny_model import build_tiny_model  # noqa: E402
from tasks.executors.inference import InferenceExecutor  # noqa: E402
from tasks.executors.models import ModelCache  # noqa: E402
from tasks.executors.progress import RecordingProgress  # noqa: E402
from tasks.executors.vllm_engine import VllmEngineCache  # noqa: E402
from tests.vllm.helpers import inference_spec, mixed_prompts  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("vllm-model") / "model", size="vllm")


@pytest.fixture(scope="module")
def executor() -> Iterator[InferenceExecutor]:
    executor = InferenceExecutor(ModelCache(), VllmEngineCache())
    yield executor
    executor.vllm_cache.release()
    executor.cache.release()


def run(executor: InferenceExecutor, raw: dict, tmp_path: Path, progress: RecordingProgress | None = None) -> dict:
    return executor.run(parse_task_spec(raw), tmp_path, progress or RecordingProgress())


def test_same_contract_and_outputs_as_transformers(executor, model_dir, tmp_path) -> None:
    prompts = mixed_prompts(12, seed=1)
    metadata_spec = {"system_prompt": "Answer briefly.", "stop": ["e"]}
    for extra in ({}, metadata_spec, {"chat_template": True, "system_prompt": "Be kind."}):
        vllm = run(executor, inference_spec(model_dir, prompts, "vllm", **extra), tmp_path)
        hf = run(executor, inference_spec(model_dir, prompts, "transformers", **extra), tmp_path)
        assert vllm["backend"] == "vllm" and hf["backend"] == "transformers"
        assert [i["index"] for i in vllm["items"]] == list(range(len(prompts)))
        assert [i["prompt"] for i in vllm["items"]] == prompts
        assert [i["output"] for i in vllm["items"]] == [i["output"] for i in hf["items"]], extra
        assert [i["finish_reason"] for i in vllm["items"]] == [i["finish_reason"] for i in hf["items"]]
        assert vllm["usage"]["prompt_tokens"] == hf["usage"]["prompt_tokens"]
        assert vllm["usage"]["num_requests"] == len(prompts) and vllm["tokens_per_s"] > 0
        assert vllm["model"]["dtype"] == "float32" and vllm["model"]["device"] == "cpu"
        assert vllm["engine"]["name"] == "vllm" and vllm["engine"]["max_model_len"] == 512
    assert any(i["finish_reason"] == "stop" for i in vllm["items"])


def test_ignore_eos_generates_exactly_max_new_tokens(executor, model_dir, tmp_path) -> None:
    prompts = mixed_prompts(6, seed=2)
    for backend in ("vllm", "transformers"):
        result = run(executor, inference_spec(model_dir, prompts, backend, max_new_tokens=7, ignore_eos=True),
                     tmp_path)
        assert result["usage"]["completion_tokens"] == 7 * len(prompts), backend


def test_engine_warm_between_tasks_and_released_for_another_model(model_dir, tmp_path) -> None:
    other = build_tiny_model(tmp_path / "other", size="vllm", seed=1)
    executor = InferenceExecutor(ModelCache(), VllmEngineCache())
    try:
        prompts = mixed_prompts(3)
        first = run(executor, inference_spec(model_dir, prompts), tmp_path)
        second = run(executor, inference_spec(model_dir, prompts), tmp_path)
        assert first["model_cache"]["hit"] is False and second["model_cache"] == {
            "hit": True, "load_sec": 0.0, "loads": 1, "hits": 1}
        assert second["items"] == first["items"]
        switched = run(executor, inference_spec(other, prompts), tmp_path)
        assert switched["model_cache"]["hit"] is False and switched["model_cache"]["loads"] == 2
        assert executor.vllm_cache.current_key is not None and executor.vllm_cache.current_key.weights_dir == str(other)
        assert switched["items"] != first["items"]
        # A transformers task needs the memory: the engine goes; the next vLLM task builds one again.
        run(executor, inference_spec(model_dir, prompts, "transformers"), tmp_path)
        assert executor.vllm_cache.current_key is None and executor.cache.current_key is not None
        again = run(executor, inference_spec(model_dir, prompts), tmp_path)
        assert again["model_cache"]["loads"] == 3 and executor.cache.current_key is None
        assert again["items"] == first["items"]
    finally:
        executor.vllm_cache.release()
        executor.cache.release()


def test_progress_after_each_chunk_and_cancel_between_chunks(executor, model_dir, tmp_path) -> None:
    prompts = mixed_prompts(10)
    progress = RecordingProgress()
    result = run(executor, inference_spec(model_dir, prompts, batch_size=4, max_new_tokens=4), tmp_path, progress)
    assert result["batches"] == 3 and result["max_batch_size"] == 4
    assert [r["done"] for r in progress.reports] == [0, 4, 8, 10]
    assert all(r["total"] == 10 for r in progress.reports)
    with pytest.raises(TaskCancelled):
        run(executor, inference_spec(model_dir, prompts, batch_size=4, max_new_tokens=4), tmp_path,
            RecordingProgress(cancel_after=2))


def test_seeded_sampling_is_reproducible(executor, model_dir, tmp_path) -> None:
    prompts = mixed_prompts(4)
    raw = inference_spec(model_dir, prompts, do_sample=True, temperature=1.5, top_k=50, seed=7)
    first = run(executor, raw, tmp_path)
    assert run(executor, raw, tmp_path)["items"] == first["items"]
    greedy = run(executor, inference_spec(model_dir, prompts), tmp_path)
    assert first["items"] != greedy["items"]


def test_a_shard_runs_on_vllm_with_the_whole_task_numbering(executor, model_dir, tmp_path) -> None:
    from tasks.executors.shards import PromptRange

    prompts = mixed_prompts(9, seed=3)
    raw = inference_spec(model_dir, prompts)
    whole = run(executor, raw, tmp_path)
    # A shard's spec holds the prompts of its range only (tasks.shards.shard_spec).
    shard = executor.run(parse_task_spec(inference_spec(model_dir, prompts[3:6])), tmp_path, RecordingProgress(),
                         shard=PromptRange(1, 3, 3, 6))
    assert shard["backend"] == "vllm" and shard["shard"] == {"index": 1, "count": 3, "start": 3, "stop": 6}
    assert shard["items"] == whole["items"][3:6]


def test_an_adapter_vllm_cannot_serve_falls_back_under_auto_and_fails_when_vllm_is_required(
        executor, model_dir, tmp_path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from app.core.errors import ExecutorError

    adapter = tmp_path / "adapter-with-norms"
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                                LoraConfig(r=8, target_modules=["q_proj", "v_proj"], modules_to_save=["norm"]))
    peft_model.save_pretrained(adapter)
    checkpoint = {"load": {"type": "local", "path": str(adapter)}}
    auto = run(executor, {**inference_spec(model_dir, mixed_prompts(2), "auto"), "checkpoint": checkpoint}, tmp_path)
    assert auto["backend"] == "transformers"
    assert any("modules_to_save: norm" in note and note.endswith("the task ran on transformers")
               for note in auto["notes"])
    with pytest.raises(ExecutorError) as err:
        run(executor, {**inference_spec(model_dir, mixed_prompts(2), "vllm"), "checkpoint": checkpoint}, tmp_path)
    assert "spec.inference.backend: vllm is required but" in str(err.value)


def test_the_benchmark_script_compares_both_backends_on_the_same_prompts(tmp_path) -> None:
    import json
    import subprocess
    import sys

    from tests.vllm.helpers import ROOT

    done = subprocess.run([sys.executable, str(ROOT / "bench" / "vllm.py"), "--prompts", "8", "--max-new-tokens",
                           "4", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "vLLM / transformers tokens/s:" in done.stdout
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert [row["backend"] for row in report["rows"]] == ["transformers", "vllm"]
    assert all(row["completion_tokens"] == 32 and row["tokens_per_s"] > 0 for row in report["rows"])
    assert report["rows"][0]["prompt_tokens"] == report["rows"][1]["prompt_tokens"]
    assert report["size"] == "vllm" and report["dtype"] == "float32" and report["ratio"] > 0
