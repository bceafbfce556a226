"""Pipelines as Celery chains, with real Redis and real ``celery worker`` processes (echo stages)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from app.core.errors import PipelineError
from pipelines import Pipeline, PipelineRun
from tests.conftest import ROOT, wait_for


class TaskEvents:
    """Collects ``tasks.events`` in a background thread."""

    def __init__(self, client: redis.Redis) -> None:
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe("tasks.events")
        self.events: list[dict[str, Any]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            message = self.pubsub.get_message(timeout=0.2)
            if message:
                self.events.append(json.loads(message["data"]))

    def for_task(self, task_id: str) -> list[str]:
        return [e["type"] for e in list(self.events) if e["task_id"] == task_id]

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.pubsub.close()


def echo_stages(*stages: dict[str, Any], name: str = "echoes") -> dict[str, Any]:
    return {"apiVersion": "meshq/v1", "kind": "Pipeline", "metadata": {"name": name},
            "spec": {"taskType": "echo", "stages": list(stages)}}


def cli(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, env={**os.environ},
                          capture_output=True, text=True, timeout=timeout_s)


def test_references_routing_and_run_on(worker_factory, redis_client) -> None:
    """Each stage on its tags' worker; results flow by reference; runOn beats tags."""
    worker_a = worker_factory("a", worker_id="pa")
    worker_b = worker_factory("b", worker_id="pb")
    document = echo_stages(
        {"name": "one", "tags": ["a"],
         "spec": {"data": {"items": [{"output": "x"}, {"output": "y"}], "n": 3}, "echo": {"message": "m1"}}},
        {"name": "two", "tags": ["b"],
         "spec": {"data": {"prev": "${stage.result.echo.data.items.1.output}", "ran_on": "${one.result.worker_id}",
                           "n": "${one.result.echo.data.n}", "text": "n=${one.result.echo.data.n}"}}},
        # runOn wins over tags: stage one's worker has no tag "b" but runs this stage.
        {"name": "three", "tags": ["b"], "runOn": {"stage": "one"},
         "spec": {"data": {"first": "${one.result.echo}", "second": "got ${two.result.echo.data.prev}"}}})
    for _ in range(2):  # twice: the runOn stage must not land on pb by luck
        run = Pipeline.from_dict(document).submit()
        assert run.warnings == []
        results = run.wait(timeout=60)
        assert list(results) == ["one", "two", "three"]
        assert [results[s]["worker_id"] for s in results] == ["pa", "pb", "pa"]
        assert results["two"]["echo"]["data"] == {"prev": "y", "ran_on": "pa", "n": 3, "text": "n=3"}
        assert results["three"]["echo"]["data"] == {"first": {"message": "m1", "data": {
            "items": [{"output": "x"}, {"output": "y"}], "n": 3}}, "second": "got y"}
    # Every stage wrote its own task directory under its worker's RESULTS_DIR.
    stage_ids = {s["name"]: s["task_id"] for s in run.stages}
    assert (worker_a.results_dir / stage_ids["three"] / "responses.json").exists()
    assert (worker_b.results_dir / stage_ids["two"] / "responses.json").exists()
    assert not (worker_b.results_dir / stage_ids["three"]).exists()
    status = run.status()
    assert status["state"] == "SUCCESS"
    assert {n: (s["state"], s["worker_id"], s["task_id"]) for n, s in status["stages"].items()} == {
        n: ("SUCCESS", w, stage_ids[n]) for n, w in (("one", "pa"), ("two", "pb"), ("three", "pa"))}

    # A runOn stage delivered to the wrong worker forwards itself, keeping its task id.
    from app.celery import app
    from tasks import echo

    stray_id = "stray-" + stage_ids["three"]
    three = pipeline_stage_signature(run, "three")
    stray = echo.apply_async(args=[results["two"], three.args[0]], kwargs=three.kwargs,
                             task_id=stray_id, queue="tasks.b")
    assert stray.get(timeout=60)["worker_id"] == "pa"
    assert app.AsyncResult(stray_id).state == "SUCCESS"
    assert "forwarding it to pa" in (worker_b.log_path.parent / "worker.log").read_text()


