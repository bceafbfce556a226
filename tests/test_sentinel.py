"""Redis Sentinel failover (issue 30) with real processes: a master, a replica and three
sentinels (``cli.sentinel_cluster``, as ``meshq redis --sentinel`` starts them), two
``celery -A app worker`` processes and ``meshq serve``, all given ``REDIS_URL=sentinel://...``.

In the tests with 50 echoes queued, the long task is a stepped echo: it holds a lease, beats,
refreshes its message's invisibility and reports progress as a training task does, in seconds
of test time; ``test_a_training_task_runs_through_a_failover_once`` (slow) runs a real LoRA
training of the tiny model through a master kill.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests

from app.core.errors import ConfigError
from app.core.redis_client import new_client
from app.core.settings import load_settings
from cli.embedded_redis import free_port
from cli.sentinel_cluster import SentinelCluster
from tests.conftest import ROOT, ServerProcess, WorkerProcess, wait_for

DOWN_AFTER_MS = 1000  # the master may be silent this long before the sentinels promote the replica
FLEET_BACK_WITHIN_S = 30.0  # the bound, from the kill to a new task done
ECHOES = 50


def test_a_sentinel_address_needs_the_masters_name() -> None:
    url = "sentinel://127.0.0.1:26379;sentinel://127.0.0.1:26380/2"
    settings = load_settings({"REDIS_URL": url, "MESHQ_REDIS_MASTER": "mymaster"})
    assert settings.uses_sentinel and settings.redis_master == "mymaster"
    with pytest.raises(ConfigError, match="MESHQ_REDIS_MASTER"):
        load_settings({"REDIS_URL": url})
    with pytest.raises(ConfigError, match="REDIS_URL"):
        load_settings({"REDIS_URL": "sentinel://127.0.0.1:26379;redis://127.0.0.1:6379", "MESHQ_REDIS_MASTER": "m"})
    assert not load_settings({"REDIS_URL": "redis://127.0.0.1:6379/0"}).uses_sentinel


def test_a_sentinel_address_is_logged_without_its_password() -> None:
    from app.core.redaction import redact

    shown = redact("sentinel://:s3cret@10.0.0.1:26379;sentinel://:s3cret@10.0.0.2:26379/0")
    assert shown == "sentinel://10.0.0.1:26379;sentinel://10.0.0.2:26379/0"


class Fleet:
    """A Sentinel deployment with two workers (or ``worker_ids``) and the server on it."""

    def __init__(self, tmp_path: Path, worker_ids: tuple[str, ...] = ("sw1", "sw2"),
                 worker_env: dict[str, str] | None = None) -> None:
        self.cluster = SentinelCluster(down_after_ms=DOWN_AFTER_MS, failover_timeout_ms=5000).start()
        self.env = {**os.environ, "REDIS_URL": self.cluster.url, "MESHQ_REDIS_MASTER": self.cluster.master_name,
                    "HEARTBEAT_INTERVAL_SEC": "1", "MESHQ_VISIBILITY_TIMEOUT_S": "10", "PYTHONUNBUFFERED": "1"}
        self.client = new_client(self.cluster.url, self.cluster.master_name)
        self.workers: list[WorkerProcess] = []
        for worker_id in worker_ids:
            base = tmp_path / worker_id
            base.mkdir()
            env = {**self.env, "WORKER_ID": worker_id, "RESULTS_DIR": str(base / "results"),
                   "MESHQ_LOG_FILE": str(base / "worker.log"), **(worker_env or {})}
            self.workers.append(WorkerProcess(worker_id, env, ROOT, base / "stdout.log", []))
        for worker in self.workers:
            worker.wait_ready(self.client)
        server_dir = tmp_path / "server"
        server_dir.mkdir()
        self.server = ServerProcess(free_port(), server_dir / "results",
                                    {**self.env, "MESHQ_LOG_FILE": str(server_dir / "server.log")},
                                    server_dir / "stdout.log", None).start()
        self.pids = [(w.process.pid, pool_children(w)) for w in self.workers]

    def submit(self, spec: dict) -> str:
        reply = self.post_task(spec)
        assert reply.status_code == 202, reply.text
        return str(reply.json()["id"])

    def post_task(self, spec: dict) -> requests.Response:
        document = {"apiVersion": "meshq/v1", "kind": "EchoTask", "metadata": {"name": "failover"}, "spec": spec}
        return requests.post(f"{self.server.base_url}/api/v1/tasks", json=document, timeout=40)

    def state(self, task_id: str) -> dict | None:
        try:
            reply = requests.get(f"{self.server.base_url}/api/v1/tasks/{task_id}", timeout=10)
        except requests.RequestException:
            return None
        return reply.json() if reply.status_code == 200 else None

    def cli_status(self, task_id: str) -> dict | None:
        done = subprocess.run([sys.executable, "-m", "cli.main", "status", task_id, "--json"], cwd=ROOT,
                              env=self.env, capture_output=True, text=True, timeout=60)
        try:
            return json.loads(done.stdout)
        except ValueError:
            return None

    def runs_of(self, task_id: str, task_name: str = "meshq.echo") -> int:
        """How many times the task's work ran to its end, from the workers' own logs (which no
        Redis failover can lose)."""
        pattern = re.compile(rf"Task {re.escape(task_name)}\[{re.escape(task_id)}\] succeeded in")
        return sum(len(pattern.findall(w.log())) for w in self.workers)

    def wait_broker_empty(self) -> None:
        """Until no message is queued or unacknowledged: every copy a failover left behind (an
        acknowledgement lost with the old master) has been handed out again and dealt with,
        so no run of any task is still to come."""
        wait_for(lambda: self.client.zcard("unacked_index") == 0 and self.client.llen("tasks") == 0, 90,
                 interval_s=0.5, message="no message left in the broker")

    def close(self) -> None:
        for worker in self.workers:
            worker.close()
        self.server.stop()
        for node in [self.cluster.master, self.cluster.replica]:
            if node.process is not None and node.process.poll() is None:
                os.kill(node.process.pid, signal.SIGCONT)
        self.cluster.stop()


def pool_children(worker: WorkerProcess) -> list[int]:
    import psutil

    return sorted(child.pid for child in psutil.Process(worker.process.pid).children())


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path)
    try:
        yield fleet
    finally:
        fleet.close()


def long_echo(seconds: float, steps: int, **data: object) -> dict:
    return {"taskType": "echo", "data": data, "echo": {"sleep_s": seconds, "steps": steps}}


def start_work(fleet: Fleet) -> tuple[str, list[str]]:
    """The long task running on one worker, then ``ECHOES`` short ones queued behind it."""
    long_id = fleet.submit(long_echo(20, 40, kind="long"))
    wait_for(lambda: (s := fleet.state(long_id)) and s["state"] == "PROGRESS", 60, message="the long task to run")
    echoes = [fleet.submit(long_echo(0.1, 1, n=n)) for n in range(ECHOES)]
    return long_id, echoes


def finish_and_check(fleet: Fleet, long_id: str, echoes: list[str]) -> None:
    """Every task succeeds, each ran exactly once, nothing was restarted."""
    for task_id in [long_id, *echoes]:
        wait_for(lambda t=task_id: (s := fleet.state(t)) and s["state"] == "SUCCESS", 120,
                 message=f"task {task_id} to succeed")
    fleet.wait_broker_empty()
    runs = {task_id: fleet.runs_of(task_id) for task_id in [long_id, *echoes]}
    assert {t: n for t, n in runs.items() if n != 1} == {}
    long_state = fleet.state(long_id)
    assert long_state is not None and long_state["result"]["echo"]["data"] == {"kind": "long"}
    assert [fleet.state(t)["result"]["echo"]["data"]["n"] for t in echoes] == list(range(ECHOES))
    assert fleet.client.get(f"meshq:task:{long_id}:runs") == "1"
    assert [(w.process.pid, pool_children(w)) for w in fleet.workers if w.alive()] == fleet.pids


def fleet_works_again(fleet: Fleet, since: float) -> None:
    """Within ``FLEET_BACK_WITHIN_S`` of ``since``: the server takes a new task, a worker runs
    it, and the server and ``meshq status`` answer."""
    def accepted() -> str | None:
        # While no sentinel names a master yet the server answers 503 (as for any Redis outage):
        # an HTTP client sends again.
        reply = fleet.post_task({"taskType": "echo", "data": {"probe": True}})
        assert reply.status_code in (202, 503), reply.text
        return str(reply.json()["id"]) if reply.status_code == 202 else None

    probe = wait_for(accepted, FLEET_BACK_WITHIN_S - (time.monotonic() - since), interval_s=0.5,
                     message="the server to take a task")
    left = FLEET_BACK_WITHIN_S - (time.monotonic() - since)
    wait_for(lambda: (s := fleet.state(probe)) and s["state"] == "SUCCESS", max(left, 0.1),
             message="a task sent after the failover to run")
    status = fleet.cli_status(probe)
    assert status is not None and status["state"] == "SUCCESS", status


def test_killing_the_master_fails_over_without_losing_or_repeating_work(fleet: Fleet) -> None:
    long_id, echoes = start_work(fleet)
    old_master, replica = fleet.cluster.master, fleet.cluster.replica
    assert fleet.cluster.master_port() == old_master.port
    assert old_master.process is not None
    killed_at = time.monotonic()
    old_master.process.kill()
    old_master.process.wait()
    wait_for(lambda: fleet.cluster.master_port() == replica.port, FLEET_BACK_WITHIN_S,
             message="the sentinels to promote the replica")
    fleet_works_again(fleet, killed_at)
    finish_and_check(fleet, long_id, echoes)
    assert all(w.alive() for w in fleet.workers)


@pytest.mark.slow
def test_a_training_task_runs_through_a_failover_once(fleet: Fleet, tiny_model_dir: Path) -> None:
    """A LoRA training of the tiny model running while the master is SIGKILLed: it goes on on
    its worker (no second run, nothing resumed from a checkpoint) and its result is stored on
    the new master."""
    from tests.test_reliability import lora_stage

    task_id = fleet.submit(lora_stage(tiny_model_dir, max_steps=30, save_steps=10))
    wait_for(lambda: (s := fleet.state(task_id)) and s["state"] == "PROGRESS", 240,
             message="the training to report progress")
    old_master, replica = fleet.cluster.master, fleet.cluster.replica
    assert old_master.process is not None
    old_master.process.kill()
    old_master.process.wait()
    wait_for(lambda: fleet.cluster.master_port() == replica.port, FLEET_BACK_WITHIN_S,
             message="the sentinels to promote the replica")
    state = wait_for(lambda: (s := fleet.state(task_id)) and s["state"] in ("SUCCESS", "FAILURE") and s, 300,
                     message="the training to end")
    assert state["state"] == "SUCCESS", state
    assert state["result"]["steps"] == 30 and not state["result"].get("resumed_from_step"), state["result"]
    # The worker logs the success once the result is stored: wait for the line, then count.
    wait_for(lambda: fleet.runs_of(task_id, "meshq.lora_sft"), 30, message="the worker to log the success")
    fleet.wait_broker_empty()
    assert fleet.runs_of(task_id, "meshq.lora_sft") == 1
    assert fleet.client.get(f"meshq:task:{task_id}:runs") == "1"
    assert [(w.process.pid, pool_children(w)) for w in fleet.workers if w.alive()] == fleet.pids


PAUSE_S = 40


def test_a_paused_master_comes_back_as_a_replica_and_overwrites_nothing(fleet: Fleet) -> None:
    """Split brain: the master SIGSTOPped for 40 s (the sentinels promote the replica within
    seconds; the fleet goes on on the new master) while tasks run and wait, then resumed. It becomes a replica of the new master and takes its data; no task ran twice and
    no result is replaced by what the old master held."""
    long_id, echoes = start_work(fleet)
    old_master, replica = fleet.cluster.master, fleet.cluster.replica
    assert old_master.process is not None
    paused_at = time.monotonic()
    os.kill(old_master.process.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: fleet.cluster.master_port() == replica.port, FLEET_BACK_WITHIN_S,
                 message="the sentinels to promote the replica")
        fleet_works_again(fleet, paused_at)
        wait_for(lambda: time.monotonic() - paused_at > PAUSE_S, PAUSE_S + 10, message=f"the pause to last {PAUSE_S} s")
    finally:
        os.kill(old_master.process.pid, signal.SIGCONT)
    old = redis.Redis(port=old_master.port, decode_responses=True, socket_timeout=2)
    wait_for(lambda: old.info("replication").get("role") == "slave"
             and old.info("replication").get("master_link_status") == "up", 60,
             message="the old master to become a replica of the new one")
    finish_and_check(fleet, long_id, echoes)
    # What the old master holds now is the new master's: every result as the fleet stored it.
    wait_for(lambda: old.get(f"celery-task-meta-{long_id}") == fleet.client.get(f"celery-task-meta-{long_id}"), 30,
             message="the old master to have the new master's data")
    for task_id in [long_id, *echoes]:
        assert json.loads(fleet.client.get(f"celery-task-meta-{task_id}"))["status"] == "SUCCESS"


def test_a_worker_whose_acknowledgement_met_the_paused_master_takes_tasks_again(tmp_path: Path) -> None:
    """One worker; its task ends while the master is paused, so acknowledging it meets the
    paused master (it does not answer: a timeout, not a reset). The worker must not keep
    counting that message as held (it takes one task at a time): with the master still
    paused, a new task runs on it within the issue's 30 s of the first task's end. (Before,
    the failed acknowledgement kept the message counted and the worker never asked for a
    task again.)"""
    fleet = Fleet(tmp_path, worker_ids=("sw1",), worker_env={"MESHQ_CELERY_CONFIG": "tests.no_sweep_celery_config"})
    try:
        task_id = fleet.submit(long_echo(3, 3, kind="ends during the pause"))
        wait_for(lambda: (s := fleet.state(task_id)) and s["state"] == "PROGRESS", 60, message="the task to run")
        old_master = fleet.cluster.master
        assert old_master.process is not None
        os.kill(old_master.process.pid, signal.SIGSTOP)
        try:
            wait_for(lambda: fleet.cluster.master_port() == fleet.cluster.replica.port, FLEET_BACK_WITHIN_S,
                     message="the sentinels to promote the replica")
            # Its result is stored on the new master (the task-end writes retry through a failover).
            wait_for(lambda: (s := fleet.state(task_id)) and s["state"] == "SUCCESS", 60,
                     message="the task to end on the new master")
            fleet_works_again(fleet, time.monotonic())
        finally:
            os.kill(old_master.process.pid, signal.SIGCONT)
        assert fleet.runs_of(task_id) == 1
    finally:
        fleet.close()


def test_once_one_connection_to_a_paused_master_times_out_the_others_go_to_the_new_one() -> None:
    """Two clients of one process (separate pools, as meshq's client, the result backend and the
    broker channels are) connected to the master; the master paused and the replica promoted.
    The first client's command gets no answer (the 5 s socket timeout) and the second client's
    next command goes straight to the new master. (Before, each pool's connection to the paused
    master waited out a timeout of its own: three for a task's start, progress and result, and a
    task sent after the failover waited past 30 s.)"""
    with SentinelCluster(down_after_ms=DOWN_AFTER_MS, failover_timeout_ms=5000) as cluster:
        first, second = (new_client(cluster.url, cluster.master_name) for _ in range(2))
        assert first.connection_pool is not second.connection_pool
        first.set("before", "kept")
        second.get("before")  # both hold an idle connection to the master
        old_master = cluster.master
        assert old_master.process is not None
        os.kill(old_master.process.pid, signal.SIGSTOP)
        try:
            wait_for(lambda: cluster.master_port() == cluster.replica.port, FLEET_BACK_WITHIN_S,
                     message="the sentinels to promote the replica")
            with pytest.raises(redis.TimeoutError):
                first.get("before")  # the paused master does not answer
            started = time.monotonic()
            second.set("after", "on the new master")
            assert time.monotonic() - started < 2  # no socket timeout of its own
        finally:
            os.kill(old_master.process.pid, signal.SIGCONT)
        new = redis.Redis(port=cluster.replica.port, decode_responses=True)
        assert new.get("after") == "on the new master"
        assert first.get("after") == "on the new master"


def start_meshq_redis_sentinel(port: int, data_dir: Path) -> tuple[subprocess.Popen[str], dict[str, str]]:
    """``meshq redis --sentinel``, and the variables it tells to export."""
    process = subprocess.Popen([sys.executable, "-m", "cli.main", "redis", "--sentinel", "--port", str(port),
                                "--data-dir", str(data_dir), "--down-after-ms", str(DOWN_AFTER_MS)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    lines = [process.stdout.readline() for _ in range(3)]
    exports = dict(re.findall(r"export (\w+)='?([^'\s]+)'?", "".join(lines)))
    assert exports.get("MESHQ_REDIS_MASTER") == "meshq", lines
    return process, exports


def stop(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)


def test_meshq_redis_sentinel_starts_a_deployment_meshq_can_use(tmp_path: Path) -> None:
    """``meshq redis --sentinel`` prints the REDIS_URL and MESHQ_REDIS_MASTER to use; a client
    built from them writes to the master (on ``--port``) and the replica has it; SIGTERM stops
    all five. After a failover, a new start keeps the promoted node as the master: nothing
    written before or after the failover is lost to a resynchronisation the wrong way round."""
    port, data_dir = free_port(), tmp_path / "redis"
    process, exports = start_meshq_redis_sentinel(port, data_dir)
    url = exports["REDIS_URL"]
    try:
        assert url.startswith("sentinel://") and url.count("sentinel://") == 3
        client = new_client(url, exports["MESHQ_REDIS_MASTER"])
        client.set("before", "kept")
        assert client.execute_command("WAIT", 1, 5000) == 1  # the replica has it
        master = redis.Redis(port=port, decode_responses=True)
        assert master.get("before") == "kept"
        os.kill(int(master.info("server")["process_id"]), signal.SIGKILL)
        wait_for(lambda: redis.Redis(port=port + 2).sentinel_get_master_addr_by_name("meshq")[1] == port + 1, 30,
                 message="the replica to be promoted")
        client.set("after", "kept too")  # on the promoted replica
    finally:
        stop(process)
    for stopped in [port, *(int(p) for p in re.findall(r":(\d+)", url))]:
        with pytest.raises(redis.ConnectionError):
            redis.Redis(port=stopped, socket_connect_timeout=1).ping()

    process, exports = start_meshq_redis_sentinel(port, data_dir)
    try:
        assert exports["REDIS_URL"] == url  # the same ports again
        client = new_client(url, exports["MESHQ_REDIS_MASTER"])
        assert (client.get("before"), client.get("after")) == ("kept", "kept too")
        assert redis.Redis(port=port + 2).sentinel_get_master_addr_by_name("meshq")[1] == port + 1
        first = redis.Redis(port=port, decode_responses=True)
        wait_for(lambda: first.info("replication")["role"] == "slave" and first.get("after") == "kept too", 30,
                 message="the first node to be the replica, with the data written after the failover")
    finally:
        stop(process)


def test_flower_reads_the_queues_through_the_sentinels(tmp_path: Path) -> None:
    """``celery -A app flower`` with the Sentinel URL: its broker page reads the queue lengths
    from the master the sentinels name (Flower needs Celery's ``master_name`` for that)."""
    from tests.conftest import terminate_group

    with SentinelCluster(down_after_ms=DOWN_AFTER_MS) as cluster:
        client = new_client(cluster.url, cluster.master_name)
        for n in range(3):
            client.lpush("tasks", json.dumps({"n": n}))  # three messages waiting in the default queue
        port = free_port()
        env = {**os.environ, "REDIS_URL": cluster.url, "MESHQ_REDIS_MASTER": cluster.master_name,
               "FLOWER_UNAUTHENTICATED_API": "1"}
        with open(tmp_path / "flower.log", "wb") as log:
            process = subprocess.Popen([sys.executable, "-m", "celery", "-A", "app", "flower", f"--port={port}",
                                        "--address=127.0.0.1"], cwd=ROOT, env=env, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        try:
            def lengths() -> dict | None:
                if process.poll() is not None:
                    pytest.fail("flower exited:\n" + (tmp_path / "flower.log").read_text())
                try:
                    reply = requests.get(f"http://127.0.0.1:{port}/api/queues/length", timeout=10)
                except requests.RequestException:
                    return None
                return reply.json() if reply.status_code == 200 else None

            queues = wait_for(lengths, 60, interval_s=0.5, message="flower's queue lengths")
            assert {q["name"]: q["messages"] for q in queues["active_queues"]} == {"tasks": 3}
        finally:
            terminate_group(process)


def test_a_result_written_to_a_master_that_was_replaced_is_written_again_on_the_new_one(caplog) -> None:
    """The result backend's connection to the master stays open while the master is paused and
    the sentinels promote the replica; the master resumes (briefly a second master, until the
    sentinels demote it) and a task's SUCCESS is stored through that connection. It must end
    up on the new master: kept there, it would be discarded when the old master is demoted."""
    from celery import Celery

    from app.celery_redaction import RedactingSentinelBackend

    with SentinelCluster(down_after_ms=DOWN_AFTER_MS, failover_timeout_ms=5000) as cluster:
        app = Celery(set_as_current=False)
        app.conf.update(result_backend_transport_options={"master_name": cluster.master_name},
                        result_serializer="json", result_accept_content=["json"], redis_socket_timeout=5)
        backend = RedactingSentinelBackend(app=app, url=cluster.url)
        backend.store_result("before", {"v": "before"}, "SUCCESS")  # connects to the master
        old_master = cluster.master
        assert old_master.process is not None
        os.kill(old_master.process.pid, signal.SIGSTOP)
        try:
            wait_for(lambda: cluster.master_port() == cluster.replica.port, 30,
                     message="the sentinels to promote the replica")
        finally:
            os.kill(old_master.process.pid, signal.SIGCONT)
        backend.store_result("after", {"v": "after"}, "SUCCESS")
        new = redis.Redis(port=cluster.replica.port, decode_responses=True)
        assert json.loads(new.get("celery-task-meta-after"))["result"] == {"v": "after"}
        assert json.loads(new.get("celery-task-meta-before"))["result"] == {"v": "before"}
        old = redis.Redis(port=old_master.port, decode_responses=True, socket_timeout=2)
        wait_for(lambda: old.info("replication").get("role") == "slave"
                 and old.info("replication").get("master_link_status") == "up", 60,
                 message="the old master to become a replica of the new one")
        wait_for(lambda: old.get("celery-task-meta-after") == new.get("celery-task-meta-after"), 30,
                 message="the old master to hold the new master's result")
