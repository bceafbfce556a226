"""Training tasks through real workers, a real orchestrator server and real Redis:
upload (and its retries), resume after SIGKILL, cancel."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import wait_for

pytestmark = pytest.mark.slow

TOKEN = "t0ken-for-tests"
PAIRS = [{"prompt": "Q: What is the capital of France?\nA:", "response": " Paris"},
         {"prompt": "Q: What colour is the sky?\nA:", "response": " Blue"}]


def lora_spec(model_dir: Path, *, max_steps: int = 4, save_steps: int = 1000, http: bool = False,
              batch_size: int = 2) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "taskType": "lora_sft",
        "model": {"source": {"identifier": str(model_dir)}, "transformers": {"device_map": "cpu"}},
        "data": {"prompts": PAIRS, "separator": ""},
        "training": {"max_steps": max_steps, "batch_size": batch_size, "learning_rate": 5e-3,
                     "save_steps": save_steps, "save_total_limit": 3},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
    }
    if http:
        spec["output"] = {"destination": {"type": "http"}}
    return spec


def orchestrator_env(server: Any, retries: int, backoff_s: float) -> dict[str, str]:
    return {"ORCHESTRATOR_BASE_URL": server.base_url, "ORCHESTRATOR_TOKEN": TOKEN,
            "MESHQ_UPLOAD_RETRIES": str(retries), "MESHQ_UPLOAD_BACKOFF_S": str(backoff_s)}


def submit(spec: dict[str, Any]) -> Any:
    from app.celery import app
    from tasks.submit import submit_task

    return app.AsyncResult(submit_task(spec).task_id)


def test_lora_task_uploads_its_archive_and_result(worker_factory, server_factory, tiny_model_dir) -> None:
    server = server_factory(token=TOKEN)
    worker = worker_factory(env=orchestrator_env(server, retries=2, backoff_s=0.2))
    handle = submit(lora_spec(tiny_model_dir, http=True))
    result = handle.get(timeout=180)

    url = result["final_lora_archive_url"]
    assert url == f"{server.base_url}/api/v1/results/{handle.id}/files/final_lora.zip"
    body = requests.get(url, headers=server.headers(), timeout=30).content
    assert hashlib.sha256(body).hexdigest() == result["final_lora_archive_sha256"]
    assert len(body) == result["final_lora_archive_bytes"]
    task_dir = worker.results_dir / handle.id
    assert json.loads((task_dir / "responses.json").read_text()) == result
    assert (task_dir / "final_lora.zip").is_file() and (task_dir / "final_lora" / "adapter_config.json").is_file()
    envelope = requests.get(f"{server.base_url}/api/v1/results/{handle.id}", headers=server.headers(),
                            timeout=10).json()
    assert envelope["result"]["final_lora_archive_url"] == url and envelope["worker_id"] == worker.worker_id

    # Every task type with an http destination posts its result envelope (echo here).
    echo = submit({"taskType": "echo", "data": {"x": 1}, "output": {"destination": {"type": "http"}}})
    echo_result = echo.get(timeout=30)
    stored = requests.get(f"{server.base_url}/api/v1/results/{echo.id}", headers=server.headers(), timeout=10)
    assert stored.json()["result"] == echo_result


def test_upload_waits_for_a_restarted_server(worker_factory, server_factory, tiny_model_dir) -> None:
    server = server_factory(token=TOKEN)
    # Backoff 0.5, 1, 2, 4, 8, 16 s: a window of ~31 s for the server to come back.
    worker = worker_factory(env=orchestrator_env(server, retries=6, backoff_s=0.5))
    server.stop()
    handle = submit(lora_spec(tiny_model_dir, http=True))
    wait_for(lambda: "retry 1/6" in worker.log(), 120, message="the worker to retry the upload")
    server.start()
    result = handle.get(timeout=120)
    assert "upload of final_lora.zip to" in worker.log()
    body = requests.get(result["final_lora_archive_url"], headers=server.headers(), timeout=30).content
    assert hashlib.sha256(body).hexdigest() == result["final_lora_archive_sha256"]


def test_upload_outlasts_a_server_restart_with_the_default_retries(worker_factory, server_factory,
                                                                   tiny_model_dir) -> None:
    """Issue 23 item 9: the default number of retries (MESHQ_UPLOAD_RETRIES unset) outlasts
    a server restart — here with the backoff scaled down to 0.1 s, the server comes back only
    after a sixth retry, past what five retries (the old default) would have waited."""
    server = server_factory(token=TOKEN)
    env = orchestrator_env(server, retries=0, backoff_s=0.1)
    del env["MESHQ_UPLOAD_RETRIES"]  # the default
    worker = worker_factory(env=env)
    server.stop()
    handle = submit(lora_spec(tiny_model_dir, http=True))
    wait_for(lambda: "retry 6/10" in worker.log(), 180, message="the worker to retry the upload a sixth time")
    server.start()
    result = handle.get(timeout=120)
    body = requests.get(result["final_lora_archive_url"], headers=server.headers(), timeout=30).content
    assert hashlib.sha256(body).hexdigest() == result["final_lora_archive_sha256"]


def test_upload_to_a_server_that_stays_down_fails_clearly_and_meshq_deliver_retries_it(
        worker_factory, server_factory, redis_client, tiny_model_dir) -> None:
    """The upload fails for good: the task fails naming the URL, the attempts and how to
    deliver without training again (``meshq deliver <task_id>`` on the worker's host). Once
    the server is back, that command uploads the archive and posts the result as the run
    that trained it; the task is not run again."""
    import subprocess
    import sys

    from app.core.errors import ArtifactError
    from tests.conftest import ROOT

    server = server_factory(token=TOKEN)
    worker = worker_factory(env=orchestrator_env(server, retries=2, backoff_s=0.2))
    server.stop()
    handle = submit(lora_spec(tiny_model_dir, http=True))
    with pytest.raises(ArtifactError) as err:
        handle.get(timeout=180)
    message = str(err.value)
    assert f"{server.base_url}/api/v1/results/{handle.id}/files" in message
    assert "failed after 3 attempt(s)" in message and "ConnectionError" in message
    assert f"run `meshq deliver {handle.id}`" in message and str(worker.results_dir / handle.id) in message
    assert handle.state == "FAILURE"
    task_dir = worker.results_dir / handle.id
    assert (task_dir / "final_lora.zip").is_file()  # the local archive stays
    trained = json.loads((task_dir / "responses.json").read_text())
    assert "final_lora_archive_url" not in trained
    assert TOKEN not in worker.log()

    server.start()
    done = subprocess.run([sys.executable, "-m", "cli.main", "deliver", handle.id], cwd=ROOT,
                          env=worker.env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert TOKEN not in done.stdout + done.stderr
    url = f"{server.base_url}/api/v1/results/{handle.id}/files/final_lora.zip"
    assert url in done.stdout
    body = requests.get(url, headers=server.headers(), timeout=30).content
    assert hashlib.sha256(body).hexdigest() == trained["final_lora_archive_sha256"]
    envelope = requests.get(f"{server.base_url}/api/v1/results/{handle.id}", headers=server.headers(),
                            timeout=10).json()
    assert envelope["run"] == 1 and envelope["result"]["final_lora_archive_url"] == url
    assert envelope["result"]["loss_last"] == trained["loss_last"]
    assert json.loads((task_dir / "responses.json").read_text()) == {**trained, "final_lora_archive_url": url}
    assert redis_client.get(f"meshq:task:{handle.id}:runs") == "1"  # delivered, not trained again
    again = subprocess.run([sys.executable, "-m", "cli.main", "deliver", handle.id], cwd=ROOT,
                           env=worker.env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "no failed delivery recorded" in again.stderr


def test_training_resumes_on_another_worker_after_sigkill(worker_factory, redis_client, tiny_model_dir,
                                                         tmp_path) -> None:
    shared = tmp_path / "shared-results"
    env = {"MESHQ_VISIBILITY_TIMEOUT_S": "5"}
    first = worker_factory(results_dir=shared, env=env)
    handle = submit(lora_spec(tiny_model_dir, max_steps=150, save_steps=10, batch_size=1))
    checkpoints = shared / handle.id / "checkpoints"
    wait_for(lambda: (checkpoints / "checkpoint-10" / "trainer_state.json").is_file(), 120,
             message="the first checkpoint")
    first.kill()
    # Not ``wait``: the new worker may pick the task up before anyone sees it IDLE.
    second = worker_factory(results_dir=shared, env=env, wait=False)
    result = handle.get(timeout=240)
    assert result["resumed_from_step"] >= 10 and result["steps"] == 150
    assert result["worker_id"] == second.worker_id
    assert Path(result["final_lora_path"]).is_dir()


def test_cancel_stops_training_and_the_worker_goes_on(worker_factory, redis_client, tiny_model_dir) -> None:
    from app.core.errors import TaskCancelled
    from cli.main import main

    worker = worker_factory()
    handle = submit(lora_spec(tiny_model_dir, max_steps=100_000, batch_size=1))
    # State and info from one meta fetch (two reads may straddle a state change).
    progress = wait_for(lambda: (m := handle.backend.get_task_meta(handle.id))["status"] == "PROGRESS"
                        and (m["result"] or {}).get("step", 0) >= 2 and m["result"], 120,
                        message="training progress")
    step_at_cancel = progress["step"]
    assert main(["cancel", handle.id]) == 0
    wait_for(lambda: handle.state == "REVOKED", 60, message="state REVOKED")
    with pytest.raises(TaskCancelled):
        handle.get(timeout=10)
    recorded = json.loads((worker.results_dir / handle.id / "responses.json").read_text())
    assert recorded["cancelled"] is True
    stopped_at = int(recorded["message"].rsplit("at step ", 1)[1])
    assert step_at_cancel <= stopped_at < 100_000
    assert not (worker.results_dir / handle.id / "final_lora").exists()

    from tasks.control import cancel_task

    follow_up = submit(lora_spec(tiny_model_dir, max_steps=2))
    assert follow_up.get(timeout=120)["steps"] == 2
    cancel_task(follow_up.id)  # cancelling a finished task changes nothing
    assert follow_up.state == "SUCCESS"
