"""Every Redis key a run leaves behind has an expiry or a stated bound (issue #28).

A fleet runs for months on one Redis: a key written per task and never expired grows
with the number of tasks ever run. This runs every task type through real workers
(echo, a failure, a cancel, inference — also sharded —, sft, lora_sft, a pipeline, a
graph), then scans the whole database. A key without a TTL must match one of
``BOUNDED`` below, each naming what bounds its count (docs/RELIABILITY.md, "Redis keys and
what bounds them").
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import wait_for

pytestmark = pytest.mark.slow

WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
PAIRS = [{"prompt": "Q: What is the capital of France?\nA:", "response": " Paris"},
         {"prompt": "Q: What colour is the sky?\nA:", "response": " Blue"}]

# Keys that may live without a TTL, and what bounds how many there are.
BOUNDED: dict[str, str] = {
    r"workers:ids": "one set; a member per worker hash (its hash expires; list_workers drops the id)",
    r"meshq:capability-queues": "one hash; an entry per distinct hardware requirement in use",
    r"meshq:pipelines:recent": "one sorted set, trimmed to the records' expiry on each record",
    r"_kombu\.binding\..+": "Celery (kombu): one set per queue's exchange, a member per binding",
    r"_kombu\.binding_permanent\..+": "kombu >= 5.7: the same, one set per queue's exchange",
    r"_kombu\.binding_deadlines": "kombu >= 5.7: one sorted set, a member per expiring exchange",
    r"unacked": "Celery: a hash of messages being run now (a worker's prefetch at most)",
    r"unacked_index": "Celery: the sorted set indexing ``unacked``",
    r"[A-Za-z0-9_.:@-]+\.reply\.celery\.pidbox": "Celery: a control reply queue per client",
}
# Celery's queues themselves are lists of waiting messages: gone when empty, never left over.


def echo_spec(**data: Any) -> dict[str, Any]:
    return {"taskType": "echo", "data": data or {"hello": "world"}}


def model(model_dir: Path) -> dict[str, Any]:
    return {"source": {"identifier": str(model_dir)}, "transformers": {"device_map": "cpu"}}


def inference_spec(model_dir: Path, **extra: Any) -> dict[str, Any]:
    return {"taskType": "inference", "model": model(model_dir),
            "data": {"type": "list", "items": ["Hello there", "a b c", "Question:"]},
            "inference": {"max_new_tokens": 3, "do_sample": False}, **extra}


def training_spec(task_type: str, model_dir: Path) -> dict[str, Any]:
    spec: dict[str, Any] = {"taskType": task_type, "model": model(model_dir),
                            "data": {"prompts": PAIRS, "separator": ""},
                            "training": {"max_steps": 2, "batch_size": 2, "save_steps": 1000}}
    if task_type == "lora_sft":
        spec["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0}
    return spec


def unbounded_keys(client: redis.Redis) -> dict[str, str]:
    """Keys with no TTL that no entry of ``BOUNDED`` accounts for: key → type."""
    patterns = [re.compile(p) for p in BOUNDED]
    found: dict[str, str] = {}
    for key in client.scan_iter(count=1000):
        if client.ttl(key) != -1 or any(p.fullmatch(key) for p in patterns):
            continue
        found[key] = str(client.type(key))
    return found


def test_every_key_left_after_every_task_type_expires_or_is_bounded(
        worker_factory, redis_client, tiny_model_dir: Path) -> None:
    from celery.result import AsyncResult

    from app.celery import app
    from pipelines import Pipeline
    from tasks import echo
    from tasks.control import cancel_task
    from tasks.submit import submit_task

    worker_factory("train,infer,a100,fast", env=WORKER_ENV)
    worker_factory(env=WORKER_ENV)

    def run(spec: dict[str, Any], timeout_s: float = 300) -> Any:
        return AsyncResult(submit_task(spec).task_id, app=app).get(timeout=timeout_s, propagate=False)

    run(echo_spec())
    run({**echo_spec(), "tags": ["a100"]})
    run({**echo_spec(), "resources": {"hardware": {"cpu": 1}}})  # a capability queue
    # A spec the worker refuses: a failed task (apply_async: submit_task would refuse it here).
    echo.apply_async(args=[{"taskType": "echo", "echo": {"bogus": 1}}]).get(timeout=60, propagate=False)
    slow = submit_task({**echo_spec(), "echo": {"sleep_s": 20, "steps": 40}})
    wait_for(lambda: AsyncResult(slow.task_id, app=app).state == "PROGRESS", 60, message="slow echo running")
    cancel_task(slow.task_id)
    AsyncResult(slow.task_id, app=app).get(timeout=60, propagate=False)
    run(inference_spec(tiny_model_dir))
    run(inference_spec(tiny_model_dir, parallel={"enabled": True, "max_shards": 2}))
    run(training_spec("sft", tiny_model_dir))
    run(training_spec("lora_sft", tiny_model_dir))
    Pipeline.from_dict({"apiVersion": "meshq/v1", "kind": "Pipeline", "metadata": {"name": "two"},
                        "spec": {"taskType": "echo", "stages": [
                            {"name": "one", "spec": {"data": {"x": "y"}}},
                            {"name": "two", "spec": {"data": {"prev": "${one.result.echo.data.x}"}}}]}}
                       ).submit().wait(timeout=120)
    Pipeline.from_dict({"apiVersion": "mloc/v1", "kind": "Pipeline", "metadata": {"name": "diamond"},
                        "spec": {"taskType": "echo", "graph": {"nodes": [
                            {"name": "a", "spec": {"data": {"q": "why?"}}},
                            {"name": "b", "dependsOn": ["a"], "spec": {"data": {"b": "${a.result.echo.data.q}"}}},
                            {"name": "c", "dependsOn": ["a"], "spec": {"data": {"c": 1}}},
                            {"name": "d", "dependsOn": ["b", "c"], "spec": {"data": {"d": 2}}}]}}}
                       ).submit().wait(timeout=120)

    leftover = unbounded_keys(redis_client)
    assert leftover == {}, f"keys with no expiry and no stated bound: {leftover}"
