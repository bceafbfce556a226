"""The worker shim against a real Redis and real ``celery worker`` processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import redis

from tests.conftest import ROOT, PrivateRedis, terminate_group, wait_for

REGISTRY_FIELDS = {"worker_id", "status", "started_at", "pid", "env_json", "hardware_json",
                   "tags_json", "queues_json", "last_seen", "current_task", "last_task", "cost_per_hour"}


def echo_spec(**echo: object) -> dict:
    return {"taskType": "echo", "data": {"hello": "world"}, **({"echo": echo} if echo else {})}


class Subscriber:
    """Collects JSON events from both channels in a background thread."""

    def __init__(self, client: redis.Redis) -> None:
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe("workers.events", "tasks.events")
        self.events: list[tuple[str, dict]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._stop = False
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            message = self.pubsub.get_message(timeout=0.2)
            if message:
                self.events.append((message["channel"], json.loads(message["data"])))

    def types(self, channel: str) -> list[str]:
        return [e["type"] for ch, e in list(self.events) if ch == channel]

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.pubsub.close()


def test_registration_heartbeat_events_and_task(worker_factory, redis_client) -> None:
    sub = Subscriber(redis_client)
    time.sleep(0.3)
    try:
        worker = worker_factory("gpu,a100", worker_id="reg1")
        fields = redis_client.hgetall("worker:reg1")
        assert REGISTRY_FIELDS <= set(fields)
        assert fields["worker_id"] == "reg1" and fields["status"] == "IDLE"
        assert json.loads(fields["tags_json"]) == ["a100", "gpu"]
        assert json.loads(fields["queues_json"]) == [
            "tasks", "tasks.a100", "tasks.gpu", "tasks.a100+gpu", "tasks.worker.reg1"]
        assert json.loads(fields["hardware_json"])["cpu_count"] == os.cpu_count()
        assert json.loads(fields["env_json"])["WORKER_TAGS"] == "a100,gpu"
        assert int(fields["pid"]) == worker.process.pid
        assert "reg1" in redis_client.smembers("workers:ids")
        # HEARTBEAT_INTERVAL_SEC=1 → TTL = max(4, 120) = 120
        assert 110 <= redis_client.ttl("worker:reg1:hb") <= 120
        first_seen = fields["last_seen"]
        wait_for(lambda: redis_client.hget("worker:reg1", "last_seen") != first_seen, 10,
                 message="a heartbeat to refresh last_seen")
        wait_for(lambda: "HEARTBEAT" in sub.types("workers.events"), 10, message="HEARTBEAT event")

        from app.celery import app
        from tasks.submit import submit_task

        submission = submit_task(echo_spec(sleep_s=1.5, steps=3))
        assert submission.queue == "tasks" and submission.warnings == []
        wait_for(lambda: redis_client.hget("worker:reg1", "status") == "RUNNING", 10,
                 message="RUNNING status")
        assert redis_client.hget("worker:reg1", "current_task") == submission.task_id
        result = app.AsyncResult(submission.task_id).get(timeout=30)
        assert result["echo"]["data"] == {"hello": "world"} and result["worker_id"] == "reg1"
        wait_for(lambda: redis_client.hget("worker:reg1", "status") == "IDLE", 10, message="IDLE again")
        assert redis_client.hget("worker:reg1", "last_task") == submission.task_id
        task_dir = worker.results_dir / submission.task_id
        assert json.loads((task_dir / "responses.json").read_text()) == result
        manifest = json.loads((task_dir / "manifest.json").read_text())
        assert [f["path"] for f in manifest["files"]] == ["responses.json"]

        wait_for(lambda: "TASK_SUCCEEDED" in sub.types("tasks.events"), 10, message="TASK_SUCCEEDED")
        task_types = sub.types("tasks.events")
        assert task_types.index("TASK_STARTED") < task_types.index("TASK_PROGRESS") < task_types.index("TASK_SUCCEEDED")
        worker_types = sub.types("workers.events")
        assert "REGISTER" in worker_types and "STATUS" in worker_types
        heartbeat = next(e for ch, e in sub.events if e["type"] == "HEARTBEAT")
        assert {"load_avg", "cpu_percent", "memory_used_bytes"} <= set(heartbeat["metrics"])
        assert "gpus" not in heartbeat["metrics"]  # no GPU here → no GPU section, no error

        # Graceful shutdown unregisters.
        assert worker.terminate() == 0
        assert not redis_client.exists("worker:reg1", "worker:reg1:hb")
        assert "reg1" not in redis_client.smembers("workers:ids")
        wait_for(lambda: "UNREGISTER" in sub.types("workers.events"), 5, message="UNREGISTER")
    finally:
        sub.close()


def test_running_task_is_started_in_celery_and_status_ends_idle(worker_factory, redis_client) -> None:
    """STARTED (stored by the lease script, as task_track_started would) carries the pool
    child's pid, the node name and the extended fields; the background task-end write
    still leaves the worker IDLE with the task's lease released."""
    from app.celery import app
    from tasks.submit import submit_task

    worker = worker_factory(worker_id="started1")
    submission = submit_task(echo_spec(sleep_s=3, steps=1))  # no progress update until the end
    handle = app.AsyncResult(submission.task_id)
    # State and info from one meta fetch (the task may move on between two reads).
    meta = wait_for(lambda: (m := app.backend.get_task_meta(handle.id))["status"] == "STARTED" and m, 15,
                    message="state STARTED")
    info = meta["result"]
    child_pids = {c.pid for c in psutil.Process(worker.process.pid).children(recursive=True)}
    assert info["pid"] in child_pids and info["pid"] != worker.process.pid
    assert info["hostname"].startswith("meshq-started1@")
    assert meta["name"] == "meshq.echo" and meta["worker"] == info["hostname"]
    assert redis_client.get(f"meshq:task:{submission.task_id}:lease") == "started1"
    assert handle.get(timeout=30)["worker_id"] == "started1"
    wait_for(lambda: redis_client.hget("worker:started1", "status") == "IDLE", 10, message="IDLE")
    assert redis_client.hget("worker:started1", "last_task") == submission.task_id
    assert not redis_client.exists(f"meshq:task:{submission.task_id}:lease")


