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


def test_training_longer_than_ten_visibility_timeouts_runs_once_and_blocks_nobody(
        worker_factory, redis_client, tiny_model_dir) -> None:
    """Visibility timeout 3 s; training of more than ten timeouts; two workers: the running
    task keeps its message invisible — one TASK_STARTED, runs = 1 — and echoes submitted
    meanwhile complete on the other worker while the training still runs."""
    from app.celery import app
    from cli.main import main
    from tasks import echo
    from tasks.submit import submit_task

    timeout_s = 3
    env = {"MESHQ_VISIBILITY_TIMEOUT_S": str(timeout_s)}
    worker_factory(worker_id="vt-train-a", env=env)
    worker_factory(worker_id="vt-train-b", env=env)
    stop, events = threading.Event(), []
    listener = count_started(redis_client, stop, events)
    time.sleep(0.3)
    try:
        started = time.monotonic()
        handle = app.AsyncResult(submit_task(lora_stage(tiny_model_dir, max_steps=100_000, save_steps=100_000))
                                 .task_id)
        wait_for(lambda: app.backend.get_task_meta(handle.id)["status"] == "PROGRESS", 120,
                 message="training to report progress")
        echoes = []
        while time.monotonic() - started < 11 * timeout_s:  # echoes all along the timeouts
            reply = echo.apply_async(args=[{"taskType": "echo", "data": {"i": len(echoes)}}]).get(timeout=30)
            assert app.backend.get_task_meta(handle.id)["status"] == "PROGRESS", "the echo waited for the training"
            echoes.append(reply["worker_id"])
            time.sleep(timeout_s)
        assert main(["cancel", handle.id]) == 0  # it has shown what it had to
        wait_for(lambda: app.backend.get_task_meta(handle.id)["status"] == "REVOKED", 60, message="REVOKED")
    finally:
        stop.set()
        listener.join()
    starts = [e for e in events if e["type"] == "TASK_STARTED" and e["task_id"] == handle.id]
    assert len(starts) == 1, f"the training was handed out again: {starts}"
    assert redis_client.get(f"meshq:task:{handle.id}:runs") == "1"
    assert len(echoes) >= 5 and set(echoes) == {"vt-train-a", "vt-train-b"} - {starts[0]["worker_id"]}


def test_sigkilled_workers_training_resumes_elsewhere_within_the_recovery_bound(
        worker_factory, redis_client, tiny_model_dir, tmp_path: Path) -> None:
    """The worker of a training task is SIGKILLed; an idle worker sharing RESULTS_DIR starts
    it again within ``recovery_bound_s`` (the default's 2 minutes, scaled down to 4 s
    timeouts and 1 s heartbeats) and resumes from its checkpoint."""
    from app.celery import app
    from app.worker.lease import recovery_bound_s
    from tasks.submit import submit_task

    shared = tmp_path / "shared-results"
    env = {"MESHQ_VISIBILITY_TIMEOUT_S": "4"}
    victim = worker_factory("train", worker_id="kill-victim", results_dir=shared, env=env)
    handle = app.AsyncResult(submit_task(lora_stage(tiny_model_dir, max_steps=150, save_steps=10)).task_id)
    checkpoints = shared / handle.id / "checkpoints"
    wait_for(lambda: (checkpoints / "checkpoint-10" / "trainer_state.json").is_file(), 180,
             message="the first checkpoint")
    heir = worker_factory("train", worker_id="kill-heir", results_dir=shared, env=env)
    stop, events = threading.Event(), []
    listener = count_started(redis_client, stop, events)
    try:
        time.sleep(0.3)
        victim.kill()
        killed_at = time.monotonic()
        bound_s = recovery_bound_s(4, 1.0)
        wait_for(lambda: any(e["type"] == "TASK_STARTED" and e["worker_id"] == "kill-heir" for e in events),
                 bound_s + 5, interval_s=0.2, message=f"the heir to start the task within {bound_s}s")
        restarted_after_s = time.monotonic() - killed_at
        result = handle.get(timeout=300)
    finally:
        stop.set()
        listener.join()
    assert result["worker_id"] == "kill-heir" and result["resumed_from_step"] >= 10 and result["steps"] == 150
    assert redis_client.get(f"meshq:task:{handle.id}:runs") == "2"
    assert restarted_after_s >= 4 - 1, "started again before the visibility timeout: the victim's run was alive"
    assert heir.alive()


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
