"""Exactly-once under ordinary faults (issue 11, items 5, 6 and 8), with real workers:
a worker paused past its lease, a pool child that stops while its parent beats, and a
Redis that goes away across the end of a task."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import psutil

from tests.conftest import wait_for
from tests.test_delivery import count_started


def long_echo(seconds: float, steps: int, **data: object) -> dict:
    return {"taskType": "echo", "data": data, "echo": {"sleep_s": seconds, "steps": steps}}


def test_a_worker_paused_past_its_lease_stops_its_late_run(worker_factory, redis_client) -> None:
    """The whole worker SIGSTOPped while it runs a task: another worker takes the task over
    and finishes it; on SIGCONT the paused run sees the lease is gone at its next step and
    stops, storing, writing and publishing nothing. The message stays recoverable."""
    from tasks import echo

    env = {"MESHQ_VISIBILITY_TIMEOUT_S": "4"}
    first = worker_factory(worker_id="paused", env=env)
    stop, events = threading.Event(), []
    listener = count_started(redis_client, stop, events)
    time.sleep(0.3)
    try:
        handle = echo.apply_async(args=[long_echo(24, 48, n=1)])
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
