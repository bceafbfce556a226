"""Exactly-once under ordinary faults (issue 11, items 5, 6 and 8), with real workers:
a worker paused past its lease, a pool child that stops while its parent beats, and a
Redis that goes away across the end of a task."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis

from tests.conftest import ROOT, PrivateRedis, WorkerProcess, wait_for
from tests.test_delivery import count_started


def long_echo(seconds: float, steps: int, **data: object) -> dict:
    return {"taskType": "echo", "data": data, "echo": {"sleep_s": seconds, "steps": steps}}


def test_a_worker_paused_past_its_lease_stops_its_late_run(worker_factory, redis_client) -> None:
    """The whole worker SIGSTOPped while it runs a task (40 s: time to start the second worker): another worker takes the task over
    and finishes it; on SIGCONT the paused run sees the lease is gone at its next step and
    stops, storing, writing and publishing nothing. The message stays recoverable."""
    from tasks import echo

    env = {"MESHQ_VISIBILITY_TIMEOUT_S": "4"}
    first = worker_factory(worker_id="paused", env=env)
    stop, events = threading.Event(), []
    listener = count_started(redis_client, stop, events)
    time.sleep(0.3)
    try:
        handle = echo.apply_async(args=[long_echo(40, 80, n=1)])
        wait_for(lambda: any(e["type"] == "TASK_STARTED" and e["task_id"] == handle.id for e in events), 30,
                 message="the task to start")
        second = worker_factory(worker_id="taker", env=env)  # started once the first one runs the task
        os.killpg(first.process.pid, signal.SIGSTOP)
        wait_for(lambda: any(e["type"] == "TASK_STARTED" and e.get("worker_id") == "taker" for e in events), 60,
                 message="the other worker to take the task over")
        os.killpg(first.process.pid, signal.SIGCONT)
        value = handle.get(timeout=120)
        wait_for(lambda: "this run stops" in first.log_path.with_name("worker.log").read_text(), 30,
                 message="the late run to stop")
        time.sleep(2)  # what the late run could still have sent would have arrived by now
    finally:
        stop.set()
        listener.join()
    assert value["worker_id"] == "taker"
    assert redis_client.get(f"meshq:task:{handle.id}:runs") == "2"  # two starts, one result
    mine = [e for e in events if e["task_id"] == handle.id]
    assert [e["worker_id"] for e in mine if e["type"] == "TASK_SUCCEEDED"] == ["taker"]
    assert not [e for e in mine if e["type"] == "TASK_FAILED"]
    assert not [e for e in mine if e["type"] == "TASK_PROGRESS" and e["worker_id"] == "paused"
                and e["ts"] > next(s["ts"] for s in mine if s["type"] == "TASK_STARTED" and s["worker_id"] == "taker")]
    assert not (first.results_dir / handle.id / "responses.json").exists()
    assert json.loads((second.results_dir / handle.id / "responses.json").read_text())["worker_id"] == "taker"
    assert redis_client.get(f"celery-task-meta-{handle.id}") and \
        json.loads(redis_client.get(f"celery-task-meta-{handle.id}"))["result"]["worker_id"] == "taker"
    # The late run's acknowledgement removed the shared message from the broker's
    # unacknowledged set while the taker still ran it; the taker's heartbeat put it back.
    assert "putting them back" in second.log_path.with_name("worker.log").read_text()
    wait_for(lambda: redis_client.zcard("unacked_index") == 0, 10, message="no unacknowledged message left")
    assert first.alive() and second.alive()
    assert echo.apply_async(args=[long_echo(0, 1)]).get(timeout=60)["echo"]["data"] == {}


def test_a_stuck_pool_child_is_killed_and_its_task_runs_again(worker_factory, redis_client) -> None:
    """Only the pool child SIGSTOPped (its parent keeps beating and renewing the lease): after
    MESHQ_STUCK_TASK_S without progress the watchdog kills it and the task runs again."""
    from tasks import echo

    worker = worker_factory(worker_id="watched", env={"MESHQ_STUCK_TASK_S": "5"})
    handle = echo.apply_async(args=[long_echo(6, 12, n=2)])
    wait_for(lambda: redis_client.exists(f"meshq:task:{handle.id}:alive"), 30, message="the task to run")
    children = psutil.Process(worker.process.pid).children()
    assert len(children) == 1
    child = children[0]
    child.send_signal(signal.SIGSTOP)
    value = handle.get(timeout=120)
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    assert value["echo"]["data"] == {"n": 2} and value["worker_id"] == "watched"
    assert redis_client.get(f"meshq:task:{handle.id}:runs") == "2"
    log = worker.log_path.with_name("worker.log").read_text()
    assert "StuckTask: no progress for" in log and "MESHQ_STUCK_TASK_S=5" in log
    assert worker.alive()


class PersistentRedis(PrivateRedis):
    """A private Redis with AOF in a directory of its own: stopped and started again on its
    port, it comes back with its data, as a production Redis restart or failover does."""

    def __init__(self, data_dir: Path) -> None:
        from cli.embedded_redis import EmbeddedRedis, free_port

        self.data_dir = data_dir
        self.port = free_port()
        self.server = EmbeddedRedis(port=self.port, data_dir=data_dir).start()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.client = redis.Redis.from_url(self.url, decode_responses=True)

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        from cli.embedded_redis import EmbeddedRedis

        self.server = EmbeddedRedis(port=self.port, data_dir=self.data_dir).start()


@pytest.fixture
def persistent_redis(tmp_path: Path) -> Iterator[PersistentRedis]:
    server = PersistentRedis(tmp_path / "redis-data")
    yield server
    server.close()


def run_python(code: str, env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def stored(client: redis.Redis, task_id: str) -> dict | None:
    raw = client.get(f"celery-task-meta-{task_id}")
    return json.loads(raw) if raw else None


OUTAGE_ENV = {"MESHQ_VISIBILITY_TIMEOUT_S": "4"}


def test_a_redis_outage_across_the_end_of_a_task_loses_nothing(persistent_redis: PersistentRedis,
                                                              tmp_path: Path) -> None:
    """Redis stopped while a task runs and started again 20 s later, after the task ended: the
    result is stored when Redis is back, the end of the task is recorded, and the task never
    runs again (not even once its unacknowledged message comes back)."""
    client = persistent_redis.client
    env = {**os.environ, "REDIS_URL": persistent_redis.url, "WORKER_ID": "outlasting", "HEARTBEAT_INTERVAL_SEC": "1",
           "RESULTS_DIR": str(tmp_path / "results"), "MESHQ_LOG_FILE": str(tmp_path / "worker.log"), **OUTAGE_ENV}
    worker = WorkerProcess("outlasting", env, ROOT, tmp_path / "stdout.log", [])
    try:
        worker.wait_ready(client)
        task_id = run_python("import tasks; print(tasks.echo.apply_async(args=[{'taskType': 'echo', 'data': "
                             "{'v': 'kept'}, 'echo': {'sleep_s': 4, 'steps': 8}}]).id)", worker.env)
        wait_for(lambda: client.exists(f"meshq:task:{task_id}:alive"), 30, message="the task to run")
        persistent_redis.stop()
        wait_for(lambda: (tmp_path / "results" / task_id / "responses.json").is_file(), 60,
                 message="the task to finish while Redis is down")
        time.sleep(20 - 4)
        persistent_redis.start()
        meta = wait_for(lambda: (m := stored(client, task_id)) and m["status"] == "SUCCESS" and m, 60,
                        message="the result stored once Redis is back")
        assert meta["result"]["echo"]["data"] == {"v": "kept"}
        wait_for(lambda: client.hget("worker:outlasting", "status") == "IDLE"
                 and client.hget("worker:outlasting", "last_task") == task_id, 30, message="the end recorded")
        wait_for(lambda: not client.exists(f"meshq:task:{task_id}:lease"), 30, message="the lease released")
        # Any copy of the message handed out again finds the result and is dropped.
        wait_for(lambda: client.zcard("unacked_index") == 0 and client.llen("tasks") == 0, 60,
                 message="no message of the task left")
        assert client.get(f"meshq:task:{task_id}:runs") == "1"
        assert stored(client, task_id)["status"] == "SUCCESS"
        assert worker.alive()
    finally:
        worker.close()


def test_a_redis_outage_across_the_end_of_a_pipeline_stage(persistent_redis: PersistentRedis,
                                                           tmp_path: Path) -> None:
    """Stage 1 ends while Redis is down for 20 s: sending stage 2 and storing stage 1's
    result wait for Redis; the pipeline succeeds, each stage run once."""
    client = persistent_redis.client
    env = {**os.environ, "REDIS_URL": persistent_redis.url, "WORKER_ID": "stager", "HEARTBEAT_INTERVAL_SEC": "1",
           "RESULTS_DIR": str(tmp_path / "results"), "MESHQ_LOG_FILE": str(tmp_path / "worker.log"), **OUTAGE_ENV}
    worker = WorkerProcess("stager", env, ROOT, tmp_path / "stdout.log", [])
    try:
        worker.wait_ready(client)
        document = {"apiVersion": "meshq/v1", "kind": "Pipeline", "metadata": {"name": "outage"},
                    "spec": {"stages": [
                        {"name": "one", "spec": {"taskType": "echo", "data": {"n": 1},
                                                 "echo": {"sleep_s": 4, "steps": 8}}},
                        {"name": "two", "spec": {"taskType": "echo", "data": {"n": 2}}}]}}
        pipeline_id = run_python("import json, sys; from pipelines import Pipeline; "
                                 f"print(Pipeline.from_dict(json.loads({json.dumps(document)!r})).submit().id)", env)
        stages = json.loads(client.hget(f"meshq:pipeline:{pipeline_id}", "stages_json"))
        one, two = stages[0]["task_id"], stages[1]["task_id"]
        wait_for(lambda: client.exists(f"meshq:task:{one}:alive"), 30, message="stage one to run")
        persistent_redis.stop()
        wait_for(lambda: (tmp_path / "results" / one / "responses.json").is_file(), 60,
                 message="stage one to finish while Redis is down")
        time.sleep(20 - 4)
        persistent_redis.start()
        wait_for(lambda: (m := stored(client, two)) and m["status"] == "SUCCESS", 90,
                 message="stage two to run once Redis is back")
        assert stored(client, one)["status"] == "SUCCESS"
        status = json.loads(run_python("import json; from pipelines.run import PipelineRun; "
                                       f"print(json.dumps(PipelineRun.get({pipeline_id!r}).status()))", env))
        assert status["state"] == "SUCCESS", status
        wait_for(lambda: client.zcard("unacked_index") == 0, 60, message="no message left")
        assert client.get(f"meshq:task:{one}:runs") == "1" and client.get(f"meshq:task:{two}:runs") == "1"
        assert worker.alive()
    finally:
        worker.close()


def test_result_envelopes_are_keyed_by_run(server_factory, redis_client) -> None:
    """The orchestrator keeps a later run's result: an envelope from an earlier run (a late
    run of a paused worker) is refused with 409 and the stored result.json is left alone."""
    import requests

    server = server_factory()
    redis_client.set("meshq:task:keyed-task:runs", 3)  # three starts of the task: runs 1..3 were issued
    url = f"{server.base_url}/api/v1/results"

    def post(run: int, worker: str) -> requests.Response:
        return requests.post(url, json={"task_id": "keyed-task", "result": {"by": worker}, "worker_id": worker,
                                        "run": run}, timeout=10)

    assert post(2, "taker").status_code == 201
    late = post(1, "paused")
    assert late.status_code == 409 and "older than the stored result's run 2" in late.text
    stored = requests.get(f"{url}/keyed-task", timeout=10).json()
    assert stored["worker_id"] == "taker" and stored["run"] == 2
    assert post(3, "third").status_code == 201  # a still later run replaces it
    assert requests.get(f"{url}/keyed-task", timeout=10).json()["worker_id"] == "third"
    envelope = json.loads((server.results_dir / "keyed-task" / "result.json").read_text())
    assert envelope["run"] == 3 and envelope["result"] == {"by": "third"}


def _upload(server, task_id: str, body: bytes, run: int | None, name: str = "model.zip"):  # type: ignore[no-untyped-def]
    import requests

    headers = {"X-Meshq-Run": str(run)} if run is not None else {}
    return requests.post(f"{server.base_url}/api/v1/results/{task_id}/files", files={"file": (name, body)},
                         headers=headers, timeout=30)


def _download(server, task_id: str, name: str = "model.zip"):  # type: ignore[no-untyped-def]
    import requests

    reply = requests.get(f"{server.base_url}/api/v1/results/{task_id}/files/{name}", timeout=30)
    assert reply.status_code == 200, reply.text
    return reply


def test_uploads_are_keyed_by_run_with_the_envelope_and_across_a_restart(server_factory, redis_client) -> None:
    """A late run's upload (X-Meshq-Run earlier than the task's stored run) is refused with 409
    and the stored file and checksum stay the later run's; the run record is shared with the
    result envelope and survives a server restart. Same run again (a retry) and a later run
    are accepted; an upload without the header behaves as before; a bad header is 400."""
    import hashlib

    import requests

    server = server_factory()
    redis_client.set("meshq:task:keyed-up:runs", 3)
    two, one = b"run two " * 4096, b"run one " * 1000
    assert _upload(server, "keyed-up", two, 2).status_code == 201
    late = _upload(server, "keyed-up", one, 1)
    assert late.status_code == 409, late.text
    assert late.json()["field"] == "X-Meshq-Run" and "run 2" in late.json()["detail"]
    got = _download(server, "keyed-up")
    assert got.content == two and got.headers["X-Checksum-Sha256"] == hashlib.sha256(two).hexdigest()
    assert not [p for p in (server.results_dir / "keyed-up" / "artifacts").iterdir() if p.name.endswith("partial~")]
    assert _upload(server, "keyed-up", two, 2).status_code == 201  # a retry of the same run
    # An earlier run's envelope after the later run's file: the record is one per task.
    envelope = {"task_id": "keyed-up", "result": {"by": "paused"}, "worker_id": "paused", "run": 1}
    refused = requests.post(f"{server.base_url}/api/v1/results", json=envelope, timeout=10)
    assert refused.status_code == 409 and "run 2" in refused.text
    assert not (server.results_dir / "keyed-up" / "result.json").exists()

    server.stop()
    server.start()
    assert _upload(server, "keyed-up", one, 1).status_code == 409  # the record survived the restart
    assert _download(server, "keyed-up").content == two
    three = b"run three " * 100
    assert _upload(server, "keyed-up", three, 3).status_code == 201  # a later run replaces
    assert _download(server, "keyed-up").content == three
    assert requests.post(f"{server.base_url}/api/v1/results", json={**envelope, "run": 2},
                         timeout=10).status_code == 409
    assert _upload(server, "keyed-up", b"by hand", None).status_code == 201  # no header: as before
    assert _download(server, "keyed-up").content == b"by hand"
    for bad in ("0", "-1", "abc", "1.5", "1e3", "1234567890", "", "2, 3"):
        reply = requests.post(f"{server.base_url}/api/v1/results/keyed-bad/files", files={"file": ("f", b"x")},
                              headers={"X-Meshq-Run": bad}, timeout=10)
        assert reply.status_code == 400 and reply.json()["field"] == "X-Meshq-Run", (bad, reply.text)
    assert not (server.results_dir / "keyed-bad").exists()
    assert server.alive()


def test_a_later_runs_upload_replaces_an_earlier_runs(server_factory, redis_client) -> None:
    """Run 1 uploads, then run 2 (the run that took the task over): run 2's file and checksum
    are served; run 1 uploading again afterwards is refused."""
    import hashlib

    server = server_factory()
    redis_client.set("meshq:task:keyed-order:runs", 2)
    one, two = b"first run " * 500, b"second run " * 700
    assert _upload(server, "keyed-order", one, 1).status_code == 201
    stored = _upload(server, "keyed-order", two, 2)
    assert stored.status_code == 201 and stored.json()["sha256"] == hashlib.sha256(two).hexdigest()
    got = _download(server, "keyed-order")
    assert got.content == two and got.headers["X-Checksum-Sha256"] == hashlib.sha256(two).hexdigest()
    assert _upload(server, "keyed-order", one, 1).status_code == 409
    assert _download(server, "keyed-order").content == two


def test_a_late_runs_delivery_is_refused_and_stops_the_run(server_factory, redis_client, tmp_path: Path) -> None:
    """The worker side: a run whose upload the orchestrator refuses (a later run stored the
    task's outputs) stops with LeaseLost, and the stored artifact stays the later run's."""
    from app.artifacts.delivery import deliver_result
    from app.core.errors import LeaseLost
    from app.core.task_spec.schema import Destination

    server = server_factory()
    redis_client.set("meshq:task:keyed-delivery:runs", 2)
    destination = Destination(type="http", url=f"{server.base_url}/api/v1/results")
    archive = tmp_path / "final_model.zip"
    archive.write_bytes(b"the late run's weights")
    later = b"the later run's weights"
    assert _upload(server, "keyed-delivery", later, 2, name="final_model.zip").status_code == 201
    with pytest.raises(LeaseLost):
        deliver_result("keyed-delivery", destination, {"final_model_archive": str(archive)}, run=1)
    assert _download(server, "keyed-delivery", "final_model.zip").content == later
    assert not (server.results_dir / "keyed-delivery" / "result.json").exists()
    # The later run itself delivers (a retry of run 2 after its upload).
    archive.write_bytes(later)
    delivered = deliver_result("keyed-delivery", destination, {"final_model_archive": str(archive)}, run=2)
    assert delivered["final_model_archive_url"].endswith("/keyed-delivery/files/final_model.zip")


FORGER_TOKEN = "t0ken-of-the-orchestrator"


def test_a_forged_run_number_is_refused_and_the_real_run_finishes(worker_factory, server_factory) -> None:
    """Issue 23 item 3: with the token, a result envelope or upload naming a run the system
    never issued (run 999999999 of a running task) is refused (409, nothing stored); the
    task's real run then delivers and the task ends SUCCESS with its own result served."""
    import requests

    from tasks import echo

    server = server_factory(token=FORGER_TOKEN)
    worker_factory(worker_id="honest", env={"ORCHESTRATOR_BASE_URL": server.base_url,
                                            "ORCHESTRATOR_TOKEN": FORGER_TOKEN})
    spec = {**long_echo(3, 6, n=3), "output": {"destination": {"type": "http"}}}
    handle = echo.apply_async(args=[spec])
    wait_for(lambda: handle.state == "PROGRESS", 60, message="the task to run")
    forged = {"task_id": handle.id, "run": 999999999, "worker_id": "forger", "result": {"forged": True}}
    reply = requests.post(f"{server.base_url}/api/v1/results", json=forged, headers=server.headers(), timeout=10)
    assert reply.status_code == 409 and "never issued" in reply.json()["detail"], reply.text
    upload = requests.post(f"{server.base_url}/api/v1/results/{handle.id}/files", files={"file": ("f.bin", b"x")},
                           headers={**server.headers(), "X-Meshq-Run": "999999999"}, timeout=10)
    assert upload.status_code == 409 and upload.json()["field"] == "X-Meshq-Run", upload.text
    value = handle.get(timeout=120)
    assert value["worker_id"] == "honest" and value["echo"]["data"] == {"n": 3}
    stored = requests.get(f"{server.base_url}/api/v1/results/{handle.id}", headers=server.headers(),
                          timeout=10).json()
    assert stored["worker_id"] == "honest" and stored["run"] == 1 and stored["result"] == value
    assert stored["artifacts"] == []
    assert not (server.results_dir / handle.id / "artifacts").exists()


def test_a_run_the_orchestrator_cannot_verify_fails_its_task_visibly(worker_factory, server_factory,
                                                                     private_redis: PrivateRedis) -> None:
    """A server that cannot verify a worker's run (here: it looks at another Redis, where
    the task never started) refuses its result; the worker, whose own Redis says no later
    run was started, ends the task FAILURE with a clear error instead of leaving it running."""
    from app.core.errors import ExecutorError
    from tasks import echo

    server = server_factory(env={"REDIS_URL": private_redis.url})
    worker_factory(worker_id="unverified", env={"ORCHESTRATOR_BASE_URL": server.base_url})
    handle = echo.apply_async(args=[{"taskType": "echo", "data": {"n": 4},
                                     "output": {"destination": {"type": "http"}}}])
    with pytest.raises(ExecutorError) as err:
        handle.get(timeout=60)
    message = str(err.value)
    assert "refused the result of run 1" in message and "never issued" in message, message
    assert "no later run of the task was started" in message
    assert handle.state == "FAILURE"


def test_a_paused_workers_old_run_never_takes_its_task_back(worker_factory, redis_client) -> None:
    """Issue 23 item 7: worker A is SIGSTOPped in the middle of stage one; B takes the task
    over and finishes it, and stage two runs, all while A is stopped — the lease is free
    again. On SIGCONT, A's old run is refused by the fence (a later run started) even though
    the lease is free: it stops, writes no responses.json, and stage two's message is not
    sent again."""
    from pipelines import Pipeline

    env = {"MESHQ_VISIBILITY_TIMEOUT_S": "4"}
    workers = {w.worker_id: w for w in (worker_factory(worker_id="pa", env=env),
                                        worker_factory(worker_id="pb", env=env))}
    stop, events = threading.Event(), []
    listener = count_started(redis_client, stop, events)
    time.sleep(0.3)  # the subscription is in place
    document = {"apiVersion": "meshq/v1", "kind": "Pipeline", "metadata": {"name": "paused-node"},
                "spec": {"stages": [{"name": "one", "spec": long_echo(8, 16, n=1)},
                                    {"name": "two", "spec": {"taskType": "echo", "data": {"n": 2}}}]}}
    try:
        run = Pipeline.from_dict(document).submit()
        stages = json.loads(redis_client.hget(f"meshq:pipeline:{run.id}", "stages_json"))
        one, two = stages[0]["task_id"], stages[1]["task_id"]

        def started_by(task_id: str) -> list[str]:
            return [e["worker_id"] for e in list(events) if e["type"] == "TASK_STARTED" and e["task_id"] == task_id]

        wait_for(lambda: started_by(one) and redis_client.exists(f"meshq:task:{one}:alive"), 60,
                 message="stage one to run")
        paused = workers[started_by(one)[0]]
        taker = next(w for w in workers.values() if w is not paused)
        os.killpg(paused.process.pid, signal.SIGSTOP)
        try:
            wait_for(lambda: (m := stored(redis_client, two)) and m["status"] == "SUCCESS", 120,
                     message="the taker to finish stage one and stage two to run")
            # The lease is free again: only the run numbers can stop A's old run now.
            wait_for(lambda: not redis_client.exists(f"meshq:task:{one}:lease"), 30, message="the lease to be free")
        finally:
            os.killpg(paused.process.pid, signal.SIGCONT)
        paused_log = paused.log_path.with_name("worker.log")
        wait_for(lambda: "which never runs again; this run stops" in paused_log.read_text(), 60,
                 message="the paused run to stop")
    finally:
        stop.set()
        listener.join()
    assert started_by(one) == [paused.worker_id, taker.worker_id] and started_by(two) == [taker.worker_id]
    assert redis_client.get(f"meshq:task:{one}:runs") == "2" and redis_client.get(f"meshq:task:{two}:runs") == "1"
    assert stored(redis_client, one)["result"]["worker_id"] == taker.worker_id
    mine = [e for e in events if e["task_id"] == one and e.get("worker_id") == paused.worker_id]
    assert not [e for e in mine if e["type"] in ("TASK_SUCCEEDED", "TASK_FAILED")]
    assert not (paused.results_dir / one / "responses.json").exists()
    for worker in workers.values():  # stage two was sent once: no copy of it was dropped as finished
        assert f"task {two} already ended" not in worker.log_path.with_name("worker.log").read_text()
    assert paused.alive() and taker.alive()


class HoldingProxy:
    """A pass-through HTTP proxy to the orchestrator that holds the first upload it receives
    until ``release`` is set (its worker stays in the middle of its delivery), and records
    the server's answer to it."""

    def __init__(self, target: str) -> None:
        import http.server

        import requests

        self.held = threading.Event()
        self.release = threading.Event()
        self.held_status: int | None = None
        self.held_headers: dict[str, str] = {}
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                hold = self.path.endswith("/files") and not proxy.held.is_set()
                if hold:
                    proxy.held_headers = headers
                    proxy.held.set()
                    proxy.release.wait(300)
                reply = requests.post(target + self.path, data=body, headers=headers, timeout=60)
                if hold:
                    proxy.held_status = reply.status_code
                self.send_response(reply.status_code)
                self.send_header("Content-Type", reply.headers.get("Content-Type", "application/json"))
                self.send_header("Content-Length", str(len(reply.content)))
                self.end_headers()
                self.wfile.write(reply.content)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.slow
def test_a_worker_paused_in_its_upload_has_its_late_upload_refused(worker_factory, server_factory, redis_client,
                                                                    tiny_model_dir) -> None:
    """A LoRA task's worker is SIGSTOPped while its archive upload is in flight (held by a
    proxy), past its lease: another worker takes the task over, trains again and uploads
    its own archive. When the paused worker wakes and its upload arrives, the orchestrator
    refuses it (409: an earlier run than the stored one); the paused run stops, and the
    served archive stays the later run's."""
    import hashlib

    import requests

    from tests.test_training_worker import lora_spec, submit

    server = server_factory()
    proxy = HoldingProxy(server.base_url)
    env = {"MESHQ_VISIBILITY_TIMEOUT_S": "4", "ORCHESTRATOR_BASE_URL": proxy.url}
    try:
        first = worker_factory(worker_id="paused", env=env)
        handle = submit(lora_spec(tiny_model_dir, http=True))
        wait_for(proxy.held.is_set, 180, message="the first run's upload to arrive")
        second = worker_factory(worker_id="taker", env=env)
        os.killpg(first.process.pid, signal.SIGSTOP)
        try:
            result = handle.get(timeout=240)
        finally:
            os.killpg(first.process.pid, signal.SIGCONT)
        proxy.release.set()
        # The refused upload ends the late run: abandoned, nothing of it kept (tasks.base._abandon).
        wait_for(lambda: "nothing of it is kept" in first.log_path.with_name("worker.log").read_text(), 60,
                 message="the late run to stop")
    finally:
        proxy.close()
    assert result["worker_id"] == "taker"
    assert redis_client.get(f"meshq:task:{handle.id}:runs") == "2"
    assert proxy.held_headers.get("X-Meshq-Run") == "1" and proxy.held_status == 409
    served = requests.get(f"{server.base_url}/api/v1/results/{handle.id}/files/final_lora.zip", timeout=30)
    assert hashlib.sha256(served.content).hexdigest() == result["final_lora_archive_sha256"]
    assert served.headers["X-Checksum-Sha256"] == result["final_lora_archive_sha256"]
    stored = requests.get(f"{server.base_url}/api/v1/results/{handle.id}", timeout=10).json()
    assert stored["worker_id"] == "taker" and stored["run"] == 2
    assert first.alive() and second.alive()