def pipeline_stage_signature(run: PipelineRun, name: str) -> Any:
    """The signature a stage of ``run`` was sent as (rebuilt from its recorded document)."""
    pipeline = Pipeline.from_dict(run.document)
    task_ids = [s["task_id"] for s in run.stages]
    return next(sig for sig in pipeline.chain(run.id, task_ids).tasks
                if sig.kwargs["pipeline"]["stage"] == name)


def test_a_result_over_the_limit_is_kept_as_a_file_and_referenced(worker_factory, redis_client) -> None:
    """A result past MAX_RESULT_BYTES (16 KiB here) stays in its responses.json; the result backend
    holds its small fields and where the file is. A later stage may reference the small fields; a
    reference to what was left out fails naming the limit and the file."""
    limit = 16 * 1024
    worker = worker_factory(worker_id="big", env={"MESHQ_MAX_RESULT_BYTES": str(limit)})
    blob = "y" * (48 * 1024)
    run = Pipeline.from_dict(echo_stages(
        {"name": "big", "spec": {"data": {"blob": blob}}},
        {"name": "small", "spec": {"data": {"ran_on": "${big.result.worker_id}"}}},
        {"name": "whole", "spec": {"data": {"blob": "${big.result.echo.data.blob}"}}})).submit()
    with pytest.raises(PipelineError) as info:
        run.wait(timeout=120)
    assert info.value.stage == "whole"
    status = run.status()
    big = json.loads(redis_client.get(f"celery-task-meta-{status['stages']['big']['task_id']}"))
    assert big["status"] == "SUCCESS" and len(json.dumps(big["result"])) < limit
    kept = big["result"]["result_file"]
    assert kept["path"] == str(worker.results_dir / big["task_id"] / "responses.json")
    assert big["result"]["worker_id"] == "big" and "echo" not in big["result"] and kept["omitted"] == ["echo"]
    whole = json.loads(Path(kept["path"]).read_text())
    assert whole["echo"]["data"]["blob"] == blob and kept["json_bytes"] > limit
    assert status["stages"]["small"]["result"]["echo"]["data"] == {"ran_on": "big"}
    error = status["stages"]["whole"]["error"]
    assert f"MAX_RESULT_BYTES={limit}" in error and kept["path"] in error, error


def test_failed_stage_stops_the_chain(worker_factory, redis_client) -> None:
    worker = worker_factory()
    events = TaskEvents(redis_client)
    try:
        run = Pipeline.from_dict(echo_stages(
            {"name": "one", "spec": {"data": {"x": 1}}},
            {"name": "two", "spec": {"data": {"y": "${one.result.echo.data.nope}"}}},
            {"name": "three", "spec": {"data": {"z": "${two.result.echo}"}}})).submit()
        with pytest.raises(PipelineError) as info:
            run.wait(timeout=60)
        assert info.value.stage == "two"
        assert "stage 'two' failed: SpecError: spec.stages[1].spec.data.y: ${one.result.echo.data.nope}: " \
               "one.result.echo.data has no field 'nope' (fields: x)" in str(info.value)
        status = run.status()
        assert status["state"] == "FAILURE" and status["failed_stage"] == "two"
        assert [s["state"] for s in status["stages"].values()] == ["SUCCESS", "FAILURE", "SKIPPED"]
        third = status["stages"]["three"]["task_id"]
        time.sleep(1)
        assert events.for_task(third) == []  # never started
        assert not (worker.results_dir / third).exists()
        from app.celery import app

        # Celery stores the chain's failure under the ids of the tasks that did not run;
        # no worker ever held this one.
        assert app.backend.get_task_meta(third).get("worker") is None
    finally:
        events.close()


