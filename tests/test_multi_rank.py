"""Training across every device of a worker: one task, N ranks (torchrun, gloo on CPU).

Real workers with ``MESHQ_CPU_RANKS=2`` run the same code path a GPU worker runs with
NCCL: the result says ``world_size: 2``; the weights and the loss history equal (within
float tolerance) a one-process run with the same global batch, seed and data order; a
SIGKILLed worker leaves no rank behind and the task resumes elsewhere from its
checkpoint; a cancel stops every rank; a rank that fails fails the task with its error.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_for

pytestmark = pytest.mark.slow

PAIRS = [{"prompt": f"Q: What is {a} plus {b}?\nA:", "response": f" {a + b}"} for a, b in
         [(1, 2), (3, 4), (10, 20), (7, 7), (12, 30), (5, 9), (100, 1), (8, 16)]]
TWO_RANKS = {"MESHQ_CPU_RANKS": "2"}


def train_spec(model_dir: Path, task_type: str, *, per_device: int, multi: bool, steps: int = 6,
               save_steps: int = 1000) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "taskType": task_type,
        "model": {"source": {"identifier": str(model_dir)}, "transformers": {"device_map": "cpu"}},
        "data": {"prompts": PAIRS, "separator": ""},
        "training": {"max_steps": steps, "per_device_train_batch_size": per_device, "learning_rate": 1e-3,
                     "lr_scheduler_type": "constant", "save_steps": save_steps, "seed": 0,
                     "allow_multi_gpu": multi},
    }
    if task_type == "lora_sft":
        spec["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    return spec


def submit(spec: dict[str, Any], task_id: str | None = None) -> Any:
    from app.celery import app
    from tasks.submit import submit_task

    return app.AsyncResult(submit_task(spec, task_id=task_id).task_id if task_id else submit_task(spec).task_id)


def weights(result: dict[str, Any]) -> dict[str, Any]:
    from safetensors.torch import load_file

    final = Path(result.get("final_lora_path") or result["final_model_path"])
    [file] = final.glob("*.safetensors")
    return load_file(str(file))


def rank_processes(task_id: str) -> list[int]:
    """Pids of every process of this task's ranks (launcher or rank), from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "tasks.executors.rank_main" in cmdline and task_id in cmdline:
            found.append(int(entry.name))
    return found


@pytest.mark.timeout(900)
@pytest.mark.parametrize("task_type", ["lora_sft", "sft"])
def test_two_cpu_ranks_train_what_one_process_trains_with_the_same_global_batch(
        task_type: str, worker_factory, redis_client, tiny_model_dir: Path) -> None:
    import torch

    worker_factory(env=TWO_RANKS)
    two = submit(train_spec(tiny_model_dir, task_type, per_device=2, multi=True)).get(timeout=600)
    one = submit(train_spec(tiny_model_dir, task_type, per_device=4, multi=False)).get(timeout=600)
    assert (two["world_size"], two["backend"], two["strategy"], two["global_batch"]) == (2, "gloo", "ddp", 4)
    assert (one["world_size"], one["strategy"], one["global_batch"]) == (1, "single-process", 4)
    assert two["steps"] == one["steps"] == 6
    # Same samples per step and the loss averaged over the same tokens: the same training.
    assert [step for step, _ in two["loss_history"]] == [step for step, _ in one["loss_history"]]
    for (_, a), (_, b) in zip(two["loss_history"], one["loss_history"], strict=True):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    ranked, alone = weights(two), weights(one)
    assert ranked.keys() == alone.keys()
    for name, tensor in alone.items():
        # float32 sums in another order (gloo's all-reduce, each rank's share of the loss): the
        # weights agree to a few 1e-6 after 6 Adam steps (3e-6 measured; the update norm is ~3).
        assert torch.allclose(ranked[name], tensor, rtol=1e-4, atol=1e-5), name
    assert not rank_processes(two["task_id"])


