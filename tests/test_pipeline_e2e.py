"""Pipelines end to end: real Redis, ``meshq serve``, workers with separate ``RESULTS_DIR``s.

The main test trains a LoRA adapter on one worker and proves it reached the other
one over HTTP: the second worker's greedy output equals the trained answers, the
base model's does not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import requests

from app.core.errors import PipelineError
from pipelines import EXAMPLES_DIR, Pipeline
from tests.conftest import wait_for


def trained_pairs(pipeline: Pipeline) -> dict[str, str]:
    train = next(s for s in pipeline.stages if s.name == "train")
    return {p["prompt"]: p["response"] for p in train.spec["data"]["prompts"]}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_lora_adapter_trained_on_one_worker_is_used_on_another_over_http(
        server_factory, worker_factory, redis_client, tiny_model_dir: Path) -> None:
    server = server_factory()
    to_server = {"ORCHESTRATOR_BASE_URL": server.base_url}
    trainer = worker_factory("train", worker_id="trainer", env=to_server)
    inferer = worker_factory("infer", worker_id="inferer", env=to_server)
    assert trainer.results_dir != inferer.results_dir

    pipeline = Pipeline.from_yaml(EXAMPLES_DIR / "lora_then_infer.yaml", env={"MESHQ_MODEL": str(tiny_model_dir)})
    run = pipeline.submit()
    assert run.warnings == []
    results = run.wait(timeout=600)
    train, infer = results["train"], results["infer"]
    assert (train["worker_id"], infer["worker_id"]) == ("trainer", "inferer")

    # The adapter was uploaded to the orchestrator and fetched from there by URL.
    url = train["final_lora_archive_url"]
    assert url == f"{server.base_url}/api/v1/results/{train['task_id']}/files/final_lora.zip"
    assert (server.results_dir / train["task_id"] / "artifacts" / "final_lora.zip").is_file()
    assert (trainer.results_dir / train["task_id"] / "final_lora" / "adapter_config.json").is_file()
    assert not (inferer.results_dir / train["task_id"]).exists()
    fetched = [p for p in inferer.results_dir.rglob("adapter_config.json")]
    assert fetched, "the inference worker holds no copy of the adapter"

    # Its greedy output is the trained answers; the base model's is not.
    pairs = trained_pairs(pipeline)
    outputs = {item["prompt"]: item["output"] for item in infer["items"]}
    assert outputs == {prompt: pairs[prompt] for prompt in outputs} and len(outputs) == len(pairs)
    infer_spec = next(s for s in pipeline.stages if s.name == "infer").spec
    base_spec = {k: v for k, v in infer_spec.items() if k != "checkpoint"}
    base = Pipeline.from_dict(base_spec).submit().wait(timeout=120)
    base_outputs = {item["prompt"]: item["output"] for item in base["inference"]["items"]}
    assert all(base_outputs[prompt] != answer for prompt, answer in pairs.items()), base_outputs

    # The orchestrator reports the pipeline too.
    reply = requests.get(f"{server.base_url}/api/v1/tasks/{run.id}", timeout=10).json()
    assert reply["state"] == "SUCCESS"
    assert {n: s["worker_id"] for n, s in reply["stages"].items()} == {"train": "trainer", "infer": "inferer"}


def test_a_failing_first_stage_stops_the_chain(worker_factory, redis_client, tmp_path: Path) -> None:
    trainer = worker_factory("train", worker_id="trainer-f")
    inferer = worker_factory("infer", worker_id="inferer-f")
    missing = tmp_path / "no-such-model"
    run = Pipeline.from_yaml(EXAMPLES_DIR / "lora_then_infer.yaml", env={"MESHQ_MODEL": str(missing)}).submit()
    with pytest.raises(PipelineError) as info:
        run.wait(timeout=120)
    assert info.value.stage == "train"
    status = run.status()
    assert status["state"] == "FAILURE" and status["failed_stage"] == "train"
    assert str(missing) in status["error"] and status["error"] == status["stages"]["train"]["error"]
    assert status["stages"]["train"]["state"] == "FAILURE"
    assert status["stages"]["train"]["worker_id"] == "trainer-f"
    assert status["stages"]["infer"]["state"] == "SKIPPED"
    infer_id = status["stages"]["infer"]["task_id"]
    # Stage 2 never started: no task directory, and the inference worker never ran anything.
    assert not (inferer.results_dir / infer_id).exists()
    assert redis_client.hget("worker:inferer-f", "last_task") in (None, "")
    assert (trainer.results_dir / status["stages"]["train"]["task_id"]).exists()


def test_pipelines_over_http(server_factory, worker_factory, redis_client) -> None:
    server = server_factory()
    worker_factory(worker_id="http-w")
    base = f"{server.base_url}/api/v1/tasks"
    document = """
