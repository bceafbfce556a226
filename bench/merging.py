"""Task merging benchmark: 256 one-prompt tasks vs one task of the same 256 prompts.

One worker (one core, one torch thread), a tiny Llama (``--size``, default ``bench``),
greedy, every prompt generating ``--max-new-tokens`` tokens (``ignore_eos``), through a
real ``celery worker`` and a private embedded Redis. Each side runs on a fresh worker of
its own, the model loaded before anything is timed:

1. merging off (``MESHQ_MERGE_WINDOW_MS=0``, what meshq did before): the single task,
   then the 256 tasks sent at once with plain ``apply_async``;
2. merging on (``--window-ms``, default the setting's default): the same.

Throughput is completion tokens per second, client-side, from the first send to the last
result. Target: merged 256 tasks ≥ 0.7× the single task's tokens/s. Then a lone task (no
other task waiting) ``--lone`` times on each side: its median latency with merging on may
exceed the one with merging off by at most the window + 10 ms.

    python bench/merging.py [--tasks 256] [--max-new-tokens 8] [--size bench] [--window-ms 20]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from bench.inference import inference_spec, make_prompts, model_dir, print_table, verdict  # noqa: E402
from bench.shards import start_worker, warm  # noqa: E402

TARGET_RATIO = 0.7
LATENCY_SLACK_MS = 10.0


def spec_of(model: Path, prompts: list[str], max_new_tokens: int, device: str) -> dict[str, Any]:
    spec = inference_spec(model, prompts, max_new_tokens, device=device)
    spec["inference"]["ignore_eos"] = True  # every prompt: the same number of tokens on both sides
    return spec


def run_side(cluster: Any, worker_id: str, window_ms: int, core: int | None, model: Path, prompts: list[str],
             args: argparse.Namespace) -> dict[str, Any]:
    """Single task, many tasks and lone-task latencies on a fresh worker with ``window_ms``."""
    from tasks import inference

    os.environ["MESHQ_MERGE_WINDOW_MS"] = str(window_ms)  # read by the worker started below
    process = start_worker(cluster, worker_id, core, None)
    try:
        warm(model, worker_id, args.device)
        started = time.perf_counter()
        single = inference.apply_async(args=[spec_of(model, prompts, args.max_new_tokens, args.device)])
        single_result = single.get(timeout=3600)
        single_s = time.perf_counter() - started

        started = time.perf_counter()
        handles = [inference.apply_async(args=[spec_of(model, [p], args.max_new_tokens, args.device)])
                   for p in prompts]
        many = [h.get(timeout=3600) for h in handles]
        many_s = time.perf_counter() - started

        lone = []
        for i in range(args.lone):
            started = time.perf_counter()
            inference.apply_async(args=[spec_of(model, [prompts[i]], args.max_new_tokens, args.device)]).get(
                timeout=600)
            lone.append(time.perf_counter() - started)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
    outputs_single = [item["output"] for item in single_result["items"]]
    outputs_many = [r["items"][0]["output"] for r in many]
    return {"single_s": single_s, "single_tokens": single_result["usage"]["completion_tokens"],
            "many_s": many_s, "many_tokens": sum(r["usage"]["completion_tokens"] for r in many),
            "merged_with": [r.get("merged_with", 1) for r in many],
            "identical": outputs_single == outputs_many, "lone_ms": statistics.median(lone) * 1000}


def main(argv: list[str] | None = None) -> int:
    from app.core.settings import DEFAULT_MERGE_WINDOW_MS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--size", default="bench", help="tiny model size (cli/tiny_model.py)")
    parser.add_argument("--window-ms", type=int, default=DEFAULT_MERGE_WINDOW_MS)
    parser.add_argument("--lone", type=int, default=15, help="lone tasks timed on each side")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args(argv)

    from cli.local_cluster import LocalCluster

    core = sorted(os.sched_getaffinity(0))[0] if args.device == "cpu" else None
    model = model_dir(args.size)
    prompts = make_prompts(args.tasks)
    with LocalCluster(Path(tempfile.mkdtemp(prefix="meshq-bench-merging-"))) as cluster:
        os.environ["REDIS_URL"] = cluster.start_redis()  # before the Celery client is imported
        print(f"merging off: 1 task of {args.tasks} prompts, then {args.tasks} tasks of 1 prompt ...", flush=True)
        off = run_side(cluster, "bench-merge-off", 0, core, model, prompts, args)
        print(f"merging on (window {args.window_ms} ms): the same ...", flush=True)
        on = run_side(cluster, "bench-merge-on", args.window_ms, core, model, prompts, args)

    def tps(tokens: int, seconds: float) -> str:
        return f"{tokens / seconds:,.1f} tok/s ({seconds:.2f} s)"

    ratio_off = (off["many_tokens"] / off["many_s"]) / (off["single_tokens"] / off["single_s"])
    ratio_on = (on["many_tokens"] / on["many_s"]) / (on["single_tokens"] / on["single_s"])
    extra_ms = on["lone_ms"] - off["lone_ms"]
    identical = off["identical"] and on["identical"]
    sizes = on["merged_with"]
    rows = [("run", "merging off", "merging on", ""),
            (f"1 task of {args.tasks} prompts", tps(off["single_tokens"], off["single_s"]),
             tps(on["single_tokens"], on["single_s"]), ""),
            (f"{args.tasks} tasks of 1 prompt", tps(off["many_tokens"], off["many_s"]),
             tps(on["many_tokens"], on["many_s"]), ""),
            ("ratio (many / single)", f"{ratio_off:.2f}x", f"{ratio_on:.2f}x",
             f">= {TARGET_RATIO}x merged {verdict(ratio_on >= TARGET_RATIO)}"),
            ("merged batches (tasks per generation)", "-",
             f"{len(sizes) and sum(1 / s for s in sizes):.0f} batches, largest {max(sizes)}", ""),
            ("lone task latency (median)", f"{off['lone_ms']:.1f} ms", f"{on['lone_ms']:.1f} ms",
             f"+{extra_ms:.1f} ms <= {args.window_ms + LATENCY_SLACK_MS:.0f} ms "
             f"{verdict(extra_ms <= args.window_ms + LATENCY_SLACK_MS)}"),
            ("outputs identical (single vs many)", "yes" if off["identical"] else "NO",
             "yes" if on["identical"] else "NO", verdict(identical))]
    print_table(f"Task merging ({args.size} model, {args.device}, {args.max_new_tokens} new tokens per prompt, "
                f"one worker, machine load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)", rows)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
