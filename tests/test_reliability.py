"""Delivery guarantees with real training tasks (DESIGN §10): no duplicate runs past the
visibility timeout, and a pipeline whose stage-1 worker is SIGKILLed still completes."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_for
from tests.test_delivery import count_started

pytestmark = pytest.mark.slow

PAIRS = [{"prompt": "Q: What is the capital of France?\nA:", "response": " Paris"},
         {"prompt": "Q: What colour is the sky?\nA:", "response": " Blue"}]


def lora_stage(model_dir: Path, max_steps: int, save_steps: int) -> dict[str, Any]:
    return {
        "taskType": "lora_sft",
        "model": {"source": {"identifier": str(model_dir)}, "transformers": {"device_map": "cpu"}},
        "data": {"prompts": PAIRS, "separator": ""},
        "training": {"max_steps": max_steps, "batch_size": 1, "learning_rate": 5e-3,
                     "save_steps": save_steps, "save_total_limit": 2},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
    }


def test_training_longer_than_visibility_timeout_runs_once(worker_factory, redis_client, tiny_model_dir) -> None:
    """Visibility timeout 2 s; a training task several times longer; two workers: one run."""
    from app.celery import app
    from tasks.submit import submit_task

    env = {"MESHQ_VISIBILITY_TIMEOUT_S": "2"}
    worker_factory(worker_id="vt-train-a", env=env)
    worker_factory(worker_id="vt-train-b", env=env)
    stop, events = threading.Event(), []
    listener = count_started(redis_client, stop, events)
    time.sleep(0.3)
    try:
        started = time.monotonic()
        handle = app.AsyncResult(submit_task(lora_stage(tiny_model_dir, max_steps=600, save_steps=1000)).task_id)
        result = handle.get(timeout=300)
        runtime_s = time.monotonic() - started
    finally:
        stop.set()
        listener.join()
    assert runtime_s > 3 * 2, f"the task ({runtime_s:.1f}s) must outlast the visibility timeout several times"
    starts = [e for e in events if e["type"] == "TASK_STARTED" and e["task_id"] == handle.id]
    assert len(starts) >= 2, "the broker never redelivered the task: the test proves nothing"
    assert redis_client.get(f"meshq:task:{handle.id}:runs") == "1"
    assert result["steps"] == 600 and result["resumed_from_step"] == 0
    assert handle.state == "SUCCESS"


def test_pipeline_survives_sigkill_of_stage_one_worker(worker_factory, redis_client, tiny_model_dir,
                                                       tmp_path: Path) -> None:
    """Stage 1's worker is SIGKILLed after a checkpoint; another worker sharing RESULTS_DIR
    resumes it from that checkpoint and the pipeline completes."""
    from pipelines import Pipeline

    shared = tmp_path / "shared-results"
    env = {"MESHQ_VISIBILITY_TIMEOUT_S": "5"}
    first = worker_factory("train", worker_id="stage1-victim", results_dir=shared, env=env)
    document = {
        "apiVersion": "meshq/v1", "kind": "Pipeline", "metadata": {"name": "sigkill"},
        "spec": {"stages": [
            {"name": "train", "tags": ["train"], "spec": lora_stage(tiny_model_dir, max_steps=120, save_steps=10)},
            {"name": "infer", "tags": ["train"], "spec": {
                "taskType": "inference",
                "model": {"source": {"identifier": str(tiny_model_dir)}},
                "data": {"type": "list", "items": [PAIRS[0]["prompt"]]},
                "inference": {"max_new_tokens": 4},
                "checkpoint": {"load": {"type": "local", "path": "${train.result.final_lora_path}"}}}},
        ]},
    }
    run = Pipeline.from_dict(document).submit()
    train_id = run.stages[0]["task_id"]
    checkpoints = shared / train_id / "checkpoints"
    wait_for(lambda: (checkpoints / "checkpoint-10" / "trainer_state.json").is_file(), 180,
             message="stage 1's first checkpoint")
    first.kill()
    second = worker_factory("train", worker_id="stage1-heir", results_dir=shared, env=env, wait=False)
    results = run.wait(timeout=400)
    train, infer = results["train"], results["infer"]
    assert train["worker_id"] == "stage1-heir" and train["resumed_from_step"] >= 10
    assert train["steps"] == 120
    assert infer["worker_id"] == "stage1-heir" and infer["items"][0]["output"] is not None
    assert redis_client.get(f"meshq:task:{train_id}:runs") == "2"  # the killed run and the resumed one
    report = run.status()
    assert report["state"] == "SUCCESS"
    assert json.loads((shared / train_id / "responses.json").read_text())["resumed_from_step"] >= 10
    assert second.alive()
