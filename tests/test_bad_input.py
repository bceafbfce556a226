"""Bad input everywhere: each gets a clear error naming the field, path or URL, and the
worker then serves the next task normally (issue 7). Real worker, real server, real Redis."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import ROOT

TOKEN = "right-token"
GOOD_ECHO = {"taskType": "echo", "data": {"ok": True}}


def inference(model: str, **extra: Any) -> dict[str, Any]:
    return {"taskType": "inference", "model": {"source": {"identifier": model}},
            "data": {"type": "list", "items": ["hello"]}, "inference": {"max_new_tokens": 2}, **extra}


def zip_slip(path: Path) -> Path:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("final_lora/adapter_config.json", "{}")
        archive.writestr("../../escaped.txt", "gotcha")
    path.write_bytes(buffer.getvalue())
    return path


@pytest.fixture
def worker(worker_factory):
    return worker_factory(worker_id="hardened")


def run_bad_then_good(worker, spec: Any, *, task_id: str | None = None) -> str:
    """Send ``spec`` straight to the worker (no client-side check), return its error, then
    prove the same worker still completes a good task."""
    from celery.exceptions import TimeoutError as CeleryTimeout

    from tasks import echo
    from tasks.submit import task_for_type

    name = spec.get("taskType") if isinstance(spec, dict) else None
    task = task_for_type(name) if name in ("echo", "inference", "sft", "lora_sft") else echo
    bad = task.apply_async(args=[spec], task_id=task_id)
    try:
        bad.get(timeout=120)
    except CeleryTimeout:
        pytest.fail("the bad task neither failed nor succeeded")
    except Exception as exc:  # the error the user sees
        error = f"{type(exc).__name__}: {exc}"
    else:
        pytest.fail(f"bad input {spec!r} was accepted")
    assert bad.state == "FAILURE"
    good = echo.apply_async(args=[GOOD_ECHO]).get(timeout=60)
    assert good["worker_id"] == worker.worker_id and worker.alive()
    return error


def test_worker_side_bad_inputs(worker, tiny_model_dir: Path, tmp_path: Path) -> None:
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    cases: list[tuple[str, Any, str]] = [
        ("unknown taskType", {"taskType": "summarise"}, "spec.taskType"),
        ("not a mapping", ["taskType", "echo"], "spec"),
        ("wrong field type", inference(str(tiny_model_dir), inference={"max_new_tokens": "lots"}),
         "spec.inference.max_new_tokens"),
        ("unknown field", {**GOOD_ECHO, "priority": "high"}, "spec.priority"),
        ("missing model path", inference("/nonexistent/model"), "spec.model.source.identifier"),
        ("model dir without weights", inference(str(no_weights)), "spec.model.source.identifier"),
        ("empty prompt list", {**inference(str(tiny_model_dir)), "data": {"type": "list", "items": []}},
         "spec.data.items"),
        ("unsafe archive", inference(str(tiny_model_dir), checkpoint={"load": {
            "type": "local", "path": str(zip_slip(tmp_path / "evil.zip"))}}), "evil.zip"),
    ]
    for label, spec, named in cases:
        error = run_bad_then_good(worker, spec)
        assert named in error, f"{label}: error does not name {named!r}: {error}"
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path.parent / "escaped.txt").exists()
    error = run_bad_then_good(worker, GOOD_ECHO, task_id="../../etc/passwd")
    assert "task_id" in error
    assert not (worker.results_dir.parent / "etc").exists()


def test_wrong_token_on_delivery(worker_factory, server_factory) -> None:
    server = server_factory(token=TOKEN)
    worker = worker_factory(worker_id="wrong-token", env={
        "ORCHESTRATOR_BASE_URL": server.base_url, "ORCHESTRATOR_TOKEN": "not-the-token",
        "MESHQ_UPLOAD_RETRIES": "1", "MESHQ_UPLOAD_BACKOFF_S": "0.1"})
    spec = {**GOOD_ECHO, "output": {"destination": {"type": "http"}}}
    error = run_bad_then_good(worker, spec)
    assert "403" in error and server.base_url in error
    assert "not-the-token" not in error and "not-the-token" not in worker.log()


def test_server_side_bad_inputs(server_factory, tmp_path: Path) -> None:
    server = server_factory(token=TOKEN, env={"MESHQ_MAX_UPLOAD_BYTES": "1024"})
    auth = server.headers()
    tasks_url = f"{server.base_url}/api/v1/tasks"
    reply = requests.post(tasks_url, data="spec: [unclosed", headers={**auth, "Content-Type": "application/yaml"})
    assert reply.status_code in (400, 422) and "yaml" in reply.text.lower()
    reply = requests.post(tasks_url, data="{not json", headers={**auth, "Content-Type": "application/json"})
    assert reply.status_code in (400, 422) and "json" in reply.text.lower()
    reply = requests.post(tasks_url, json={"spec": {"taskType": "summarise"}}, headers=auth)
    assert reply.status_code == 422 and "spec.taskType" in reply.text
    reply = requests.post(tasks_url, json={"spec": {"taskType": "echo", "tags": "gpu"}}, headers=auth)
    assert reply.status_code == 422 and "spec.tags" in reply.text
    files_url = f"{server.base_url}/api/v1/results/t1/files"
    reply = requests.post(files_url, files={"file": ("big.bin", b"x" * 4096)}, headers=auth)
    assert reply.status_code == 413
    reply = requests.post(f"{server.base_url}/api/v1/results/..%2F..%2Fetc/files",
                          files={"file": ("a.bin", b"x")}, headers=auth)
    assert reply.status_code == 400
    reply = requests.post(files_url, files={"file": ("../../x.bin", b"x")}, headers=auth)
    assert reply.status_code == 400
    reply = requests.get(f"{server.base_url}/api/v1/workers", headers={"Authorization": "Bearer wrong"})
    assert reply.status_code == 403
    reply = requests.get(f"{server.base_url}/api/v1/workers")
    assert reply.status_code == 401
    leftovers = [p for p in server.results_dir.rglob("*") if p.is_file()] if server.results_dir.exists() else []
    assert leftovers == []
    assert TOKEN not in server.log()


def test_cli_rejects_malformed_files(tmp_path: Path, redis_url: str) -> None:
    env = {**os.environ, "REDIS_URL": redis_url}
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("spec:\n  taskType: echo\n   tags: [x\n")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"spec": {"taskType": "echo",}}')
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(json.dumps({"spec": {"taskType": "echo", "data": {}, "bogus": 1}}))
    for path, named in ((bad_yaml, "bad.yaml"), (bad_json, "bad.json"), (unknown, "spec.bogus")):
        proc = subprocess.run([sys.executable, "-m", "cli.main", "submit", str(path)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0
        assert named in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


NON_FINITE_TRAINING = """
spec:
  taskType: lora_sft
  model: {source: {identifier: /models/tiny}}
  data: {prompts: [hello]}
  training: {learning_rate: %s}
