"""The worker record follows what the Celery consumer really does: queues (``-Q``,
``add_consumer``/``cancel_consumer``), pool size, and the end of a task whose child was killed."""

from __future__ import annotations

import json

import redis

from tests.conftest import wait_for
from tests.test_pipeline import TaskEvents


def node_of(app, worker_id: str) -> str:
    return wait_for(lambda: next((n for reply in app.control.ping(timeout=1) for n in reply
                                  if n.startswith(f"meshq-{worker_id}@")), None), 30, message="the worker's ping")


def recorded_queues(client: redis.Redis, worker_id: str) -> list[str]:
    return sorted(json.loads(client.hget(f"worker:{worker_id}", "queues_json") or "[]"))


def consumed_queues(app, node: str) -> list[str]:
    """What Celery itself says the consumer consumes."""
    return sorted(q["name"] for q in app.control.inspect(destination=[node], timeout=5).active_queues()[node])


def test_queues_follow_q_and_add_cancel_consumer(worker_factory, redis_client: redis.Redis) -> None:
    from app.celery import app
    from tasks.submit import queue_warning, submit_task

    worker_factory("gpu", worker_id="rec-w", extra_args=["-Q", "special"])
    node = node_of(app, "rec-w")
    wait_for(lambda: recorded_queues(redis_client, "rec-w") == consumed_queues(app, node), 15,
             message="the record to list the queues the consumer consumes")
    assert "special" in recorded_queues(redis_client, "rec-w")
    assert redis_client.hget("worker:rec-w", "concurrency") == "1"

    app.control.add_consumer("extra-q", destination=[node], reply=True)
    wait_for(lambda: "extra-q" in recorded_queues(redis_client, "rec-w"), 15, message="extra-q recorded")
    assert queue_warning("extra-q") is None
    own = "tasks.worker.rec-w"
    app.control.cancel_consumer(own, destination=[node], reply=True)
    wait_for(lambda: own not in recorded_queues(redis_client, "rec-w"), 15, message="own queue gone")
    assert recorded_queues(redis_client, "rec-w") == consumed_queues(app, node)
    pinned = submit_task({"taskType": "echo", "data": {}}, worker_id="rec-w")
    assert pinned.queue == own and pinned.warnings and "no live worker consumes" in pinned.warnings[0]


def test_hard_time_limit_ends_the_task_failed_and_the_worker_idle(worker_factory, redis_client: redis.Redis) -> None:
    from tasks import echo

    events = TaskEvents(redis_client)
    try:
        worker_factory(worker_id="tl-w")
        slow = echo.apply_async(args=[{"taskType": "echo", "data": {}, "echo": {"sleep_s": 30, "steps": 30}}],
                                time_limit=3)
        wait_for(lambda: "TASK_FAILED" in events.for_task(slow.id), 30, message="TASK_FAILED after the kill")
        failed = [e for e in list(events.events) if e["task_id"] == slow.id and e["type"] == "TASK_FAILED"][0]
        assert "TimeLimitExceeded" in failed["error"] and failed["payload"]["taskType"] == "echo", failed
        record = redis_client.hgetall("worker:tl-w")
        assert record["status"] == "IDLE" and record["current_task"] == "" and record["last_task"] == slow.id
        assert slow.state == "FAILURE"
        assert not redis_client.exists(f"meshq:task:{slow.id}:lease")
        assert echo.apply_async(args=[{"taskType": "echo", "data": {"next": 1}}]).get(timeout=60)["echo"]["data"]
    finally:
        events.close()


def test_the_heartbeat_corrects_a_record_naming_a_task_the_worker_no_longer_holds(
        worker_factory, redis_client: redis.Redis) -> None:
    worker_factory(worker_id="hb-w")
    # As a pool child killed mid-task leaves it: RUNNING a task that no longer runs.
    redis_client.hset("worker:hb-w", mapping={"status": "RUNNING", "current_task": "gone-task"})
    wait_for(lambda: redis_client.hget("worker:hb-w", "status") == "IDLE", 15, message="the heartbeat's correction")
    assert redis_client.hget("worker:hb-w", "last_task") == "gone-task"