def test_status_from_another_process(worker_factory, redis_client) -> None:
    worker_factory(worker_id="px")
    run = Pipeline.from_dict(echo_stages(
        {"name": "slow", "spec": {"echo": {"sleep_s": 3, "steps": 6}}},
        {"name": "after", "spec": {"data": {"took": "${slow.result.runtime_sec}"}}})).submit()
    wait_for(lambda: run.status()["stages"]["slow"]["state"] == "PROGRESS", 30, message="stage slow running")
    code = ("import json, sys; from pipelines import PipelineRun; "
            "print(json.dumps(PipelineRun.get(sys.argv[1]).status()))")

    def other_process() -> dict[str, Any]:
        out = subprocess.run([sys.executable, "-c", code, run.id], cwd=ROOT, env={**os.environ},
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return dict(json.loads(out.stdout))

    seen = other_process()
    assert seen["id"] == run.id and seen["state"] == "RUNNING"
    assert seen["stages"]["slow"]["state"] in ("PROGRESS", "SUCCESS")
    assert seen["stages"]["slow"]["worker_id"] == "px"
    assert seen["stages"]["after"]["state"] in ("PENDING", "STARTED", "SUCCESS")
    assert [s["task_id"] for s in seen["stages"].values()] == [s["task_id"] for s in run.stages]
    run.wait(timeout=60)
    final = other_process()
    mine = run.status()
    assert final == json.loads(json.dumps(mine))
    assert final["state"] == "SUCCESS"
    # A stage's task id leads to its pipeline too.
    assert PipelineRun.find(run.stages[1]["task_id"]).id == run.id
    with pytest.raises(PipelineError, match="no such pipeline"):
        PipelineRun.get("does-not-exist")


def test_cancel_stops_the_running_stage_and_later_stages_never_start(worker_factory, redis_client) -> None:
    worker = worker_factory(worker_id="pc")
    events = TaskEvents(redis_client)
    try:
        run = Pipeline.from_dict(echo_stages(
            {"name": "long", "spec": {"echo": {"sleep_s": 60, "steps": 120}}},
            {"name": "next", "spec": {"data": {"x": 1}}},
            {"name": "last", "spec": {"data": {"y": 2}}})).submit()
        wait_for(lambda: run.status()["stages"]["long"]["state"] == "PROGRESS", 30, message="stage long running")
        started = time.monotonic()
        run.cancel()
        report = run.follow(timeout=30)
        assert time.monotonic() - started < 10  # cooperative: at the next step, not after 60 s
        assert report["state"] == "CANCELLED"
        assert [s["state"] for s in report["stages"].values()] == ["REVOKED", "SKIPPED", "SKIPPED"]
        assert "cancelled" in report["stages"]["long"]["error"]
        with pytest.raises(PipelineError, match="cancelled"):
            run.wait(timeout=5)
        time.sleep(2)
        for stage in run.stages[1:]:
            assert events.for_task(stage["task_id"]) == []
            assert not (worker.results_dir / stage["task_id"]).exists()
        assert json.loads((worker.results_dir / run.stages[0]["task_id"] / "responses.json").read_text())["cancelled"]
        # The worker is free again and runs new work.
        assert Pipeline.from_dict({"taskType": "echo", "data": {"ok": 1}}).submit().wait(timeout=30)
    finally:
        events.close()


def test_plain_celery_canvas(worker_factory, redis_client) -> None:
    from celery import chain

    from tasks import echo

    worker_factory()
    first = {"taskType": "echo", "data": {"url": "http://example/a.zip"}, "echo": {"message": "hello"}}
    second = {"taskType": "echo", "data": {"got": "${stage.result.echo.data.url}",
                                           "msg": "said ${stage.result.echo.message}"}}
    result = chain(echo.s(first), echo.s(second)).apply_async().get(timeout=60)
    assert result["echo"]["data"] == {"got": "http://example/a.zip", "msg": "said hello"}
    # A named stage means nothing in a plain chain: the task fails naming the reference.
    bad = {"taskType": "echo", "data": {"x": "${one.result.echo}"}}
    with pytest.raises(Exception, match=r"spec\.data\.x: \$\{one\.result\.echo\}: a plain Celery chain"):
        chain(echo.s(first), echo.s(bad)).apply_async().get(timeout=60)


def test_cli_submit_status_cancel(worker_factory, redis_client, tmp_path: Path) -> None:
    worker_factory(worker_id="pcli")
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(echo_stages(
        {"name": "one", "spec": {"data": {"v": "${env:PIPELINE_TEST_VALUE}"}, "echo": {"sleep_s": 1, "steps": 2}}},
        {"name": "two", "spec": {"data": {"v": "${one.result.echo.data.v}"}}})))
    os.environ["PIPELINE_TEST_VALUE"] = "from-env"
    try:
        done = cli("submit", str(good), "--wait", "--json")
    finally:
        del os.environ["PIPELINE_TEST_VALUE"]
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["state"] == "SUCCESS"
    assert report["stages"]["two"]["result"]["echo"]["data"] == {"v": "from-env"}
    assert {"state", "task_id", "worker_id", "result"} <= set(report["stages"]["one"])
    assert "one" in done.stderr and "SUCCESS" in done.stderr  # plain progress lines (not a TTY)
    assert "\x1b[" not in done.stderr

    status = cli("status", report["id"], "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["state"] == "SUCCESS"
    text = cli("status", report["id"])
    assert text.returncode == 0 and "SUCCESS" in text.stdout and "[worker pcli]" in text.stdout

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(echo_stages(
        {"name": "one", "spec": {"data": {"x": 1}}},
        {"name": "two", "spec": {"data": {"y": "${one.result.missing}"}}})))
    failed = cli("submit", str(bad), "--wait", "--json")
    assert failed.returncode == 1
    failed_report = json.loads(failed.stdout)
    assert failed_report["state"] == "FAILURE" and failed_report["failed_stage"] == "two"
    assert "one.result has no field 'missing'" in failed_report["stages"]["two"]["error"]

    invalid = tmp_path / "invalid.yaml"
    invalid.write_text(yaml.safe_dump(echo_stages({"name": "one", "spec": {"data": {"y": "${zero.result.x}"}}})))
    refused = cli("submit", str(invalid))
    assert refused.returncode == 2 and "spec.stages[0].spec.data.y: unknown stage 'zero'" in refused.stderr

    slow = tmp_path / "slow.yaml"
    slow.write_text(yaml.safe_dump(echo_stages(
        {"name": "one", "spec": {"echo": {"sleep_s": 60, "steps": 120}}},
        {"name": "two", "spec": {"data": {"x": 1}}})))
    submitted = cli("submit", str(slow), "--json")
    assert submitted.returncode == 0
    pipeline_id = json.loads(submitted.stdout)["id"]
    wait_for(lambda: PipelineRun.get(pipeline_id).status()["stages"]["one"]["state"] == "PROGRESS", 30,
             message="stage one running")
    cancelled = cli("cancel", pipeline_id)
    assert cancelled.returncode == 0, cancelled.stderr
    final = cli("status", pipeline_id, "--wait", "--json", "--timeout", "30")
    assert final.returncode == 1
    assert [s["state"] for s in json.loads(final.stdout)["stages"].values()] == ["REVOKED", "SKIPPED"]


def test_cancel_before_any_worker_took_it(worker_factory, redis_client) -> None:
    """A worker that starts after the cancel (and so never heard the revoke) still does not run it."""
    run = Pipeline.from_dict(echo_stages(
        {"name": "one", "spec": {"data": {"x": 1}}},
        {"name": "two", "spec": {"data": {"y": 2}}})).submit()
    assert "no live worker" in run.warnings[0]
    report = run.cancel()
    assert report["state"] == "CANCELLED"
    assert [s["state"] for s in report["stages"].values()] == ["SKIPPED", "SKIPPED"]
    worker = worker_factory(worker_id="late")
    final = wait_for(lambda: (s := run.status())["stages"]["one"]["state"] == "REVOKED" and s, 30,
                     message="the queued stage to be dropped")
    assert final["state"] == "CANCELLED" and "before it started" in final["stages"]["one"]["error"]
    assert final["stages"]["two"]["state"] == "SKIPPED"
    for stage in run.stages:
        assert not (worker.results_dir / stage["task_id"]).exists()
    # The message was consumed, not left behind: the worker runs the next pipeline.
    assert Pipeline.from_dict({"taskType": "echo", "data": {"ok": 1}}).submit().wait(timeout=30)