"""


def test_non_finite_numbers_are_refused_at_submission(server_factory) -> None:
    """inf and NaN in any numeric field, however written (YAML 1e400 and .inf, the string "inf",
    JSON Infinity/NaN), are a 422 naming the field; nothing is queued."""
    server = server_factory()
    tasks_url = f"{server.base_url}/api/v1/tasks"
    yaml_header = {"Content-Type": "application/yaml"}
    for written in ("1e400", "1.0e400", ".inf", '"inf"', "-.inf", ".nan"):
        reply = requests.post(tasks_url, data=NON_FINITE_TRAINING % written, headers=yaml_header, timeout=30)
        assert reply.status_code == 422, f"learning_rate: {written}: {reply.status_code} {reply.text}"
        assert reply.json()["field"] == "spec.training.learning_rate" and "finite" in reply.json()["detail"]
    json_header = {"Content-Type": "application/json"}
    model = {"source": {"identifier": "/models/tiny"}}
    for spec, field in (
            ('{"taskType": "echo", "echo": {"sleep_s": NaN}}', "spec.echo.sleep_s"),
            ('{"taskType": "echo", "sloSeconds": Infinity}', "spec.sloSeconds"),
            ('{"taskType": "echo", "resources": {"hardware": {"cpu": Infinity}}}', "spec.resources.hardware.cpu"),
            ('{"taskType": "inference", "model": ' + json.dumps(model)
             + ', "data": {"type": "list", "items": ["q"]}, "inference": {"top_p": NaN}}', "spec.inference.top_p")):
        reply = requests.post(tasks_url, data=f'{{"spec": {spec}}}', headers=json_header, timeout=30)
        assert reply.status_code == 422, f"{spec}: {reply.status_code} {reply.text}"
        assert reply.json()["field"] == field and "finite" in reply.json()["detail"], reply.text


def test_booleans_are_not_numbers(server_factory) -> None:
    """``max_shards: true`` is not 1 shard: a boolean in a numeric field is refused naming it."""
    server = server_factory()
    model = {"source": {"identifier": "/models/tiny"}}
    for spec, field in (
            ({"taskType": "inference", "model": model, "data": {"type": "list", "items": ["q"]},
              "parallel": {"enabled": True, "max_shards": True}}, "spec.parallel.max_shards"),
            ({"taskType": "echo", "echo": {"steps": False}}, "spec.echo.steps"),
            ({"taskType": "lora_sft", "model": model, "data": {"prompts": ["q"]}, "training": {"steps": True}},
             "spec.training.steps")):
        reply = requests.post(f"{server.base_url}/api/v1/tasks", json={"spec": spec}, timeout=30)
        assert reply.status_code == 422, f"{spec}: {reply.status_code} {reply.text}"
        assert reply.json()["field"] == field and "must be a number" in reply.json()["detail"], reply.text


def test_a_model_path_outside_the_data_roots_tells_nothing_about_it(worker) -> None:
    """Whether a path exists, is a file, or is a directory without a model, the worker's error is
    the same for every path outside RESULTS_DIR and MESHQ_DATA_DIRS (and for a hub id it lacks):
    a spec cannot probe the worker's files through model.source.identifier."""
    probes = ["/etc", "/etc/hostname", f"/no-such-dir-{os.getpid()}", "tests", "app/celery.py", "org/no-such-model"]
    errors = {}
    for identifier in probes:
        error = run_bad_then_good(worker, inference(identifier))
        assert "spec.model.source.identifier" in error, error
        errors[identifier] = error.replace(repr(identifier), "<identifier>")
    assert len(set(errors.values())) == 1, errors
