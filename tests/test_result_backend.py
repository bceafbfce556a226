"""meshq's Celery result backend (``app.celery_redaction.RedactingRedisBackend``) on a real Redis:
Celery's stored-SUCCESS rule, the publish that wakes ``AsyncResult.get``, expiries, and the
store as one round trip (Celery's own is a read, then a write)."""

from __future__ import annotations

import json
from typing import Any

import redis
from celery import states

from app.celery import app


def stored(client: redis.Redis, task_id: str) -> dict[str, Any]:
    raw = client.get(app.backend.get_key_for_task(task_id))
    assert raw is not None
    return dict(json.loads(raw))


def subscribed(client: redis.Redis, task_id: str) -> Any:
    """A pub/sub on the task's result channel, once Redis confirmed the subscription."""
    pubsub = client.pubsub()
    pubsub.subscribe(app.backend.get_key_for_task(task_id))
    confirmation = pubsub.get_message(timeout=5)
    assert confirmation is not None and confirmation["type"] == "subscribe"
    return pubsub


def test_a_stored_success_is_never_overwritten(redis_client: redis.Redis) -> None:
    """A lost worker's late copy storing FAILURE, PROGRESS or STARTED after the task's SUCCESS
    changes nothing, and publishes nothing (a waiting client is not told a wrong state)."""
    backend = app.backend
    backend.store_result("late-copy", {"answer": 42}, states.SUCCESS)
    pubsub = subscribed(redis_client, "late-copy")
    backend.store_result("late-copy", RuntimeError("late"), states.FAILURE, traceback="tb")
    backend.store_result("late-copy", {"step": 1}, "PROGRESS")
    backend.store_result("late-copy", {"pid": 1}, states.STARTED)
    meta = stored(redis_client, "late-copy")
    assert meta["status"] == states.SUCCESS and meta["result"] == {"answer": 42}
    assert pubsub.get_message(timeout=0.5) is None
    assert app.AsyncResult("late-copy").get(timeout=5) == {"answer": 42}
    pubsub.close()


def test_every_other_state_is_stored_published_and_expires(redis_client: redis.Redis) -> None:
    backend = app.backend
    key = backend.get_key_for_task("states")
    pubsub = subscribed(redis_client, "states")
    backend.store_result("states", {"step": 3}, "PROGRESS")
    message = pubsub.get_message(timeout=5)
    assert message is not None and json.loads(message["data"])["status"] == "PROGRESS"
    assert 0 < redis_client.ttl(key) <= backend.expires
    backend.store_result("states", ValueError("bad input"), states.FAILURE, traceback="tb")
    message = pubsub.get_message(timeout=5)
    assert message is not None and json.loads(message["data"])["status"] == states.FAILURE
    assert stored(redis_client, "states")["status"] == states.FAILURE
    assert 0 < redis_client.ttl(key) <= backend.failure_expires
    result = app.AsyncResult("states")
    assert result.state == states.FAILURE and isinstance(result.result, ValueError)
    # a retried task may still succeed after a stored FAILURE
    backend.store_result("states", "done", states.SUCCESS)
    assert app.AsyncResult("states").get(timeout=5) == "done"
    pubsub.close()


def test_a_store_is_one_round_trip(redis_client: redis.Redis) -> None:
    """The check and the write are one script call: no separate read, no MULTI/EXEC."""
    app.backend.store_result("warm", 1, states.SUCCESS)  # the script is loaded once per server
    redis_client.config_resetstat()
    app.backend.store_result("one-trip", {"ok": True}, states.SUCCESS)
    calls = {name.removeprefix("cmdstat_"): stats["calls"]
             for name, stats in redis_client.info("commandstats").items()}
    calls.pop("config|resetstat", None)
    calls.pop("config", None)
    calls.pop("info", None)
    assert calls.pop("evalsha") == 1
    assert calls == {"get": 1, "setex": 1, "publish": 1}, calls  # the script's own commands
    assert stored(redis_client, "one-trip")["result"] == {"ok": True}