def test_failed_task_event_and_worker_goes_on(worker_factory, redis_client) -> None:
    from app.celery import app
    from app.core.errors import SpecError
    from tasks import echo

    worker = worker_factory()
    bad = echo.apply_async(args=[{"taskType": "echo", "bogus": 1}])
    with pytest.raises(SpecError, match=r"spec\.bogus: unknown field"):
        bad.get(timeout=30)
    good = echo.apply_async(args=[echo_spec()])
    assert good.get(timeout=30)["worker_id"] == worker.worker_id
    assert app.AsyncResult(bad.id).state == "FAILURE"


def test_sigkill_leaves_hash_and_heartbeat_expires(worker_factory, redis_client) -> None:
    worker = worker_factory(worker_id="killed1")
    worker.kill()
    assert redis_client.exists("worker:killed1")
    ttl_after_kill = redis_client.ttl("worker:killed1:hb")
    assert 0 < ttl_after_kill <= 120
    time.sleep(3.5)  # three missed beats
    # Nobody refreshes the key any more: it counts down and will expire.
    assert redis_client.ttl("worker:killed1:hb") <= ttl_after_kill - 3
    status = subprocess.run([sys.executable, "-m", "cli.main", "health", "--worker", "killed1"],
                            env={**os.environ}, cwd=ROOT, capture_output=True, text=True)
    assert status.returncode == 0  # still within its TTL...
    redis_client.delete("worker:killed1:hb")  # ...and once it has expired:
    status = subprocess.run([sys.executable, "-m", "cli.main", "health", "--worker", "killed1"],
                            env={**os.environ}, cwd=ROOT, capture_output=True, text=True)
    assert status.returncode == 1 and "not alive" in status.stdout


