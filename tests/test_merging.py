"""Task merging (tasks.merging) with real workers: small inference tasks waiting in a queue
run as one generation on the worker that takes one of them, each task staying itself."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cli.tiny_model import build_tiny_model
from tests.conftest import wait_for
from tests.test_delivery import count_started
from tests.test_flower import CeleryEvents

WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MESHQ_MERGE_WINDOW_MS": "50"}


def one_prompt(model_dir: Path, prompt: str, **inference: Any) -> dict[str, Any]:
    return {"taskType": "inference",
            "model": {"source": {"identifier": str(model_dir)}, "transformers": {"device_map": "cpu"}},
            "data": {"type": "list", "items": [prompt]},
            "inference": {"max_new_tokens": 6, **inference}}


def prompt_of(i: int) -> str:
    return f"Question {i}:" + " and more" * (i % 7)  # different lengths: padding in the batch


def alone(raw: dict[str, Any], tmp_path: Path) -> list[str]:
    """The outputs of the task run by itself, without Celery or merging."""
    from app.core.task_spec import parse_task_spec
    from tasks.executors.inference import InferenceExecutor
    from tasks.executors.progress import RecordingProgress

    result = InferenceExecutor().run(parse_task_spec(raw), tmp_path, RecordingProgress())
    return [item["output"] for item in result["items"]]


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model-seed1") / "model", size="test", seed=1)


def test_forty_small_tasks_run_merged_each_with_its_own_result(worker_factory, tiny_model_dir, tmp_path) -> None:
    """40 one-prompt tasks sent with plain apply_async before the worker starts: each ends
    SUCCESS with its own item (index 0, its own prompt, the output it gives alone), its own
    usage and responses.json; the results record the merge; Celery's events (Flower) show
    each task started once and succeeded on the worker."""
    import json

    from app.celery import app
    from tasks import inference

    celery_events = CeleryEvents(app)  # what Flower is built on
    try:
        specs = [one_prompt(tiny_model_dir, prompt_of(i)) for i in range(40)]
        handles = [inference.apply_async(args=[raw]) for raw in specs]
        worker = worker_factory(env=WORKER_ENV)
        results = [handle.get(timeout=300) for handle in handles]
        wait_for(lambda: all(celery_events.of(h.id, "task-succeeded") for h in handles), 30,
                 message="a task-succeeded event for every task")
    finally:
        celery_events.close()
    state = app.events.State()
    for event in list(celery_events.events):
        state.event(event)
    missing = [(h.id, [e["type"] for e in celery_events.events if e.get("uuid") == h.id]) for h in handles
               if not celery_events.of(h.id, "task-started")]
    assert not missing, missing
    for handle in handles:  # as Flower shows each task
        shown = state.tasks[handle.id]
        assert shown.state == "SUCCESS" and shown.name == "meshq.inference" and shown.started
        assert shown.worker is not None and shown.worker.hostname.startswith(f"meshq-{worker.worker_id}@")
        assert len(celery_events.of(handle.id, "task-started")) == 1
    for raw, handle, result in zip(specs, handles, results, strict=True):
        assert app.AsyncResult(handle.id).state == "SUCCESS"
        assert result["task_id"] == handle.id and result["worker_id"] == worker.worker_id
        [item] = result["items"]
        assert item["index"] == 0 and item["prompt"] == raw["data"]["items"][0]
        assert result["usage"]["num_requests"] == 1 and result["usage"]["completion_tokens"] >= 1
        assert json.loads((worker.results_dir / handle.id / "responses.json").read_text()) == result
    expected = [alone(one_prompt(tiny_model_dir, prompt_of(i)), tmp_path) for i in range(40)]
    assert [[item["output"] for item in r["items"]] for r in results] == expected
    merged = [r for r in results if r.get("merged_with", 1) > 1]
    assert len(merged) >= 30, [r.get("merged_with") for r in results]
    for result in merged:  # every task of a batch names the same batch and size
        batch = [r for r in results if r.get("merge_batch") == result["merge_batch"]]
        assert len(batch) == result["merged_with"]
        assert sum(r["usage"]["completion_tokens"] for r in batch) <= len(batch) * 6


def test_a_cancelled_task_inside_a_merge_ends_revoked_and_the_rest_succeed(
        worker_factory, redis_client, tiny_model_dir) -> None:
    """One task is cancelled while it waits (it is claimed by the merge and dropped at its
    start), one while the merged batch runs (its prompt, generated last, is left out): both
    end REVOKED; every other task of the batch succeeds."""
    from app.celery import app
    from tasks import inference
    from tasks.control import request_cancel

    slow = {"batch_size": 1, "max_new_tokens": 128, "ignore_eos": True}  # one prompt per micro-batch
    specs = [one_prompt(tiny_model_dir, prompt_of(i) + " long" * 8, **slow) for i in range(19)]
    specs.append(one_prompt(tiny_model_dir, "Hi", **slow))  # the shortest: generated last
    handles = [inference.apply_async(args=[raw]) for raw in specs]
    waiting, running = handles[10].id, handles[-1].id
    request_cancel(waiting)
    # Not waiting for the worker to be ready: it takes the batch at once, and the window in which
    # the last task is STARTED but not yet generated is the batch's generation time.
    worker_factory(env=WORKER_ENV, wait=False)
    wait_for(lambda: app.backend.get_task_meta(running)["status"] == "STARTED", 120, interval_s=0.02,
             message="the last task to start in the merged batch")
    request_cancel(running)
    for handle in handles:
        wait_for(lambda h=handle: app.backend.get_task_meta(h.id)["status"] in ("SUCCESS", "REVOKED", "FAILURE"),
                 300, message=f"task {handle.id} to end")
    states = {h.id: app.backend.get_task_meta(h.id)["status"] for h in handles}
    assert states[waiting] == "REVOKED" and states[running] == "REVOKED"
    others = [h for h in handles if h.id not in (waiting, running)]
    assert all(states[h.id] == "SUCCESS" for h in others), states
    sizes = {h.get(timeout=10)["merged_with"] for h in others}
    assert max(sizes) > 1


def test_different_models_or_max_new_tokens_never_merge(worker_factory, tiny_model_dir, other_model_dir) -> None:
    """Tasks of two models and two max_new_tokens, interleaved in one queue: tasks merge only
    with tasks of their own model and settings."""
    from tasks import inference

    kinds = [(tiny_model_dir, 4), (tiny_model_dir, 5), (other_model_dir, 4)]
    sent = [(kind, inference.apply_async(args=[one_prompt(kind[0], prompt_of(i), max_new_tokens=kind[1])]))
            for i in range(24) for kind in [kinds[i % 3]]]
    worker_factory(env=WORKER_ENV)
    results = [(kind, handle.get(timeout=300)) for kind, handle in sent]
    batches: dict[str, set[tuple[Path, int]]] = {}
    for kind, result in results:
        assert result["usage"]["completion_tokens"] <= kind[1]
        batches.setdefault(result.get("merge_batch") or result["task_id"], set()).add(kind)
    assert all(len(kinds_in_batch) == 1 for kinds_in_batch in batches.values()), batches
    assert any(result.get("merged_with", 1) > 1 for _kind, result in results)


@pytest.mark.timeout(900)  # the heir runs the batch's twelve slow tasks one by one (redeliveries never merge)
def test_a_worker_killed_mid_batch_loses_no_task_and_runs_none_twice(
        worker_factory, redis_client, tiny_model_dir) -> None:
    """The worker running a merged batch is SIGKILLed: kombu hands every claimed message
    back, and another worker finishes each task of the batch exactly once."""
    from app.celery import app
    from tasks import inference

    env = {**WORKER_ENV, "MESHQ_VISIBILITY_TIMEOUT_S": "4"}
    slow = {"batch_size": 1, "max_new_tokens": 200, "ignore_eos": True}
    handles = [inference.apply_async(args=[one_prompt(tiny_model_dir, prompt_of(i), **slow)]) for i in range(12)]
    stop, events = threading.Event(), []
    listener = count_started(redis_client, stop, events)
    time.sleep(0.3)
    try:
        victim = worker_factory(worker_id="merge-victim", env=env, wait=False)  # busy at once: never IDLE
        wait_for(lambda: all(app.backend.get_task_meta(h.id)["status"] in ("STARTED", "PROGRESS") for h in handles),
                 120, message="every task to have started in the victim's batch")
        assert redis_client.llen("tasks") == 0  # all of them were claimed by the one batch
        victim.kill()
        heir = worker_factory(worker_id="merge-heir", env=env, wait=False)
        results = [h.get(timeout=300) for h in handles]
        wait_for(lambda: len([e for e in events if e["type"] == "TASK_SUCCEEDED"]) >= len(handles), 30,
                 message="the succeeded events")
    finally:
        stop.set()
        listener.join()
    assert all(r["worker_id"] == heir.worker_id for r in results)
    succeeded = [e["task_id"] for e in events if e["type"] == "TASK_SUCCEEDED"]
    assert sorted(succeeded) == sorted(h.id for h in handles)  # each exactly once
    for i, result in enumerate(results):  # each its own prompt, generated in full
        [item] = result["items"]
        assert item["prompt"] == prompt_of(i) and result["usage"]["completion_tokens"] == 200
    wait_for(lambda: redis_client.hlen("unacked") == 0 and redis_client.llen("tasks") == 0, 30,
             message="every message acknowledged")


def test_a_followers_cancellation_or_failure_is_not_recorded_once_another_worker_took_it_over(
        redis_client, tmp_path, monkeypatch, tiny_model_dir) -> None:
    """A follower cancelled (or failed alone) while its merged batch ran, whose lease another
    worker took meanwhile (this one was paused past it): the other worker's run decides the
    task's outcome, so this worker stores no REVOKED or FAILURE and writes no outputs (as for a
    follower's result)."""
    from app.celery import app
    from app.core import keys
    from app.core.settings import reset_settings
    from app.core.task_spec import parse_task_spec
    from app.worker.lease import TaskLease
    from app.worker.merge_claims import ClaimedMessages
    from tasks.executors.inference import load_prompts
    from tasks.merging import Member, end_cancelled, fail_follower

    monkeypatch.setenv("RESULTS_DIR", str(tmp_path / "results"))
    reset_settings()
    try:
        task = app.tasks["meshq.inference"]
        task_id = "follower-taken-over"
        spec = parse_task_spec(one_prompt(tiny_model_dir, prompt_of(1)))
        lease = TaskLease(redis_client, task_id, "paused-worker", 30,
                          result_key=task.backend.get_key_for_task(task_id))
        runs = lease.try_acquire(count_run=True)
        assert runs == 1
        # This worker was paused past the lease: another one took the task over as run 2.
        redis_client.set(keys.task_lease(task_id), "other-worker", ex=30)
        redis_client.incr(keys.task_runs(task_id))
        prompts = load_prompts(spec, tmp_path)
        claims = ClaimedMessages(redis_client, "unused-queue")
        end_cancelled(task, Member(task_id, spec, prompts, lease=lease, runs=runs),
                      "cancelled while it ran in a merged batch", claims)
        fail_follower(task, Member(task_id, spec, prompts, lease=lease, runs=runs),
                      RuntimeError("its prompt failed alone"), claims)

        assert task.backend.get_task_meta(task_id)["status"] == "PENDING"  # nothing stored
        assert not (tmp_path / "results" / task_id).exists()
        assert redis_client.get(keys.task_lease(task_id)) == "other-worker"  # its lease untouched
    finally:
        reset_settings()
