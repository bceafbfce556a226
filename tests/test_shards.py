"""Sharded inference: one task's prompts across real workers, merged in input order."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from celery.result import AsyncResult

from app.core.errors import PipelineError
from pipelines import Pipeline, PipelineRun
from pipelines.display import describe_progress
from tasks.executors.data import sample
from tasks.executors.shards import PromptRange, plan_shards
from tasks.shards import merge_results
from tests.conftest import wait_for

WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
PROMPTS = [f"Question {i}: {'why ' * (i % 7)}is the sky blue?" for i in range(64)]


def spec(model_dir: Path, prompts: list[str], **extra: Any) -> dict[str, Any]:
    return {"taskType": "inference",
            "model": {"source": {"identifier": str(model_dir)}, "transformers": {"device_map": "cpu"}},
            "data": {"type": "list", "items": prompts},
            "inference": {"max_new_tokens": 4, "do_sample": False}, **extra}


@pytest.mark.parametrize(("total", "shards", "sizes"), [(64, 4, [16, 16, 16, 16]), (10, 4, [3, 3, 2, 2]),
                                                        (3, 8, [1, 1, 1]), (1, 2, [1])])
def test_plan_shards_covers_every_prompt_once(total: int, shards: int, sizes: list[int]) -> None:
    plan = plan_shards(total, shards)
    assert [r.size for r in plan] == sizes
    assert plan[0].start == 0 and plan[-1].stop == total
    assert all(a.stop == b.start for a, b in zip(plan, plan[1:], strict=False))
    assert PromptRange.from_dict(plan[-1].as_dict()) == plan[-1]


def test_merge_orders_items_and_sums_usage() -> None:
    def shard(index: int, start: int, n: int, worker: str) -> dict[str, Any]:
        return {"shard": {"index": index, "count": 2, "start": start, "stop": start + n}, "worker_id": worker,
                "items": [{"index": start + i, "output": f"o{start + i}"} for i in range(n)],
                "usage": {"prompt_tokens": 10 * n, "completion_tokens": n, "total_tokens": 11 * n,
                          "num_requests": n, "latency_sec": 1.5}, "backend": "transformers", "batches": 1,
                "max_batch_size": n}

    merged = merge_results([shard(1, 3, 2, "w2"), shard(0, 0, 3, "w1")])
    assert [item["index"] for item in merged["items"]] == [0, 1, 2, 3, 4]
    assert merged["usage"] == {"prompt_tokens": 50, "completion_tokens": 5, "total_tokens": 55, "num_requests": 5}
    assert [(s["index"], s["worker_id"], s["items"], s["latency_sec"]) for s in merged["shards"]] == [
        (0, "w1", 3, 1.5), (1, "w2", 2, 1.5)]


def test_64_prompts_sharded_over_two_workers_equal_the_unsharded_run(worker_factory, redis_client,
                                                                       tiny_model_dir: Path) -> None:
    one = worker_factory(worker_id="s1", env=WORKER_ENV)
    two = worker_factory(worker_id="s2", env=WORKER_ENV)
    export = {"jsonl_export": {"path": "exports/all.jsonl",
                               "fields": {"prompt": {"from": "prompt"}, "completion": {"from": "output"}}}}
    sharded = Pipeline.from_dict(spec(tiny_model_dir, PROMPTS, parallel={"enabled": True, "max_shards": 4},
                                      postprocess=export)).submit()
    result = sharded.wait(timeout=300)["inference"]
    plain = Pipeline.from_dict(spec(tiny_model_dir, PROMPTS)).submit().wait(timeout=300)["inference"]

    # Same shape as an unsharded run, items in input order, greedy outputs identical.
    assert result["task_id"] == sharded.id
    assert [item["index"] for item in result["items"]] == list(range(64))
    assert [(i["prompt"], i["output"], i["finish_reason"]) for i in result["items"]] == [
        (i["prompt"], i["output"], i["finish_reason"]) for i in plain["items"]]
    for key in ("prompt_tokens", "completion_tokens", "total_tokens", "num_requests"):
        assert result["usage"][key] == plain["usage"][key], key
    # Four shards, both workers ran some.
    shards = result["shards"]
    assert [s["index"] for s in shards] == [0, 1, 2, 3] and [s["items"] for s in shards] == [16] * 4
    assert {s["worker_id"] for s in shards} == {"s1", "s2"}
    # The export was written once, by the merge, from all 64 items.
    assert result["jsonl_export"]["rows"] == 64
    merger = one if result["worker_id"] == "s1" else two
    rows = [json.loads(line) for line in Path(result["jsonl_export"]["path"]).read_text().splitlines()]
    assert Path(result["jsonl_export"]["path"]).is_relative_to(merger.results_dir / sharded.id)
    assert [r["completion"] for r in rows] == [i["output"] for i in plain["items"]]
    for worker in (one, two):
        assert not list(worker.results_dir.glob(f"{sharded.id}-shard*/exports"))
    stored = json.loads((merger.results_dir / sharded.id / "responses.json").read_text())
    assert stored["items"] == result["items"]
    # replicas means the same.
    replicas = Pipeline.from_dict(spec(tiny_model_dir, PROMPTS[:6], resources={"replicas": 2})).submit()
    assert len(replicas.wait(timeout=300)["inference"]["shards"]) == 2


def test_shuffled_shards_answer_each_prompt_once_and_carry_only_their_slice(worker_factory, redis_client,
                                                                            tiny_model_dir: Path) -> None:
    """``shuffle: true`` without a seed, in 4 shards: one seed for the whole task (recorded), so every
    prompt is answered exactly once, in the shuffled order; each shard's message (its stored
    arguments) and result hold its own prompts only, and the merge's none. Under a MAX_RESULT_BYTES
    of 4 KiB the merged result is kept as a file, and the merge's arguments (every shard's
    result) are not stored."""
    limit = 4096
    worker_factory(worker_id="u1", env={**WORKER_ENV, "MESHQ_MAX_RESULT_BYTES": str(limit)})
    prompts = PROMPTS[:20]
    document = spec(tiny_model_dir, prompts, parallel={"enabled": True, "max_shards": 4})
    document["data"]["shuffle"] = True
    run = Pipeline.from_dict(document).submit()
    reference = run.wait(timeout=300)["inference"]
    assert "items" not in reference and "items" in reference["result_file"]["omitted"]
    result = json.loads(Path(reference["result_file"]["path"]).read_text())
    assert result["shuffle_seed"] == reference["shuffle_seed"]
    answered = [item["prompt"] for item in result["items"]]
    assert sorted(answered) == sorted(prompts)
    assert [item["index"] for item in result["items"]] == list(range(20))
    assert answered == sample(prompts, shuffle=True, seed=result["shuffle_seed"]) != prompts
    for shard in result["shards"]:
        raw = redis_client.get(f"celery-task-meta-{shard['task_id']}")
        stored = json.loads(raw)
        mine = answered[shard["start"]:shard["stop"]]
        assert stored["args"][0]["data"] == {"type": "list", "items": mine}
        assert [item["prompt"] for item in stored["result"]["items"]] == mine
        assert not [p for p in prompts if p not in mine and p in raw]
    merge = json.loads(redis_client.get(f"celery-task-meta-{run.id}"))
    assert "items" not in merge["kwargs"]["spec"]["data"] and merge["kwargs"]["spec"]["data"]["shuffle"] is True
    assert merge["args"].endswith(f"not stored: more than MAX_RESULT_BYTES={limit}>"), merge["args"]
    assert redis_client.strlen(f"celery-task-meta-{run.id}") < 2 * limit


def test_a_failing_shard_fails_the_task_naming_the_shard(worker_factory, redis_client, tiny_model_dir: Path) -> None:
    worker_factory(worker_id="x1", env=WORKER_ENV)
    worker_factory(worker_id="x2", env=WORKER_ENV)
    # The last prompt is longer than the model's context: only the last shard fails.
    prompts = ["short one", "short two", "short three", "word " * 600]
    run = Pipeline.from_dict(spec(tiny_model_dir, prompts, parallel={"enabled": True, "max_shards": 2})).submit()
    with pytest.raises(PipelineError):
        run.wait(timeout=300)
    status = PipelineRun.find(run.id).status()
    stage = status["stages"]["inference"]
    assert status["state"] == "FAILURE" and stage["state"] == "FAILURE"
    assert stage["failed_shard"] == 1
    assert stage["error"].startswith(f"shard 1 of 2 (task {run.id}-shard1) failed: SpecError")
    assert stage["error_field"] == "spec.inference.max_new_tokens" and "prompt 3 has" in stage["error"]


def test_a_sharded_graph_node(worker_factory, redis_client, tiny_model_dir: Path) -> None:
    """A sharded node inside a chord header: its merge counts for the chord, the join reads it."""
    worker_factory(worker_id="n1", env=WORKER_ENV)
    worker_factory(worker_id="n2", env=WORKER_ENV)
    base = spec(tiny_model_dir, PROMPTS[:8])
    document = {"spec": {**{k: v for k, v in base.items() if k != "data"}, "graph": {"nodes": [
        {"name": "wide", "spec": {"data": base["data"], "parallel": {"enabled": True, "max_shards": 3}}},
        {"name": "narrow", "spec": {"data": {"type": "list", "items": PROMPTS[:2]}}},
        {"name": "join", "dependsOn": ["wide", "narrow"], "spec": {"data": {"type": "graph_template", "template": {
            "text": "{w} / {n}", "columns": [{"label": "w", "node": "wide", "path": "items[*].output"},
                                             {"label": "n", "node": "narrow", "path": "items.0.output"}]}}}}]}}}
    results = Pipeline.from_dict(document).submit().wait(timeout=300)
    wide = results["wide"]
    assert len(wide["shards"]) == 3 and [i["index"] for i in wide["items"]] == list(range(8))
    assert [i["prompt"] for i in results["join"]["items"]] == [
        f"{i['output']} / {results['narrow']['items'][0]['output']}" for i in wide["items"]]


def test_shard_progress_and_cancel_of_a_sharded_task(worker_factory, redis_client, tiny_model_dir: Path) -> None:
    """One worker: while it runs shard 0, status shows shards done/total; cancel stops every shard."""
    worker = worker_factory(worker_id="p1", env=WORKER_ENV)
    slow = spec(tiny_model_dir, PROMPTS, parallel={"enabled": True, "max_shards": 2})
    slow["inference"].update(max_new_tokens=48, batch_size=1)
    run = Pipeline.from_dict(slow).submit()

    def sharding() -> dict[str, Any] | None:
        stage = run.status()["stages"]["inference"]
        progress = stage.get("progress") or {}
        return stage if progress.get("shards_total") == 2 and progress.get("shards_running") == 1 else None

    stage = wait_for(sharding, 120, interval_s=0.2, message="the shards to run")
    assert stage["state"] == "PROGRESS" and stage["progress"]["shards_done"] == 0
    assert stage["progress"]["total"] == 64
    assert "shards 0/2" in describe_progress(stage["progress"])
    run.cancel()
    ended = wait_for(lambda: (s := run.status())["state"] == "CANCELLED" and s, 120, message="the cancel")
    assert ended["stages"]["inference"]["state"] == "REVOKED"
    states = {i: AsyncResult(f"{run.id}-shard{i}").state for i in range(2)}
    assert states == {0: "REVOKED", 1: states[1]} and states[1] in ("REVOKED", "PENDING")
    assert not (worker.results_dir / f"{run.id}-shard1" / "responses.json").exists() or states[1] == "REVOKED"


def test_a_shard_whose_worker_dies_is_redelivered(worker_factory, redis_client, tiny_model_dir: Path) -> None:
    """The worker running shard 0 is SIGKILLed; the other worker runs shard 0 again, the task completes."""
    env = {**WORKER_ENV, "MESHQ_VISIBILITY_TIMEOUT_S": "4"}
    workers = {w.worker_id: w for w in (worker_factory(worker_id="k1", env=env), worker_factory(worker_id="k2", env=env))}
    slow = spec(tiny_model_dir, PROMPTS[:32], parallel={"enabled": True, "max_shards": 2})
    slow["inference"].update(max_new_tokens=64, batch_size=1)
    run = Pipeline.from_dict(slow).submit()
    shards = [AsyncResult(f"{run.id}-shard{i}") for i in range(2)]
    wait_for(lambda: all(s.state == "PROGRESS" for s in shards), 120, interval_s=0.1, message="both shards to run")
    victim_id = shards[0].info["worker_id"]
    heir_id = next(w for w in workers if w != victim_id)
    workers[victim_id].kill()
    result = run.wait(timeout=300)["inference"]
    assert [item["index"] for item in result["items"]] == list(range(32))
    assert [s["worker_id"] for s in result["shards"]] == [heir_id, heir_id] and result["worker_id"] == heir_id
    assert redis_client.get(f"meshq:task:{run.id}-shard0:runs") == "2"  # the killed run and the one that ended
    assert workers[heir_id].alive()


def test_shards_and_merge_route_like_the_task(worker_factory, redis_client, tiny_model_dir: Path) -> None:
    """A task that needs a tag, or hardware (a capability queue ``tasks.need.*``): its shards and
    its merge run only on the worker that has it."""
    gib = 1024**3
    a100 = {"gpus": [{"name": "NVIDIA A100-SXM4-80GB", "memory_total_bytes": 80 * gib}], "cpu_count": 16}
    worker_factory("", worker_id="small", env=WORKER_ENV)
    worker_factory("big", worker_id="large", env={**WORKER_ENV, "MESHQ_FAKE_HARDWARE": json.dumps(a100)})
    tagged = spec(tiny_model_dir, PROMPTS[:9], tags=["big"], parallel={"enabled": True, "max_shards": 3})
    needs_gpu = spec(tiny_model_dir, PROMPTS[:9], resources={"replicas": 3, "hardware": {"gpu": {
        "count": 1, "type": "nvidia-a100-80gb"}}})
    for document in (tagged, needs_gpu):
        run = Pipeline.from_dict(document).submit()
        result = run.wait(timeout=300)["inference"]
        assert [s["worker_id"] for s in result["shards"]] == ["large"] * 3 and result["worker_id"] == "large"
    assert redis_client.hget("worker:small", "last_task") in (None, "")


def test_a_sharded_task_delivers_once_to_an_http_destination(server_factory, worker_factory, redis_client,
                                                             tiny_model_dir: Path) -> None:
    """The merge uploads the export and posts the merged result; the shards deliver nothing."""
    import requests

    server = server_factory()
    env = {**WORKER_ENV, "ORCHESTRATOR_BASE_URL": server.base_url}
    worker_factory(worker_id="h1", env=env)
    worker_factory(worker_id="h2", env=env)
    export = {"jsonl_export": {"path": "all.jsonl", "fields": {"completion": {"from": "output"}}}}
    run = Pipeline.from_dict(spec(tiny_model_dir, PROMPTS[:8], parallel={"enabled": True, "max_shards": 2},
                                  postprocess=export, output={"destination": {"type": "http"}})).submit()
    result = run.wait(timeout=300)["inference"]
    assert result["jsonl_export"]["url"] == f"{server.base_url}/api/v1/results/{run.id}/files/all.jsonl"
    posted = requests.get(f"{server.base_url}/api/v1/results/{run.id}", timeout=10).json()
    assert posted["source"] == "envelope" and len(posted["result"]["shards"]) == 2
    assert [i["index"] for i in posted["result"]["items"]] == list(range(8))
    for shard in result["shards"]:
        assert requests.get(f"{server.base_url}/api/v1/results/{shard['task_id']}", timeout=10).json()[
            "source"] == "celery"  # no envelope: a shard delivers nothing