@pytest.mark.timeout(900)
def test_a_killed_worker_leaves_no_rank_and_the_task_resumes_on_another(worker_factory, redis_client,
                                                                        tiny_model_dir: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared-results"
    env = {**TWO_RANKS, "MESHQ_VISIBILITY_TIMEOUT_S": "5"}
    first = worker_factory(results_dir=shared, env=env)
    handle = submit(train_spec(tiny_model_dir, "lora_sft", per_device=1, multi=True, steps=200, save_steps=10))
    checkpoints = shared / handle.id / "checkpoints"
    wait_for(lambda: (checkpoints / "checkpoint-10" / "trainer_state.json").is_file(), 300,
             message="the first checkpoint")
    assert len(wait_for(lambda: rank_processes(handle.id), 30, message="the ranks")) >= 2
    first.kill()
    wait_for(lambda: not rank_processes(handle.id), 30, message="no rank of the killed worker left")
    second = worker_factory(results_dir=shared, env=env, wait=False)
    result = handle.get(timeout=600)
    assert result["worker_id"] == second.worker_id and result["world_size"] == 2
    assert result["resumed_from_step"] >= 10 and result["steps"] == 200
    assert not rank_processes(handle.id)


@pytest.mark.timeout(900)
def test_cancel_stops_every_rank_and_the_worker_goes_on(worker_factory, redis_client, tiny_model_dir: Path) -> None:
    from app.core.errors import TaskCancelled
    from tasks.control import cancel_task

    worker = worker_factory(env=TWO_RANKS)
    handle = submit(train_spec(tiny_model_dir, "lora_sft", per_device=1, multi=True, steps=100_000))
    wait_for(lambda: (m := handle.backend.get_task_meta(handle.id))["status"] == "PROGRESS"
             and (m["result"] or {}).get("step", 0) >= 2, 300, message="training progress on two ranks")
    cancel_task(handle.id)
    wait_for(lambda: handle.state == "REVOKED", 120, message="state REVOKED")
    with pytest.raises(TaskCancelled):
        handle.get(timeout=10)
    wait_for(lambda: not rank_processes(handle.id), 30, message="every rank stopped")
    recorded = json.loads((worker.results_dir / handle.id / "responses.json").read_text())
    assert recorded["cancelled"] is True and "at step" in recorded["message"]
    follow_up = submit(train_spec(tiny_model_dir, "lora_sft", per_device=1, multi=True, steps=2))
    assert follow_up.get(timeout=600)["world_size"] == 2


@pytest.mark.timeout(900)
def test_a_failing_rank_fails_the_task_with_its_error(worker_factory, redis_client, tiny_model_dir: Path,
                                                      tmp_path: Path) -> None:
    """A checkpoint whose RNG state for rank 1 is damaged: only rank 1 reads that file."""
    results = tmp_path / "results"
    worker = worker_factory(results_dir=results, env=TWO_RANKS)
    spec = train_spec(tiny_model_dir, "lora_sft", per_device=1, multi=True, steps=4, save_steps=2)
    first = submit(spec).get(timeout=600)
    checkpoint = results / first["task_id"] / "checkpoints" / "checkpoint-2"
    assert (checkpoint / "rng_state_1.pth").is_file()  # each rank keeps its own RNG state

    task_id = "resumes-from-a-damaged-checkpoint"
    damaged = results / task_id / "checkpoints" / "checkpoint-2"
    shutil.copytree(checkpoint, damaged)
    (damaged / "rng_state_1.pth").write_bytes(b"not a torch file")
    handle = submit(spec, task_id=task_id)
    with pytest.raises(Exception) as caught:
        handle.get(timeout=600)
    assert "rank 1 of 2" in str(caught.value)
    assert handle.state == "FAILURE"
    assert not rank_processes(task_id)
    assert worker.alive()


@pytest.mark.timeout(900)
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="DeepSpeed is not installed here (make test-deepspeed installs it and runs this)")
def test_deepspeed_zero2_on_two_cpu_ranks_trains_what_one_process_trains(worker_factory, redis_client,
                                                                          tiny_model_dir: Path) -> None:
    import torch

    worker = worker_factory(env=TWO_RANKS)
    # A worker with DeepSpeed says so (routing sends ZeRO-3 tasks only to such workers).
    assert "deepspeed" in json.loads(redis_client.hget(f"worker:{worker.worker_id}", "capabilities_json"))["features"]
    spec = train_spec(tiny_model_dir, "lora_sft", per_device=2, multi=True)
    spec["training"]["auto_deepspeed_stage"] = 2
    zero = submit(spec).get(timeout=600)
    one = submit(train_spec(tiny_model_dir, "lora_sft", per_device=4, multi=False)).get(timeout=600)
    assert (zero["world_size"], zero["strategy"], zero["global_batch"]) == (2, "deepspeed-zero2", 4)
    assert not any("DeepSpeed is not installed" in note for note in zero.get("notes", []))
    for (_, a), (_, b) in zip(zero["loss_history"], one["loss_history"], strict=True):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    sharded, alone = weights(zero), weights(one)
    for name, tensor in alone.items():
        assert torch.allclose(sharded[name], tensor, rtol=1e-4, atol=1e-5), name
