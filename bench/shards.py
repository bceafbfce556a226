"""Sharded inference benchmark: one worker on one core vs two workers on one core each.

512 prompts of mixed length on a tiny Llama (``--size``, default ``bench``, ~30M
parameters), CPU, float32, greedy, one task with ``parallel: {enabled: true,
max_shards: 2}``, through real ``celery worker`` processes and a private embedded Redis:

1. one worker pinned to one core (``sched_setaffinity``) runs the sharded task (its two
   shards one after the other);
2. a second worker pinned to another core joins; the same task runs again, one shard
   on each worker.

Each worker has one torch thread (``OMP_NUM_THREADS=1``), so each side has exactly the
compute it is said to have; both workers are warmed (model loaded) by a small task
pinned to each before anything is timed. Time is client-side, submit to merged
result. Target: two workers ≥ 1.7× the throughput of one; the outputs must be
identical.

    python bench/shards.py [--prompts 512] [--max-new-tokens 8] [--size bench] [--shards 2]

On a machine with fewer free cores than workers the two sides share cores and the
speed-up says so (the table shows the cores used). On a GPU machine
``--device cuda`` pins each worker to its own GPU (``CUDA_VISIBLE_DEVICES``) instead.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from bench.inference import inference_spec, make_prompts, model_dir, print_table, verdict  # noqa: E402

TARGET_SPEEDUP = 1.7


def start_worker(cluster: Any, worker_id: str, core: int | None, gpu: int | None) -> subprocess.Popen[bytes]:
    """A ``celery worker`` pinned to ``core`` (and ``gpu``), one torch thread."""
    extra = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
             "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))}
    if gpu is not None:
        extra["CUDA_VISIBLE_DEVICES"] = str(gpu)
    env = cluster.env(WORKER_ID=worker_id, WORKER_TAGS="", RESULTS_DIR=str(cluster.workdir / f"results-{worker_id}"),
                      MESHQ_LOG_FILE=str(cluster.workdir / f"worker-{worker_id}.log"), **extra)
    argv = [sys.executable, "-m", "celery", "-A", "app", "worker", "--loglevel", "INFO",
            "--without-mingle", "--without-gossip"]
    if core is not None:
        argv = ["taskset", "-c", str(core), *argv]  # the pool child inherits the affinity
    process = cluster.spawn(f"worker-{worker_id}-stdout", argv, env)
    cluster.wait_worker(worker_id, process)
    return process


def sharded_spec(model: Path, prompts: list[str], max_new_tokens: int, shards: int, device: str) -> dict[str, Any]:
    spec = inference_spec(model, prompts, max_new_tokens, device=device)
    spec["parallel"] = {"enabled": True, "max_shards": shards}
    return spec


def timed_run(spec: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    from app.celery import app
    from tasks.submit import submit_task

    started = time.perf_counter()
    result = app.AsyncResult(submit_task(spec).task_id).get(timeout=3600)
    return time.perf_counter() - started, result


def warm(model: Path, worker_id: str, device: str) -> None:
    """Load the model on ``worker_id`` (a small task on its own queue), so loading is not timed."""
    from app.celery import app
    from tasks.submit import submit_task

    spec = inference_spec(model, make_prompts(4, seed=9), 2, device=device)
    app.AsyncResult(submit_task(spec, worker_id=worker_id).task_id).get(timeout=900)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--size", default="bench", help="tiny model size (cli/tiny_model.py)")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args(argv)

    from cli.local_cluster import LocalCluster

    cores = sorted(os.sched_getaffinity(0))
    pin = [cores[0], cores[1 % len(cores)]] if args.device == "cpu" else [None, None]
    gpus = [0, 1] if args.device == "cuda" else [None, None]
    if args.device == "cuda":
        import torch

        if torch.cuda.device_count() < 2:
            gpus = [0, 0]  # one GPU: both workers share it (the table says so)
    model = model_dir(args.size)
    prompts = make_prompts(args.prompts)
    spec = sharded_spec(model, prompts, args.max_new_tokens, args.shards, args.device)

    with LocalCluster(Path(tempfile.mkdtemp(prefix="meshq-bench-shards-"))) as cluster:
        # Redis first: the Celery client in this process reads REDIS_URL when first imported.
        os.environ["REDIS_URL"] = cluster.start_redis()
        print(f"one worker (core {pin[0]}): {args.prompts} prompts x {args.max_new_tokens} tokens, "
              f"{args.shards} shards ...", flush=True)
        start_worker(cluster, "bench-shard-1", pin[0], gpus[0])
        warm(model, "bench-shard-1", args.device)
        one_s, one = timed_run(spec)
        print(f"two workers (cores {pin[0]}, {pin[1]}) ...", flush=True)
        start_worker(cluster, "bench-shard-2", pin[1], gpus[1])
        warm(model, "bench-shard-2", args.device)
        two_s, two = timed_run(spec)

    tokens = one["usage"]["completion_tokens"]
    speedup = one_s / two_s
    identical = [i["output"] for i in one["items"]] == [i["output"] for i in two["items"]]
    workers_used = sorted({s["worker_id"] for s in two["shards"]})
    where = (f"cores {pin[0]} and {pin[1]}" if args.device == "cpu" else f"GPUs {gpus[0]} and {gpus[1]}")
    shared = pin[0] == pin[1] if args.device == "cpu" else gpus[0] == gpus[1]
    rows = [("run", "wall", "throughput", ""),
            (f"1 worker ({where.split(' and ')[0].replace('cores', 'core').replace('GPUs', 'GPU')}), "
             f"{len(one['shards'])} shards",
             f"{one_s:.2f} s", f"{len(prompts) / one_s:,.1f} prompts/s  {tokens / one_s:,.1f} tok/s", ""),
            (f"2 workers ({where}), shards on {', '.join(workers_used)}",
             f"{two_s:.2f} s", f"{len(prompts) / two_s:,.1f} prompts/s  {tokens / two_s:,.1f} tok/s", ""),
            ("speed-up with 2 workers", f"{speedup:.2f}x", f">= {TARGET_SPEEDUP}x", verdict(speedup >= TARGET_SPEEDUP)),
            ("outputs identical (1 vs 2 workers)", "yes" if identical else "NO", "yes", verdict(identical))]
    if shared:
        rows.append(("note", f"only one {'core' if args.device == 'cpu' else 'GPU'} here: both workers share it",
                     "", ""))
    print_table(f"Sharded inference ({args.size} model, {args.device}, one torch thread per worker, "
                f"machine load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)", rows)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
