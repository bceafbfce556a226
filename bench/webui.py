"""The web view's pages over a large graph and a large fleet: time to answer, and memory.

Writes fake records into a private embedded Redis (a graph of ``--nodes`` nodes in
layers of 8, each node after two of the layer before, with results, progress and loss
curves; ``--workers`` workers with 8 GPUs each, every 10th dead), starts a real
``meshq serve`` and times ``--repeat`` requests of each page on loopback (a request's
time there bounds the server's time from above). Then it polls the graph page's live
part ``--polls`` times, as an open browser tab does, and reads the server's RSS
before and after each quarter of them. Target: each page under 1 s; RSS growth under 10 MB.

    python bench/webui.py [--nodes 64] [--workers 100] [--repeat 20] [--polls 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGET_S = 1.0
LAYER = 8
GIB = 1024 ** 3


def record_fake_graph(client: Any, nodes: int = 64) -> str:
    """A graph pipeline of ``nodes`` nodes with stored Celery results (half done, some
    running, the rest waiting); returns its id. A result carries a ``headers`` value
    that the page must not show."""
    from app.celery import app
    from app.core.events import utc_now_iso
    from pipelines import PipelineRun

    stages = []
    for index in range(nodes):
        layer, position = divmod(index, LAYER)
        depends_on = [] if layer == 0 else [f"n{(layer - 1) * LAYER + p:03d}"
                                            for p in sorted({position, (position + 1) % LAYER})]
        stages.append({"name": f"n{index:03d}", "task_id": str(uuid.uuid4()),
                       "taskType": "lora_sft" if position == 0 else "echo", "queue": "tasks", "run_on": None,
                       "depends_on": depends_on})
    run = PipelineRun(id=str(uuid.uuid4()), name=f"bench-graph-{nodes}", stages=stages,
                      submitted_at=utc_now_iso(), is_graph=True,
                      document={"metadata": {"name": f"bench-graph-{nodes}", "owner": "bench", "project": "webui"}})
    run.record(client, 3600)
    pipe = client.pipeline(transaction=False)
    for index, stage in enumerate(stages):
        training = stage["taskType"] == "lora_sft"
        if index < nodes // 2:
            result: dict[str, Any] = {"worker_id": f"w{index % 7:03d}", "runtime_sec": 12.5,
                                      "destination": {"headers": {"Authorization": "Bearer s3cret"}},
                                      "slo": {"seconds": 10, "runtime_sec": 12.5, "exceeded": True}}
            if training:
                result["loss_history"] = [[step, 3.0 / (1 + step / 10)] for step in range(1, 200, 4)]
            meta = {"status": "SUCCESS", "result": result, "date_done": utc_now_iso()}
        elif index < nodes // 2 + LAYER:
            progress = ({"step": 40, "total_steps": 100, "loss": 1.2, "worker_id": "w001"} if training
                        else {"done": 3, "total": 10, "tokens_per_s": 123.4, "worker_id": "w002"})
            meta = {"status": "PROGRESS", "result": progress}
        else:
            continue  # PENDING: nothing stored yet
        pipe.set(app.backend.get_key_for_task(stage["task_id"]),
                 json.dumps({"task_id": stage["task_id"], **meta}), ex=3600)
    pipe.execute()
    return run.id


def record_fake_fleet(client: Any, workers: int = 100, dead_every: int = 10, prefix: str = "fake") -> None:
    """``workers`` worker records (``<prefix>-w000``...) with 8 GPUs each; every
    ``dead_every``-th has no heartbeat."""
    from app.core.events import utc_now_iso

    pipe = client.pipeline(transaction=False)
    for index in range(workers):
        worker_id = f"{prefix}-w{index:03d}"
        gpus = [{"index": g, "name": "NVIDIA H100 80GB HBM3", "memory_total_bytes": 80 * GIB} for g in range(8)]
        readings = [{"index": g, "utilization_percent": (index + g) % 100, "memory_used_bytes": 40 * GIB,
                     "memory_total_bytes": 80 * GIB} for g in range(8)]
        tags = ["gpu", "h100"] if index % 2 else ["cpu"]
        pipe.hset(f"worker:{worker_id}", mapping={
            "worker_id": worker_id, "status": "RUNNING" if index % 3 else "IDLE", "started_at": utc_now_iso(),
            "pid": "1", "env_json": json.dumps({"ORCHESTRATOR_TOKEN": "set"}),
            "hardware_json": json.dumps({"hostname": f"node{index}", "cpu_count": 64,
                                         "memory_total_bytes": 512 * GIB, "gpus": gpus}),
            "tags_json": json.dumps(tags), "queues_json": json.dumps(["tasks", *(f"tasks.{t}" for t in tags)]),
            "capabilities_json": "{}", "metrics_json": json.dumps({"cpu_percent": 50.0, "memory_percent": 30.0,
                                                                   "gpus": readings}),
            "last_seen": utc_now_iso(), "current_task": str(uuid.uuid4()) if index % 3 else "",
            "last_task": "", "cost_per_hour": "0"})
        pipe.sadd("workers:ids", worker_id)
        if dead_every and index % dead_every == dead_every - 1:
            pipe.delete(f"worker:{worker_id}:hb")
        else:
            pipe.setex(f"worker:{worker_id}:hb", 120, utc_now_iso())
    pipe.execute()


def timed_get(url: str) -> float:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as reply:
        reply.read()
        if reply.status != 200:
            raise SystemExit(f"{url}: {reply.status}")
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=64)
    parser.add_argument("--workers", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--polls", type=int, default=1000)
    args = parser.parse_args()

    from cli.embedded_redis import EmbeddedRedis, free_port

    work = Path(tempfile.mkdtemp(prefix="bench-webui-"))
    with EmbeddedRedis() as redis_server:
        os.environ["REDIS_URL"] = redis_server.url  # before app.celery reads the settings
        import redis

        client = redis.Redis.from_url(redis_server.url, decode_responses=True)
        pipeline_id = record_fake_graph(client, args.nodes)
        record_fake_fleet(client, args.workers)
        port = free_port()
        env = {**os.environ, "LOG_LEVEL": "WARNING"}
        env.pop("ORCHESTRATOR_TOKEN", None)
        with open(work / "server.log", "wb") as log:
            server = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--port", str(port),
                                       "--results-dir", str(work / "results")], cwd=ROOT, env=env,
                                      stdout=log, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                try:
                    timed_get(f"{base}/healthz")
                    break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"server did not start:\n{(work / 'server.log').read_text()}") from None
                    time.sleep(0.1)
            pages = {f"graph page ({args.nodes} nodes)": f"{base}/ui/pipelines/{pipeline_id}",
                     "graph page, live part": f"{base}/ui/pipelines/{pipeline_id}?fragment=1",
                     f"workers page ({args.workers} workers)": f"{base}/ui/workers",
                     "pipelines list": f"{base}/ui/"}
            print(f"{'page':<34} {'median s':>9} {'max s':>8}  under {TARGET_S:g} s")
            worst = 0.0
            for label, url in pages.items():
                timed_get(url)  # warm: templates compiled, connections open
                times = [timed_get(url) for _ in range(args.repeat)]
                worst = max(worst, statistics.median(times))
                print(f"{label:<34} {statistics.median(times):>9.3f} {max(times):>8.3f}  "
                      f"{'yes' if statistics.median(times) < TARGET_S else 'NO'}")
            process = psutil.Process(server.pid)
            live = pages["graph page, live part"]
            for _ in range(50):
                timed_get(live)
            before = process.memory_info().rss
            readings = []
            for _quarter in range(4):
                for _ in range(args.polls // 4):
                    timed_get(live)
                readings.append(process.memory_info().rss)
            growth_mb = (readings[-1] - before) / 1e6
            print(f"server RSS over {args.polls} polls, by quarter: {before / 1e6:.1f} MB -> "
                  f"{' -> '.join(f'{r / 1e6:.1f}' for r in readings)} MB ({growth_mb:+.1f} MB)")
        finally:
            server.terminate()
            server.wait(timeout=15)
    return 0 if worst < TARGET_S and growth_mb < 10 else 1


if __name__ == "__main__":
    sys.exit(main())
