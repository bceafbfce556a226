"""The pool process's share of a task, in one process: CPU per task of Celery's tracer.

A prefork worker's pool process runs each task through Celery's tracer
(``celery.app.trace.fast_trace_task``: signals, the task, the result store). This bench
runs exactly that path over real messages — sent with ``apply_async``, read back from
the queue and turned into Celery's ``Request`` as a worker's consumer does — for a bare
Celery no-op (``bench/bare_app.py``) and for meshq's echo task, each side in a process of
its own, and reports CPU per task (``time.process_time``). No worker, no pipe to a main
process, no scheduling: changes of ~5% show here, where ``bench/dispatch.py``'s
throughput moves ±20% between rounds on a shared machine. What it leaves out (the
worker's main process, the client, Redis) ``bench/dispatch.py`` measures.

The Redis is a private embedded one; the queues are the bench's own (``meshq-bench-<hex>``).

    python bench/pool_path.py [--tasks 1000] [--repeats 7] [--runs 2] [--results-dir /dev/shm]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIDES = ("bare", "meshq")
LABELS = {"bare": "bare Celery no-op", "meshq": "meshq echo"}


def measure(side: str, tasks: int, repeats: int) -> list[float]:
    """CPU µs per task of ``side``'s pool path, once per repeat (in this process; the
    environment names the Redis, the queue and RESULTS_DIR)."""
    from celery.app import trace
    from celery.concurrency.prefork import process_initializer
    from celery.worker.request import Request

    queue = os.environ["MESHQ_BENCH_QUEUE"]
    if side == "bare":
        from bench.bare_app import app, noop

        def send(i: int) -> Any:
            return noop.apply_async(args=[{"i": i}], queue=queue)
    else:
        from app.celery import app
        from tasks import echo

        def send(i: int) -> Any:
            return echo.apply_async(args=[{"taskType": "echo", "data": {"i": i}}], queue=queue)

    hostname = f"{queue}@bench"
    process_initializer(app, hostname)  # what a pool process runs when it starts
    trace.setup_worker_optimizations(app, hostname)

    def queued(n: int) -> tuple[list[Any], list[Request]]:
        sent = [send(i) for i in range(n)]
        requests: list[Request] = []
        with app.connection_for_read() as connection:
            inbox = connection.SimpleQueue(queue, no_ack=True)
            while len(requests) < n:
                message = inbox.get(timeout=10)
                requests.append(Request(message, app=app, hostname=hostname, task=app.tasks[message.headers["task"]]))
        return sent, requests

    def run(requests: list[Request]) -> float:
        gc.collect()
        started = time.process_time()
        for request in requests:
            trace.fast_trace_task(request.task_name, request.id, request.request_dict, request.body,
                                  request.content_type, request.content_encoding)
        return (time.process_time() - started) * 1e6 / len(requests)

    run(queued(50)[1])  # warm: connections, imports, the executor
    per_task = []
    for _ in range(repeats):
        sent, requests = queued(tasks)
        per_task.append(run(requests))
        failed = [result for result in sent if result.state != "SUCCESS"]
        if failed:
            raise SystemExit(f"{side}: {len(failed)} of {tasks} tasks did not succeed: "
                             f"{failed[0].state} {failed[0].result!r}")
    return per_task


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=7, help="measured passes per run (the median is kept)")
    parser.add_argument("--runs", type=int, default=2, help="alternating runs of each side, each a new process")
    parser.add_argument("--results-dir", default=None,
                        help="parent of meshq's RESULTS_DIR (default: the system temp dir; /dev/shm leaves the disk out)")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # one run, in this process
    args = parser.parse_args()
    if args.side:
        print(json.dumps(measure(args.side, args.tasks, args.repeats)))
        return 0

    from cli.embedded_redis import EmbeddedRedis

    if os.environ.get("REDIS_URL"):
        print("bench: REDIS_URL is ignored; a private embedded Redis is used")
    server = EmbeddedRedis().start()
    medians: dict[str, list[float]] = {side: [] for side in SIDES}
    try:
        with tempfile.TemporaryDirectory(prefix="meshq-bench-pool-", dir=args.results_dir) as results:
            for run_no in range(args.runs):
                for side in SIDES if run_no % 2 == 0 else tuple(reversed(SIDES)):
                    topic = f"meshq-bench-{secrets.token_hex(4)}"
                    env = {**os.environ, "PYTHONPATH": str(ROOT), "REDIS_URL": server.url, "TASK_TOPIC": topic,
                           "MESHQ_BENCH_QUEUE": topic, "MESHQ_BENCH_BARE_QUEUE": topic,
                           "WORKER_ID": f"{topic}-w0", "RESULTS_DIR": str(Path(results) / topic),
                           "MESHQ_LOG_FILE": str(Path(results) / f"{topic}.log"), "LOG_LEVEL": "ERROR"}
                    done = subprocess.run([sys.executable, __file__, "--side", side, "--tasks", str(args.tasks),
                                           "--repeats", str(args.repeats)],
                                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
                    if done.returncode != 0:
                        raise SystemExit(f"{side} run failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
                    per_task = json.loads(done.stdout.strip().splitlines()[-1])
                    medians[side].append(statistics.median(per_task))
                    print(f"run {run_no + 1} {LABELS[side]:<20} CPU µs per task "
                          f"{', '.join(f'{value:.0f}' for value in per_task)}", flush=True)
    finally:
        server.stop()
    print(f"\npool path: {args.tasks} tasks × {args.repeats} passes, {args.runs} run(s) a side, medians")
    print(f"{'':<22}{'CPU µs per task':>18}")
    for side in SIDES:
        print(f"{LABELS[side]:<22}{statistics.median(medians[side]):>18.0f}")
    print(f"meshq / bare: {statistics.median(medians['meshq']) / statistics.median(medians['bare']):.2f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
