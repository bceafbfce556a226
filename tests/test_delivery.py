"""Delivery guarantees under failure (DESIGN §10), with real workers and real Redis."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis

from tests.conftest import ROOT, PrivateRedis, wait_for


def count_started(client: redis.Redis, stop: threading.Event, seen: list[dict]) -> threading.Thread:
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("tasks.events")

    def run() -> None:
        while not stop.is_set():
            message = pubsub.get_message(timeout=0.2)
            if message:
                seen.append(json.loads(message["data"]))
        pubsub.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_long_task_keeps_its_message_and_never_blocks_another_worker(worker_factory, redis_client) -> None:
    """Visibility timeout 4 s, a task of 30 s, two workers: the running task's heartbeat keeps
    its message invisible, so it is never handed out again (one TASK_STARTED, runs = 1), and
    an echo submitted meanwhile runs at once on the other worker instead of queueing behind a
    waiting copy."""
    from tasks import echo

    env = {"MESHQ_VISIBILITY_TIMEOUT_S": "4"}
    worker_factory(worker_id="vt-a", env=env)
    worker_factory(worker_id="vt-b", env=env)
    stop, events = threading.Event(), []
    listener = count_started(redis_client, stop, events)
    time.sleep(0.3)
    try:
        long = echo.apply_async(args=[{"taskType": "echo", "data": {"n": 1},
                                       "echo": {"sleep_s": 30, "steps": 60}}])
        wait_for(lambda: any(e["type"] == "TASK_STARTED" and e["task_id"] == long.id for e in events), 30,
                 message="the long task to start")
        time.sleep(4 * 3)  # three visibility timeouts into the run
        short = echo.apply_async(args=[{"taskType": "echo", "data": {"n": 2}}])
        quick = short.get(timeout=60)
        # Done while the long task still runs: no waiting copy held the other worker.
        long_state_then = long.backend.get_task_meta(long.id)["status"]
        value = long.get(timeout=120)
    finally:
        stop.set()
        listener.join()
    assert value["echo"]["data"] == {"n": 1} and quick["echo"]["data"] == {"n": 2}
    assert quick["worker_id"] != value["worker_id"], "the echo did not run on the free worker"
    assert long_state_then == "PROGRESS", "the echo only ran once the long task had ended"
    starts = [e for e in events if e["type"] == "TASK_STARTED" and e["task_id"] == long.id]
    assert len(starts) == 1, f"the long task was handed out again: {starts}"
    assert redis_client.get(f"meshq:task:{long.id}:runs") == "1"
    # Acknowledged: nothing of it is left in the broker's unacknowledged set.
    wait_for(lambda: redis_client.zcard("unacked_index") == 0, 10, message="no unacknowledged message left")
    wait_for(lambda: not redis_client.exists(f"meshq:task:{long.id}:lease"), 10, message="lease released")


def test_redis_restart_mid_task(private_redis: PrivateRedis, tmp_path: Path) -> None:
    """Redis killed and restarted on the same port during a task: result stored, beats resume."""
    client = private_redis.client
    worker = private_redis.worker("survivor", tmp_path)
    try:
        worker.wait_ready(client)
        submit = subprocess.run(
            [sys.executable, "-c",
             "import tasks; print(tasks.echo.apply_async(args=[{'taskType': 'echo', 'data': {'v': 'x'},"
             " 'echo': {'sleep_s': 8, 'steps': 8}}]).id)"],
            env=worker.env, cwd=ROOT, capture_output=True, text=True, timeout=60)
        task_id = submit.stdout.strip()
        assert task_id, submit.stderr
        wait_for(lambda: client.hget("worker:survivor", "status") == "RUNNING", 30, message="task start")
        private_redis.restart(down_s=1.5)
        wait_for(lambda: client.exists("worker:survivor:hb"), 30, message="heartbeats to resume")

        def stored() -> dict | None:
            raw = client.get(f"celery-task-meta-{task_id}")
            return json.loads(raw) if raw else None

        meta = wait_for(lambda: (m := stored()) and m["status"] == "SUCCESS" and m, 60,
                        message="the task's result in the restarted Redis")
        assert meta["result"]["echo"]["data"] == {"v": "x"}
        assert (tmp_path / "results" / task_id / "responses.json").is_file()
        assert worker.alive()
        wait_for(lambda: client.hget("worker:survivor", "status") == "IDLE", 30, message="IDLE after the task")
    finally:
        worker.close()


def test_task_that_keeps_killing_its_worker_is_capped(worker_factory, redis_client) -> None:
    """After MESHQ_MAX_TASK_RUNS starts (each worker died), the next delivery gives up clearly."""
    from app.core.errors import ExecutorError
    from tasks import echo

    worker = worker_factory(worker_id="capper", env={"MESHQ_MAX_TASK_RUNS": "3"})
    task_id = str(uuid.uuid4())
    # Three earlier starts whose workers died (what the run counter records).
    redis_client.set(f"meshq:task:{task_id}:runs", 3)
    result = echo.apply_async(args=[{"taskType": "echo"}], task_id=task_id)
    with pytest.raises(ExecutorError, match=r"started 3 times and its worker died each time"):
        result.get(timeout=60)
    assert worker.alive()
    assert echo.apply_async(args=[{"taskType": "echo"}]).get(timeout=60)["worker_id"] == "capper"


def test_duplicate_message_of_a_finished_task_is_dropped(worker_factory, redis_client) -> None:
    """A second message with the id of a task that already succeeded (a chain step sent
    twice, a late redelivery) does not run the work again and leaves the result alone."""
    from tasks import echo

    worker = worker_factory(worker_id="dedup")
    task_id = str(uuid.uuid4())
    stop, events = threading.Event(), []
    listener = count_started(redis_client, stop, events)
    time.sleep(0.3)
    try:
        first = echo.apply_async(args=[{"taskType": "echo", "data": {"n": 1}}], task_id=task_id).get(timeout=60)
        echo.apply_async(args=[{"taskType": "echo", "data": {"n": 2}}], task_id=task_id)
        follow_up = echo.apply_async(args=[{"taskType": "echo"}]).get(timeout=60)  # FIFO: the duplicate went first
        time.sleep(0.5)
    finally:
        stop.set()
        listener.join()
    # The dropped duplicate published nothing: one TASK_STARTED, one outcome.
    assert [e["type"] for e in events if e["task_id"] == task_id] == ["TASK_STARTED", "TASK_SUCCEEDED"]
    assert follow_up["worker_id"] == "dedup"
    assert redis_client.get(f"meshq:task:{task_id}:runs") == "1"
    assert echo.AsyncResult(task_id).get(timeout=10) == first
    assert first["echo"]["data"] == {"n": 1}
    assert "already ended with SUCCESS; this delivery is dropped" in worker.log_path.with_name("worker.log").read_text()


RETRYING_WORKER_ENV = {"MESHQ_CELERY_CONFIG": "tests.retrying_celery_config", "MESHQ_MAX_TASK_RUNS": "2"}


def test_celery_retries_are_not_counted_as_worker_deaths(worker_factory, redis_client) -> None:
    """Four ``self.retry`` calls with a run cap of 2: the task succeeds, ``runs`` stays 1."""
    from app.celery import app

    worker_factory(worker_id="retrier", env=RETRYING_WORKER_ENV)
    result = app.send_task("meshq_test.retrying_echo", args=[{"taskType": "echo", "data": {"fail_times": 4}}])
    value = result.get(timeout=60)
    assert value["echo"]["data"] == {"fail_times": 4}
    meta = app.backend.get_task_meta(result.id)
    assert meta["status"] == "SUCCESS" and meta["retries"] == 4
    assert redis_client.get(f"meshq:task:{result.id}:runs") == "1"


def test_autoretry_gives_up_with_the_real_error(worker_factory, redis_client) -> None:
    """``autoretry_for`` past ``max_retries``: Celery's own failure with the task's error,
    never the run cap's "its worker died each time"."""
    from app.celery import app

    worker = worker_factory(worker_id="giver-up", env=RETRYING_WORKER_ENV)
    result = app.send_task("meshq_test.always_failing", args=[{"taskType": "echo"}])
    with pytest.raises(ConnectionError, match="the database is down"):
        result.get(timeout=60)
    assert app.backend.get_task_meta(result.id)["retries"] == 4
    assert redis_client.get(f"meshq:task:{result.id}:runs") == "1"
    assert "worker died" not in worker.log_path.with_name("worker.log").read_text()
    # What the run cap would name, should a worker of this task die later.
    wait_for(lambda: redis_client.get(f"meshq:task:{result.id}:last-error")
             == "ConnectionError: the database is down", 10, message="the last error recorded")


def test_the_run_cap_names_the_last_error(worker_factory, redis_client) -> None:
    """A redelivery past the cap fails naming the error the earlier run recorded."""
    from app.core.errors import ExecutorError
    from tasks import echo

    worker_factory(worker_id="capper2", env={"MESHQ_MAX_TASK_RUNS": "1"})
    task_id = str(uuid.uuid4())
    redis_client.set(f"meshq:task:{task_id}:runs", 1)
    redis_client.set(f"meshq:task:{task_id}:last-error", "WorkerLostError: Worker exited prematurely: signal 9")
    result = echo.apply_async(args=[{"taskType": "echo"}], task_id=task_id)
    with pytest.raises(ExecutorError, match=r"last error: WorkerLostError: Worker exited prematurely: signal 9"):
        result.get(timeout=60)
