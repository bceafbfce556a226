"""The vLLM backend through a real Redis and real ``celery worker`` processes: a worker from
``.venv-vllm`` runs ``backend: vllm``; one from the default ``.venv`` (no vLLM) runs ``auto``
on transformers and says so."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here (make install-vllm; make test-vllm)")

from cli.tiny_model import build_tiny_model  # noqa: E402
from tests.vllm.helpers import PLAIN_PYTHON, inference_spec, mixed_prompts  # noqa: E402

PROMPTS = 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("vllm-model") / "model", size="vllm")


def run(raw: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    from app.celery import app
    from tasks.submit import submit_task

    return app.AsyncResult(submit_task(raw).task_id).get(timeout=timeout)


def test_vllm_greedy_outputs_equal_transformers_on_the_same_worker(worker_factory, redis_client, model_dir,
                                                                     capsys) -> None:
    worker = worker_factory()
    assert '"vllm"' in redis_client.hget(f"worker:{worker.worker_id}", "capabilities_json")
    prompts = mixed_prompts(PROMPTS)
    vllm = run(inference_spec(model_dir, prompts, "vllm"))
    # The warm engine serves the next task on the same model.
    again = run(inference_spec(model_dir, prompts[:4], "vllm"))
    assert again["model_cache"]["hit"] is True
    assert [i["output"] for i in again["items"]] == [i["output"] for i in vllm["items"][:4]]
    hf = run(inference_spec(model_dir, prompts, "transformers"))
    assert vllm["backend"] == "vllm" and hf["backend"] == "transformers"
    assert vllm["worker_id"] == hf["worker_id"] == worker.worker_id
    agree = sum(v["output"] == h["output"] for v, h in zip(vllm["items"], hf["items"], strict=True))
    with capsys.disabled():
        print(f"\nvLLM vs transformers, greedy, float32, CPU: {agree}/{PROMPTS} outputs equal token for token; "
              f"tokens/s vllm {vllm['tokens_per_s']} transformers {hf['tokens_per_s']}")
    assert agree >= 0.9 * PROMPTS
    assert [i["prompt"] for i in vllm["items"]] == prompts
    assert vllm["usage"]["prompt_tokens"] == hf["usage"]["prompt_tokens"]
    # The transformers model took the process's memory: the engine was released for it.
    assert run(inference_spec(model_dir, prompts[:4], "vllm"))["model_cache"]["hit"] is False


def test_auto_falls_back_to_transformers_with_a_note_on_a_worker_without_vllm(worker_factory, model_dir) -> None:
    assert PLAIN_PYTHON.exists(), f"{PLAIN_PYTHON}: build the default environment first (make install)"
    worker = worker_factory(python=str(PLAIN_PYTHON), env={"OMP_NUM_THREADS": "1"})
    result = run(inference_spec(model_dir, mixed_prompts(4), "auto"))
    assert result["worker_id"] == worker.worker_id and result["backend"] == "transformers"
    assert any(note.startswith("model.vllm: this worker has no vLLM engine") for note in result["notes"])


def test_a_vllm_task_waits_for_a_vllm_worker_and_the_plain_worker_never_takes_it(worker_factory, redis_client,
                                                                                  model_dir) -> None:
    from app.celery import app
    from tasks.submit import submit_task

    worker_factory(worker_id="plain", python=str(PLAIN_PYTHON), env={"OMP_NUM_THREADS": "1"})
    assert '"features": []' in redis_client.hget("worker:plain", "capabilities_json")
    waiting = submit_task(inference_spec(model_dir, mixed_prompts(3), "vllm", vllm_block=False))
    assert waiting.queue == "tasks.need.features=vllm" and "plain: features vllm" in waiting.warnings[0]
    echo = submit_task({"taskType": "echo"})
    assert app.AsyncResult(echo.task_id).get(timeout=60)["worker_id"] == "plain"
    assert app.AsyncResult(waiting.task_id).state == "PENDING" and redis_client.llen(waiting.queue) == 1

    engine_worker = worker_factory(worker_id="engine")
    result = app.AsyncResult(waiting.task_id).get(timeout=600)
    assert result["worker_id"] == engine_worker.worker_id and result["backend"] == "vllm"
    assert "notes" not in result


def test_progress_while_vllm_runs_and_cancel_between_chunks_keeps_the_engine_warm(worker_factory, model_dir) -> None:
    import time

    from app.celery import app
    from tasks.control import cancel_task
    from tasks.submit import submit_task
    from tests.conftest import wait_for

    worker_factory()
    warm = run(inference_spec(model_dir, mixed_prompts(2), max_new_tokens=2))
    assert warm["model_cache"]["hit"] is False
    # One prompt per chunk: many chunks, progress after each, a cancel seen between two.
    handle = app.AsyncResult(submit_task(inference_spec(model_dir, mixed_prompts(400, seed=5),
                                                        batch_size=1, max_new_tokens=24)).task_id)

    def running() -> dict[str, Any] | None:
        meta = app.backend.get_task_meta(handle.id)  # state and info in one read
        info = meta["result"]
        if meta["status"] == "PROGRESS" and isinstance(info, dict) and 0 < info.get("done", 0) < 400:
            return info
        return None

    info = wait_for(running, 300, interval_s=0.05, message="PROGRESS with some prompts done")
    assert info["total"] == 400 and info["tokens_per_s"] > 0 and info["batches"] == 400
    cancel_task(handle.id)
    wait_for(lambda: app.backend.get_task_meta(handle.id)["status"] == "REVOKED", 120, message="REVOKED")
    started = time.monotonic()
    after = run(inference_spec(model_dir, mixed_prompts(2), max_new_tokens=2))
    assert after["model_cache"]["hit"] is True and after["model_cache"]["loads"] == 1, time.monotonic() - started
