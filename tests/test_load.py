"""Load: 2,000 echo tasks over 2 workers and 3 tag queues — none lost, none duplicated."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from celery.result import ResultSet

N_TASKS = 2000


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_thousand_tasks_none_lost_none_duplicated(worker_factory, redis_client, tmp_path: Path) -> None:
    from tasks import echo

    first = worker_factory("a,b", worker_id="load-ab")
    second = worker_factory("b,c", worker_id="load-bc")
    queues = ["tasks.a", "tasks.b", "tasks.c"]
    may_run_on = {"tasks.a": {"load-ab"}, "tasks.b": {"load-ab", "load-bc"}, "tasks.c": {"load-bc"}}
    sent = []
    for i in range(N_TASKS):
        queue = queues[i % 3]
        result = echo.apply_async(args=[{"taskType": "echo", "data": {"i": i, "queue": queue}}], queue=queue)
        sent.append((i, queue, result))
    values = ResultSet([r for _, _, r in sent]).join_native(timeout=600, propagate=True)
    assert len(values) == N_TASKS

    results_dirs = {"load-ab": first.results_dir, "load-bc": second.results_dir}
    for (i, queue, result), value in zip(sent, values, strict=True):
        assert value["echo"]["data"] == {"i": i, "queue": queue}
        assert value["worker_id"] in may_run_on[queue]
        task_dir = results_dirs[value["worker_id"]] / result.id
        assert json.loads((task_dir / "responses.json").read_text()) == value
        manifest = json.loads((task_dir / "manifest.json").read_text())
        [entry] = manifest["files"]
        assert entry["sha256"] == hashlib.sha256((task_dir / "responses.json").read_bytes()).hexdigest()

    # None duplicated: every task's executor ran exactly once, and each output
    # directory exists on exactly one worker.
    pipe = redis_client.pipeline(transaction=False)
    for _, _, result in sent:
        pipe.get(f"meshq:task:{result.id}:runs")
    assert set(pipe.execute()) == {"1"}
    dirs_ab = {p.name for p in first.results_dir.iterdir()}
    dirs_bc = {p.name for p in second.results_dir.iterdir()}
    assert not dirs_ab & dirs_bc
    assert dirs_ab | dirs_bc == {r.id for _, _, r in sent}
    assert dirs_ab and dirs_bc  # both workers took part
    for queue in queues:
        assert redis_client.llen(queue) == 0
