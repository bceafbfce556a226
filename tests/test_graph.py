"""Graph pipelines with real Redis and real ``celery worker`` processes (echo nodes)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from celery.result import AsyncResult

from app.core.errors import PipelineError
from pipelines import Pipeline, PipelineRun
from pipelines.display import status_lines
from tests.conftest import wait_for


def node(name: str, *deps: str, **spec: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "spec": spec}
    if deps:
        entry["dependsOn"] = list(deps)
    return entry


def diamond(c_spec: dict[str, Any], b_sleep_s: float = 2.0) -> dict[str, Any]:
    return {"apiVersion": "mloc/v1", "kind": "Pipeline", "metadata": {"name": "diamond"},
            "spec": {"taskType": "echo", "graph": {"nodes": [
                node("a", data={"question": "why?"}),
                node("b", "a", data={"answer": "b says ${a.result.echo.data.question}"},
                     echo={"sleep_s": b_sleep_s, "steps": 4}),
                node("c", "a", **c_spec),
                node("d", "b", "c", data={"b": "${b.result.echo.data.answer}", "c": "${c.result.echo.data}",
                                          "question": "${a.result.echo.data.question}"}),
            ]}}}


def interval(result: dict[str, Any]) -> tuple[datetime, datetime]:
    return datetime.fromisoformat(result["started_at"]), datetime.fromisoformat(result["finished_at"])


def test_diamond_runs_b_and_c_at_once_on_two_workers(worker_factory, redis_client) -> None:
    worker_factory(worker_id="g1")
    worker_factory(worker_id="g2")
    c_spec = {"data": {"answer": "c says ${stage.result.echo.data.question}"}, "echo": {"sleep_s": 2.0, "steps": 4}}
    run = Pipeline.from_dict(diamond(c_spec)).submit()
    results = run.wait(timeout=120)
    assert list(results) == ["a", "b", "c", "d"]
    b, c, d = results["b"], results["c"], results["d"]
    # B and C ran at the same time, on different workers.
    assert {b["worker_id"], c["worker_id"]} == {"g1", "g2"}
    (b_start, b_end), (c_start, c_end) = interval(b), interval(c)
    assert b_start < c_end and c_start < b_end, (b, c)
    # D started after both and holds both outputs (and a result of a non-parent ancestor).
    assert interval(d)[0] >= max(b_end, c_end)
    assert d["echo"]["data"] == {"b": "b says why?", "c": {"answer": "c says why?"}, "question": "why?"}

    # Status shows nodes with their dependencies, from any process.
    status = PipelineRun.find(run.id).status()
    assert status["graph"] is True and status["state"] == "SUCCESS"
    assert {n: s["depends_on"] for n, s in status["stages"].items()} == {
        "a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]}


def test_a_failing_node_skips_its_dependants_and_running_nodes_finish(worker_factory, redis_client) -> None:
    w1 = worker_factory(worker_id="f1")
    w2 = worker_factory(worker_id="f2")
    # C fails at once (a field of A's result that does not exist), once "slow" ended: B runs by then.
    document = {"spec": {"taskType": "echo", "graph": {"nodes": [
        node("a", data={"question": "why?"}),
        node("b", "a", data={"answer": "b says ${a.result.echo.data.question}"}, echo={"sleep_s": 6, "steps": 6}),
        node("slow", "a", echo={"sleep_s": 2, "steps": 2}),
        node("c", "slow", data={"x": "${a.result.echo.data.nope}"}),
        node("d", "b", "c", data={"b": "${b.result.echo.data}", "c": "${c.result.echo.data}"})]}}}
    run = Pipeline.from_dict(document).submit()
    with pytest.raises(PipelineError) as info:
        run.wait(timeout=120)
    status = run.status()
    assert info.value.stage == "c" and "nope" in str(info.value), status
    assert status["state"] == "FAILURE" and status["failed_stage"] == "c"
    assert status["stages"]["c"]["error_field"] == "spec.graph.nodes[3].spec.data.x"
    # B finishes and keeps its result; D never runs.
    final = wait_for(lambda: (s := run.status())["stages"]["b"]["state"] == "SUCCESS" and s, 60,
                     message="b to finish")
    assert final["state"] == "FAILURE"
    assert final["stages"]["b"]["result"]["echo"]["data"] == {"answer": "b says why?"}
    d = final["stages"]["d"]
    assert d["state"] == "SKIPPED" and d["worker_id"] is None and "error" not in d
    for worker in (w1, w2):
        assert not (worker.results_dir / d["task_id"]).exists()


def test_references_that_multiply_results_fail_the_node_naming_the_limit(worker_factory, redis_client) -> None:
    """Five echo nodes, each referencing the whole result of the one before 8 times: each result is 8
    times the last. The node whose resolved spec would pass MAX_MESSAGE_BYTES (128 KiB here) fails
    before it runs, naming the limit; its dependant is skipped; nothing that big is stored."""
    limit = 128 * 1024
    worker_factory(worker_id="mul", env={"MESHQ_MAX_MESSAGE_BYTES": str(limit)})
    nodes = [node("n0", data={"text": "x" * 64})]
    for i in range(1, 5):
        nodes.append(node(f"n{i}", f"n{i - 1}", data={"copies": [f"${{n{i - 1}.result}}"] * 8}))
    run = Pipeline.from_dict({"spec": {"taskType": "echo", "graph": {"nodes": nodes}}}).submit()
    with pytest.raises(PipelineError) as info:
        run.wait(timeout=120)
    status = run.status()
    assert info.value.stage == "n3", status
    assert status["state"] == "FAILURE" and status["failed_stage"] == "n3"
    failed = status["stages"]["n3"]
    assert failed["error_type"] == "LimitExceeded" and f"MAX_MESSAGE_BYTES={limit}" in failed["error"]
    assert failed["error_field"].startswith("spec.graph.nodes[3].spec.data.copies[")
    assert status["stages"]["n2"]["state"] == "SUCCESS" and status["stages"]["n4"]["state"] == "SKIPPED"
    stored = {key: redis_client.strlen(key) for key in redis_client.keys("celery-task-meta-*")}
    assert stored and max(stored.values()) < limit, stored


def test_a_node_not_started_when_another_failed_is_skipped(worker_factory, redis_client) -> None:
    """One worker: C fails while B waits in the queue; B then never runs (SKIPPED)."""
    worker = worker_factory(worker_id="one")
    # c is sent before b (document order), so the one worker takes c first.
    document = {"spec": {"taskType": "echo", "graph": {"nodes": [
        node("a"), node("c", "a", data={"x": "${a.result.nope}"}), node("b", "a"), node("d", "b", "c")]}}}
    run = Pipeline.from_dict(document).submit()
    with pytest.raises(PipelineError):
        run.wait(timeout=60)
    b_id = next(s["task_id"] for s in run.stages if s["name"] == "b")
    # The worker took b after c failed, and b stopped itself before doing anything.
    wait_for(lambda: AsyncResult(b_id).state == "SKIPPED", 30, message="b to skip itself")
    final = run.status()
    assert final["state"] == "FAILURE" and final["failed_stage"] == "c"
    assert final["stages"]["b"]["state"] == final["stages"]["d"]["state"] == "SKIPPED"
    assert not (worker.results_dir / b_id / "responses.json").exists()


WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
QUESTIONS = ["Should we build solar?", "Should we build wind?"]


def briefing_graph(model_dir: Path) -> dict[str, Any]:
    def branch(name: str, stance: str) -> dict[str, Any]:
        return node(name, data={"type": "list", "items": QUESTIONS},
                    inference={"max_new_tokens": 5, "system_prompt": stance})

    return {"apiVersion": "mloc/v1", "kind": "InferenceTask", "metadata": {"name": "briefing"},
            "spec": {"taskType": "inference",
                     "model": {"source": {"identifier": str(model_dir)}, "transformers": {"device_map": "cpu"}},
                     "inference": {"max_new_tokens": 4},
                     "graph": {"nodes": [
                         branch("optimist", "You see the benefits."),
                         branch("pessimist", "You see the risks."),
                         node("synthesis", "optimist", "pessimist", data={"type": "graph_template", "template": {
                             "name": "two_column_briefing",
                             "columns": [{"label": "Benefits", "node": "optimist", "path": "items[*].output"},
                                         {"label": "Risks", "node": "pessimist", "path": "items[*].output"}],
                             "options": {"intro": "Weigh both sides.", "closing": "Answer briefly."}}}),
                         node("inline", "optimist", data={"type": "graph_template", "template": {
                             "text": "Summarise: {Pro}",
                             "columns": [{"label": "Pro", "expr": "optimist.items.0.output"}]}}),
                     ]}}}


def indent(item: dict[str, Any]) -> str:
    """An output as a briefing column shows it (continuation lines indented)."""
    return str(item["output"]).strip().replace("\n", "\n  ")


def test_graph_template_prompts_are_built_from_both_branches(worker_factory, redis_client,
                                                             tiny_model_dir: Path) -> None:
    worker_factory(worker_id="t1", env=WORKER_ENV)
    worker_factory(worker_id="t2", env=WORKER_ENV)
    results = Pipeline.from_dict(briefing_graph(tiny_model_dir)).submit().wait(timeout=300)
    optimist, pessimist = results["optimist"]["items"], results["pessimist"]["items"]
    prompts = [item["prompt"] for item in results["synthesis"]["items"]]
    assert prompts == [f"Weigh both sides.\n• Benefits: {indent(o)}\n• Risks: {indent(p)}\n"
                       "Answer briefly." for o, p in zip(optimist, pessimist, strict=True)]
    assert all(item["output"] is not None for item in results["synthesis"]["items"])
    assert [item["prompt"] for item in results["inline"]["items"]] == [f"Summarise: {optimist[0]['output']}"]


def test_cancel_stops_every_running_node_over_http(server_factory, worker_factory, redis_client) -> None:
    server = server_factory()
    worker_factory(worker_id="c1")
    worker_factory(worker_id="c2")
    long = {"echo": {"sleep_s": 60, "steps": 120}}
    document = {"spec": {"taskType": "echo", "graph": {"nodes": [
        node("a"), node("b", "a", **long), node("c", "a", **long), node("d", "b", "c")]}}}
    reply = requests.post(f"{server.base_url}/api/v1/tasks", json=document, timeout=30)
    assert reply.status_code == 202, reply.text
    submitted = reply.json()
    assert submitted["kind"] == "pipeline" and submitted["stages"]["d"]["depends_on"] == ["b", "c"]
    run = PipelineRun.get(submitted["id"])
    url = f"{server.base_url}/api/v1/pipelines/{run.id}"
    running = wait_for(lambda: (s := requests.get(url, timeout=10).json())["stages"]["b"]["state"] == "PROGRESS"
                       and s["stages"]["c"]["state"] == "PROGRESS" and s, 60, message="b and c to run")
    assert running["graph"] is True and running["state"] == "RUNNING"
    assert running["stages"]["d"] == {**running["stages"]["d"], "state": "PENDING", "depends_on": ["b", "c"]}
    # meshq status shows each node with what it waits for.
    lines = status_lines(run.status())
    assert any(line.split()[:2] == ["d", "PENDING"] and line.endswith("(after b, c)") for line in lines), lines
    reply = requests.post(f"{server.base_url}/api/v1/tasks/{run.id}/cancel", timeout=10)
    assert reply.status_code == 200 and reply.json()["cancel_requested"] is True
    ended = wait_for(lambda: (s := requests.get(url, timeout=10).json())["state"] == "CANCELLED" and s, 60,
                     message="the graph to be cancelled")
    assert {n: s["state"] for n, s in ended["stages"].items()} == {
        "a": "SUCCESS", "b": "REVOKED", "c": "REVOKED", "d": "SKIPPED"}
    assert {ended["stages"]["b"]["worker_id"], ended["stages"]["c"]["worker_id"]} <= {"c1", "c2", None}
    assert requests.get(f"{server.base_url}/api/v1/pipelines/nope", timeout=10).status_code == 404


def test_tags_and_run_on_per_node(worker_factory, redis_client) -> None:
    worker_factory("a", worker_id="ra")
    worker_factory("b", worker_id="rb")
    document = {"spec": {"taskType": "echo", "graph": {"nodes": [
        {"name": "first", "tags": ["a"], "spec": {"data": {"n": 1}}},
        {"name": "left", "dependsOn": ["first"], "tags": ["b"], "spec": {"data": {"n": "${first.result.echo.data.n}"}}},
        {"name": "right", "dependsOn": ["first"], "tags": ["b"], "spec": {}},
        # runOn wins over tags: the worker of "first" has no tag "b" but runs this node.
        {"name": "last", "dependsOn": ["left", "right"], "tags": ["b"], "runOn": {"node": "first"},
         "spec": {"data": {"where": "${first.result.worker_id}"}}}]}}}
    results = Pipeline.from_dict(document).submit().wait(timeout=120)
    assert {name: result["worker_id"] for name, result in results.items()} == {
        "first": "ra", "left": "rb", "right": "rb", "last": "ra"}
    assert results["last"]["echo"]["data"] == {"where": "ra"}


def test_the_graph_example_runs(worker_factory, redis_client, tiny_model_dir: Path) -> None:
    from pipelines import EXAMPLES_DIR

    worker_factory(worker_id="e1", env=WORKER_ENV)
    worker_factory(worker_id="e2", env=WORKER_ENV)
    pipeline = Pipeline.from_yaml(EXAMPLES_DIR / "graph_briefing.yaml", env={"MESHQ_MODEL": str(tiny_model_dir)})
    results = pipeline.submit().wait(timeout=300)
    assert len(results["optimist"]["shards"]) == 2
    prompts = [item["prompt"] for item in results["synthesis"]["items"]]
    assert len(prompts) == 4 and all(p.startswith("Weigh both sides") for p in prompts)
    assert results["optimist"]["items"][3]["output"].strip().replace("\n", "\n  ") in prompts[3]