apiVersion: meshq/v1
kind: Pipeline
metadata: {name: over-http}
spec:
  taskType: echo
  stages:
    - name: first
      spec: {data: {n: 7}}
    - name: second
      spec: {data: {got: "${first.result.echo.data.n}"}}
"""
    reply = requests.post(base, data=document, headers={"Content-Type": "application/yaml"}, timeout=30)
    assert reply.status_code == 202, reply.text
    submitted = reply.json()
    assert submitted["kind"] == "pipeline" and list(submitted["stages"]) == ["first", "second"]
    assert submitted["task_ids"] == [s["task_id"] for s in submitted["stages"].values()]
    status: dict[str, Any] = wait_for(
        lambda: (s := requests.get(f"{base}/{submitted['id']}", timeout=10).json())["state"] == "SUCCESS" and s,
        60, message="the pipeline to succeed")
    assert status["stages"]["second"]["result"]["echo"]["data"] == {"got": 7}
    assert status["stages"]["first"]["worker_id"] == "http-w"
    # A stage is still a task of its own.
    first = requests.get(f"{base}/{submitted['task_ids'][0]}", timeout=10).json()
    assert first["state"] == "SUCCESS"

    # Invalid pipelines are refused naming the field; the server expands no environment.
    bad = {"spec": {"taskType": "echo", "stages": [{"name": "a", "spec": {"data": {"x": "${b.result.y}"}}}]}}
    reply = requests.post(base, json=bad, timeout=30)
    assert reply.status_code == 422 and reply.json()["field"] == "spec.stages[0].spec.data.x"
    env = {"spec": {"taskType": "echo", "data": {"x": "${env:HOME}"}}}
    reply = requests.post(base, json=env, timeout=30)
    assert reply.status_code == 422 and "expanded only by the client" in json.dumps(reply.json())

    # Cancel over HTTP: the running stage stops, the next never starts.
    slow = {"spec": {"taskType": "echo", "stages": [
        {"name": "long", "spec": {"echo": {"sleep_s": 60, "steps": 120}}},
        {"name": "after", "spec": {"data": {"x": 1}}}]}}
    pipeline_id = requests.post(base, json=slow, timeout=30).json()["id"]
    wait_for(lambda: requests.get(f"{base}/{pipeline_id}", timeout=10).json()["stages"]["long"]["state"]
             == "PROGRESS", 30, message="the long stage to run")
    cancel = requests.post(f"{base}/{pipeline_id}/cancel", timeout=10)
    assert cancel.status_code == 200 and cancel.json()["cancel_requested"] is True
    ended = wait_for(lambda: (s := requests.get(f"{base}/{pipeline_id}", timeout=10).json())["state"]
                     == "CANCELLED" and s, 30, message="the pipeline to be cancelled")
    assert [s["state"] for s in ended["stages"].values()] == ["REVOKED", "SKIPPED"]
    assert requests.post(f"{base}/{pipeline_id}/cancel", timeout=10).status_code == 409