def test_tag_routing(worker_factory, redis_client) -> None:
    from app.celery import app
    from tasks.submit import submit_task

    gpu = worker_factory("gpu", worker_id="only-gpu")
    both = worker_factory("gpu,a100", worker_id="gpu-a100")

    def run(spec: dict, **kw: object) -> str:
        submission = submit_task(spec, **kw)
        return app.AsyncResult(submission.task_id).get(timeout=60)["worker_id"]

    need_both = {**echo_spec(sleep_s=0.2), "tags": ["a100", "gpu"]}
    assert {run(need_both) for _ in range(4)} == {"gpu-a100"}
    need_gpu = {**echo_spec(sleep_s=0.3), "tags": ["gpu"]}
    # Two at once so both workers are offered work: either may take a {gpu} task.
    subs = [submit_task(need_gpu) for _ in range(6)]
    assert {app.AsyncResult(s.task_id).get(timeout=60)["worker_id"] for s in subs} <= {"only-gpu", "gpu-a100"}
    assert subs[0].queue == "tasks.gpu"
    assert submit_task(echo_spec()).queue == "tasks"
    for _ in range(3):
        assert run(echo_spec(), worker_id="only-gpu") == "only-gpu"
    # Nobody consumes tasks.tpu: allowed, but reported.
    nobody = submit_task({**echo_spec(), "tags": ["tpu"]})
    assert nobody.queue == "tasks.tpu" and "no live worker" in nobody.warnings[0]
    app.control.revoke(nobody.task_id)
    assert gpu.alive() and both.alive()


def test_redis_restart_while_idle(private_redis: PrivateRedis, tmp_path: Path) -> None:
    """Redis restarted on the same port: the worker reconnects, heartbeats resume, tasks run."""
    client = private_redis.client
    worker = private_redis.worker("phoenix", tmp_path)
    try:
        worker.wait_ready(client)
        private_redis.restart(down_s=2)
        wait_for(lambda: client.exists("worker:phoenix:hb"), 30, message="heartbeats to resume")
        assert "phoenix" in client.smembers("workers:ids")
        assert client.hget("worker:phoenix", "status") == "IDLE"
        # The Celery consumer reconnected too: a task sent now runs.
        probe = subprocess.run(
            [sys.executable, "-c",
             "import tasks; print(tasks.echo.apply_async(args=[{'taskType': 'echo'}]).get(timeout=60)['worker_id'])"],
            env=worker.env, cwd=ROOT, capture_output=True, text=True, timeout=90)
        assert probe.stdout.strip() == "phoenix", probe.stderr
        assert worker.alive()
        assert "heartbeat resumed" in (tmp_path / "worker.log").read_text()
    finally:
        worker.close()


@pytest.mark.parametrize(("variable", "value"), [
    ("HEARTBEAT_INTERVAL_SEC", "soon"),
    ("WORKER_TAGS", "gpu,bad tag"),
    ("WORKER_TAGS", "a,b,c,d,e,f,g"),
])
def test_bad_env_exits_naming_variable(redis_url: str, variable: str, value: str) -> None:
    env = {**os.environ, "REDIS_URL": redis_url, variable: value}
    proc = subprocess.run([sys.executable, "-m", "celery", "-A", "app", "worker"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert variable in proc.stderr
    assert "Traceback" not in proc.stderr


def test_worker_without_redis_url_says_so(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(MESHQ_LOG_FILE=str(tmp_path / "w.log"), RESULTS_DIR=str(tmp_path))
    # Whether or not a Redis answers on localhost:6379, the log says which one is used.
    proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "app", "worker", "--without-mingle"],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        def said_so() -> bool:
            log = (tmp_path / "w.log").read_text() if (tmp_path / "w.log").exists() else ""
            return "REDIS_URL is not set: using redis://localhost:6379/0" in log
        wait_for(said_so, 60, message="the REDIS_URL log line")
    finally:
        terminate_group(proc, timeout_s=20)
