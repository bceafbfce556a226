"""The inference task through a real Redis and a real ``celery worker`` subprocess."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from app.core.errors import SpecError
from cli.tiny_model import build_tiny_model

# One torch thread in the worker: the CPUs are shared with the test process.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
PROMPTS = ["Hello there", "The quick brown fox jumps over the lazy dog. " * 6, "Question:", "a b c"]


def spec(model_dir: Path | str, prompts: list[str] | None = None, **inference: Any) -> dict[str, Any]:
    return {"taskType": "inference",
            "model": {"source": {"identifier": str(model_dir)}, "transformers": {"device_map": "cpu"}},
            "data": {"type": "list", "items": prompts or PROMPTS},
            "inference": {"max_new_tokens": 6, **inference}}


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model-seed1") / "model", size="test", seed=1)


def test_bad_specs_fail_naming_the_field_and_worker_goes_on(worker_factory, tiny_model_dir, tmp_path) -> None:
    from app.celery import app
    from tasks import inference

    worker = worker_factory(env=WORKER_ENV)
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(tiny_model_dir / "config.json", no_weights)
    bad_specs = [
        ({**spec(tiny_model_dir), "inference": {"max_new_tokens": 4, "beams": 2}}, "spec.inference.beams",
         "unknown field"),
        (spec(tiny_model_dir, max_new_tokens="lots"), "spec.inference.max_new_tokens", "valid integer"),
        (spec(tmp_path / "missing-model"), "spec.model.source.identifier", "does not exist"),
        (spec(no_weights), "spec.model.source.identifier", "has no weights"),
        ({**spec(tiny_model_dir), "data": {"type": "list", "items": []}}, "spec.data.items",
         "at least one prompt"),
    ]
    # apply_async, not submit_task: the worker must check the spec itself.
    results = [(inference.apply_async(args=[raw]), field, message) for raw, field, message in bad_specs]
    for result, field, message in results:
        with pytest.raises(SpecError) as err:
            result.get(timeout=120)
        assert err.value.field == field and message in str(err.value)
        assert app.AsyncResult(result.id).state == "FAILURE"

    good = inference.apply_async(args=[spec(tiny_model_dir)]).get(timeout=120)
    assert good["worker_id"] == worker.worker_id and worker.alive()
    assert [item["prompt"] for item in good["items"]] == PROMPTS
    task_dir = worker.results_dir / good["task_id"]
    assert json.loads((task_dir / "responses.json").read_text()) == good
    manifest = json.loads((task_dir / "manifest.json").read_text())
    assert [f["path"] for f in manifest["files"]] == ["responses.json"]


def test_worker_keeps_model_warm_and_switches_models(worker_factory, tiny_model_dir, other_model_dir) -> None:
    from app.celery import app
    from tasks.submit import submit_task

    worker_factory(env=WORKER_ENV)

    def run(raw: dict[str, Any]) -> dict[str, Any]:
        return app.AsyncResult(submit_task(raw).task_id).get(timeout=120)

    first = run(spec(tiny_model_dir))
    second = run(spec(tiny_model_dir))
    other = run(spec(other_model_dir))
    assert first["model_cache"]["hit"] is False and first["model_cache"]["loads"] == 1
    assert second["model_cache"] == {"hit": True, "load_sec": 0.0, "loads": 1, "hits": 1}
    assert second["items"] == first["items"] and second["worker_id"] == first["worker_id"]
    assert other["model_cache"]["hit"] is False and other["model_cache"]["loads"] == 2
    assert other["model"]["path"] == str(other_model_dir.resolve())
    assert [i["output"] for i in other["items"]] != [i["output"] for i in first["items"]]


def test_progress_visible_from_client(worker_factory, redis_client, tiny_model_dir) -> None:
    from app.celery import app
    from tasks.submit import submit_task

    worker_factory(env=WORKER_ENV)
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("tasks.events")
    # 60 one-prompt batches: several seconds of work, progress is sent about once a second.
    prompts = [f"prompt number {i} " * (i % 5 + 1) for i in range(60)]
    result = app.AsyncResult(submit_task(spec(tiny_model_dir, prompts, batch_size=1,
                                              max_new_tokens=24)).task_id)
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        # State and info from one meta fetch: two reads could see PROGRESS, then the result.
        meta = app.backend.get_task_meta(result.id)
        if meta["status"] in ("SUCCESS", "FAILURE"):
            break
        if meta["status"] == "PROGRESS" and isinstance(meta["result"], dict):
            seen.append(meta["result"])
        time.sleep(0.05)
    final = result.get(timeout=10)
    assert len(final["items"]) == 60 and final["batches"] == 60
    assert seen, "no PROGRESS state observed while the task ran"
    assert all(info["total"] == 60 and info["taskType"] == "inference" for info in seen)
    assert any(0 < info["done"] < 60 and info["tokens_per_s"] > 0 for info in seen)
    done = [info["done"] for info in seen]
    assert done == sorted(done)

    # The same reports went out as TASK_PROGRESS on tasks.events (Flower gets task-progress).
    events = []
    quiet_until = time.monotonic() + 1.5  # read until nothing came for 1.5 s
    while time.monotonic() < quiet_until:
        message = pubsub.get_message(timeout=0.2)  # None also for the subscribe confirmation
        if message is not None:
            events.append(json.loads(message["data"]))
            quiet_until = time.monotonic() + 1.5
    pubsub.close()
    progress = [e for e in events if e["type"] == "TASK_PROGRESS" and e.get("task_id") == result.id]
    assert progress and progress[-1]["payload"]["done"] == 60 and progress[-1]["payload"]["total"] == 60
