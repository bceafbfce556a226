"""``meshq demo``: the main job end to end on a private, throw-away deployment.

Until the pipeline work lands this runs the most complete real job that exists:
an embedded Redis, a real worker, an echo task with progress, its output files.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path


def run_demo(workdir: str | None = None) -> int:
    base = Path(workdir or tempfile.mkdtemp(prefix="meshq-demo-"))
    from app.local_cluster import LocalCluster

    with LocalCluster(base) as cluster:
        url = cluster.start_redis()
        os.environ["REDIS_URL"] = url
        print(f"[demo] embedded Redis at {url}")
        cluster.start_worker("demo-worker", tags="cpu", results_dir=base / "results")
        print("[demo] worker demo-worker ready (tags: cpu)")

        from app.celery import app
        from tasks.submit import submit_task

        submission = submit_task({"taskType": "echo", "tags": ["cpu"], "data": {"hello": "meshq"},
                                  "echo": {"message": "hi", "sleep_s": 2, "steps": 4}})
        print(f"[demo] submitted echo task {submission.task_id} to queue {submission.queue}")
        result = app.AsyncResult(submission.task_id)
        while not result.ready():
            if result.state == "PROGRESS":
                print(f"[demo] progress: {result.info}")
            time.sleep(0.5)
        print("[demo] result:", json.dumps(result.get(), indent=2))
        print("[demo] outputs:", sorted(p.name for p in (base / "results" / submission.task_id).iterdir()))
    return 0
