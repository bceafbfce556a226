"""Inference benchmark: naive per-prompt ``generate`` vs the meshq executor, warm vs cold, memory.

On the ~30M-parameter tiny Llama ("bench" size), CPU, float32, greedy:

1. tokens/s of a naive loop (one ``model.generate`` per prompt) vs ``InferenceExecutor``
   (length-sorted micro-batches) on 256 prompts of mixed length, 32 new tokens; the
   naive loop runs on a stratified sample (every 4th prompt, same length mix: its
   rate does not depend on how many prompts there are) unless ``--full-naive``;
   the outputs of the sample must be identical to the executor's;
2. task latency through a real worker (``LocalCluster``: embedded Redis + ``celery
   worker``) of a small task (8 short prompts, 8 new tokens): the first task of a
   fresh worker (torch import + model load), the first task on another model
   (load only) and warm tasks (model cached);
3. peak RSS of the executor in a subprocess with 1,000 and 10,000 short prompts
   (2 new tokens): flat, because only one micro-batch is in flight.

Targets: executor ≥ 3× naive; warm latency ≤ 20% of cold; RSS flat in prompts.

    python bench/inference.py [--quick] [--threads N] [--full-naive] [--skip-worker] [--skip-memory]

One torch thread by default: on a shared machine more threads make small ops wait
on each other and the numbers jump around; both sides always use the same setting.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from cli.tiny_model import CORPUS, build_tiny_model  # noqa: E402

MODELS_DIR = ROOT / ".bench" / "models"
WORDS = CORPUS.split()
MIXED_WORD_COUNTS = (2, 6, 12, 24, 48, 96)
SHORT_WORD_COUNTS = (4, 8, 12, 16)


def make_prompts(n: int, word_counts: tuple[int, ...] = MIXED_WORD_COUNTS, seed: int = 0) -> list[str]:
    """``n`` prompts of corpus words, lengths cycling through ``word_counts`` (mixed lengths)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(word_counts[i % len(word_counts)])) for i in range(n)]


def model_dir(size: str, seed: int = 0) -> Path:
    """The tiny model of ``size``, built once into ``.bench/models``."""
    path = MODELS_DIR / f"{size}-seed{seed}"
    if not (path / "config.json").is_file():
        print(f"building the {size!r} tiny model (seed {seed}) in {path} ...", flush=True)
        build_tiny_model(path, size=size, seed=seed)
    return path


def inference_spec(model: Path, prompts: list[str], max_new_tokens: int, *, device: str = "cpu",
                   dtype: str = "float32", batch_size: int | None = None) -> dict[str, Any]:
    inference: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": False}
    if batch_size is not None:
        inference["batch_size"] = batch_size
    return {"taskType": "inference",
            "model": {"source": {"identifier": str(model)},
                      "transformers": {"device_map": device, "dtype": dtype}},
            "data": {"type": "list", "items": prompts},
            "inference": inference}


def naive_generate(model_path: Path, prompts: list[str], max_new_tokens: int, *, device: str = "cpu",
                   dtype: str = "float32") -> tuple[list[str], float]:
    """One ``model.generate`` per prompt: ``(outputs, tokens/s)``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model: Any = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype)
    model = model.to(device).eval()
    outputs: list[str] = []
    tokens = 0
    with torch.inference_mode():
        enc = tokenizer(prompts[0], return_tensors="pt").to(device)  # warm-up (kernels, caches)
        model.generate(**enc, max_new_tokens=2, do_sample=False)
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for prompt in prompts:
            enc = tokenizer(prompt, return_tensors="pt").to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
            new = out[0, enc.input_ids.shape[1]:]
            tokens += int(new.numel())
            outputs.append(str(tokenizer.decode(new, skip_special_tokens=True)))
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
    return outputs, tokens / elapsed


def run_executor(model_path: Path, prompts: list[str], max_new_tokens: int, **spec_options: Any
                 ) -> dict[str, Any]:
    """The meshq executor on ``prompts`` after a small warm-up task (model load)."""
    from app.core.task_spec import parse_task_spec
    from tasks.executors.inference import InferenceExecutor
    from tasks.executors.models import ModelCache
    from tasks.executors.progress import Progress

    executor = InferenceExecutor(ModelCache())
    with tempfile.TemporaryDirectory() as out:
        executor.run(parse_task_spec(inference_spec(model_path, prompts[:4], 2, **spec_options)),
                     Path(out), Progress())
        return executor.run(parse_task_spec(inference_spec(model_path, prompts, max_new_tokens,
                                                           **spec_options)), Path(out), Progress())


# -- worker latency -------------------------------------------------------------------
def worker_latencies(cluster: Any, model_a: Path, model_b: Path, prompts: list[str], max_new_tokens: int,
                     warm_runs: int) -> dict[str, Any]:
    """Client-side latency (submit → result) of tasks on one fresh worker."""
    from app.celery import app
    from tasks.submit import submit_task

    threads = os.environ.get("BENCH_THREADS", "1")
    cluster.start_worker("bench-inference", extra_env={"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")])),
                                                   "OMP_NUM_THREADS": threads})

    def timed(model: Path) -> tuple[float, dict[str, Any]]:
        started = time.perf_counter()
        result = app.AsyncResult(submit_task(inference_spec(model, prompts, max_new_tokens)).task_id
                                 ).get(timeout=900)
        return time.perf_counter() - started, result

    cold_s, cold = timed(model_a)
    warm = [timed(model_a) for _ in range(warm_runs)]
    switch_s, switch = timed(model_b)
    assert cold["model_cache"]["hit"] is False and all(r["model_cache"]["hit"] for _, r in warm)
    assert switch["model_cache"]["hit"] is False
    return {"cold_s": cold_s, "cold_load_s": cold["model_cache"]["load_sec"],
            "warm_s": statistics.median(s for s, _ in warm),
            "switch_s": switch_s, "switch_load_s": switch["model_cache"]["load_sec"]}


# -- memory ---------------------------------------------------------------------------
def current_rss_mib() -> float:
    """Resident set size of this process now (Linux ``/proc``)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_child(model_path: Path, n: int, max_new_tokens: int) -> None:
    """(subprocess) Run the executor on ``n`` short prompts; print RSS figures as JSON.

    RSS is sampled every 20 ms during the measured run: the process's lifetime peak
    (``ru_maxrss``) would be set by model loading and hide any growth.
    """
    import threading

    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    from app.core.task_spec import parse_task_spec
    from tasks.executors.inference import InferenceExecutor
    from tasks.executors.models import ModelCache
    from tasks.executors.progress import Progress

    prompts = make_prompts(n, SHORT_WORD_COUNTS, seed=1)
    executor = InferenceExecutor(ModelCache())
    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            samples.append(current_rss_mib())

    with tempfile.TemporaryDirectory() as out:
        executor.run(parse_task_spec(inference_spec(model_path, prompts[:32], max_new_tokens)),
                     Path(out), Progress())
        before_mib = current_rss_mib()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.perf_counter()
        result = executor.run(parse_task_spec(inference_spec(model_path, prompts, max_new_tokens)),
                              Path(out), Progress())
        elapsed = time.perf_counter() - started
        stop.set()
        sampler.join()
    print(json.dumps({"prompts": n, "before_mib": before_mib, "peak_mib": max(samples, default=before_mib),
                      "lifetime_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "sec": elapsed, "batches": result["batches"]}))


def measure_memory(model_path: Path, n: int, max_new_tokens: int) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--memory-child", str(n), "--model", str(model_path),
                           "--max-new-tokens", str(max_new_tokens)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"memory run with {n} prompts failed:\n{proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


# -- report ---------------------------------------------------------------------------
def print_table(title: str, rows: list[tuple[str, str, str, str]]) -> None:
    print()
    print(title)
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer prompts and tokens (a smoke run)")
    parser.add_argument("--full-naive", action="store_true", help="run the naive loop on every prompt")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads everywhere (default 1: stable numbers on a shared machine)")
    parser.add_argument("--skip-worker", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--max-new-tokens", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(args.model, args.memory_child, args.max_new_tokens)
        return 0

    os.environ["BENCH_THREADS"] = str(args.threads)  # for the worker and the memory subprocesses
    n_prompts, max_new, naive_every = (64, 16, 4) if args.quick else (256, 32, 4)
    memory_sizes = (200, 2000) if args.quick else (1000, 10_000)
    rows: list[tuple[str, str, str, str]] = [("metric", "value", "target", "")]

    from cli.local_cluster import LocalCluster

    with LocalCluster(Path(tempfile.mkdtemp(prefix="meshq-bench-inference-"))) as cluster:
        # Redis first: the Celery client in this process reads REDIS_URL when first imported.
        os.environ["REDIS_URL"] = cluster.start_redis()
        import torch

        torch.set_num_threads(args.threads)
        model = model_dir("bench")
        prompts = make_prompts(n_prompts)
        sample = prompts if args.full_naive else prompts[::naive_every]
        print(f"naive loop: {len(sample)} prompts x {max_new} new tokens ...", flush=True)
        naive_outputs, naive_tps = naive_generate(model, sample, max_new)
        print(f"executor: {len(prompts)} prompts x {max_new} new tokens ...", flush=True)
        result = run_executor(model, prompts, max_new)
        executor_tps = result["tokens_per_s"]
        step = 1 if args.full_naive else naive_every
        identical = [result["items"][i * step]["output"] for i in range(len(sample))] == naive_outputs
        speedup = executor_tps / naive_tps
        rows += [
            (f"naive per-prompt generate ({len(sample)} prompts)", f"{naive_tps:,.1f} tok/s", "", ""),
            (f"meshq executor ({len(prompts)} prompts, {result['batches']} batches of <= "
             f"{result['max_batch_size']})", f"{executor_tps:,.1f} tok/s", "", ""),
            ("speed-up", f"{speedup:.1f}x", ">= 3x", verdict(speedup >= 3)),
            ("greedy outputs identical to naive", "yes" if identical else "NO", "yes", verdict(identical)),
        ]

        if not args.skip_worker:
            print("worker: cold, warm and model-switch tasks ...", flush=True)
            other = model_dir("bench", seed=1)
            # A small task (8 short prompts, 8 new tokens), so start-up costs are what it measures.
            lat = worker_latencies(cluster, model, other, make_prompts(8, SHORT_WORD_COUNTS, seed=2), 8,
                                   warm_runs=3)
            ratio = lat["warm_s"] / lat["cold_s"]
            rows += [
                ("task latency (8 short prompts x 8 tokens), cold: fresh worker, imports + load",
                 f"{lat['cold_s']:.2f} s (load {lat['cold_load_s']:.2f} s)", "", ""),
                ("task latency, other model (load only)",
                 f"{lat['switch_s']:.2f} s (load {lat['switch_load_s']:.2f} s)", "", ""),
                ("task latency, warm (model cached; median)", f"{lat['warm_s']:.2f} s", "", ""),
                ("warm / cold", f"{ratio:.0%}", "<= 20%", verdict(ratio <= 0.2)),
                ("warm / other-model cold", f"{lat['warm_s'] / lat['switch_s']:.0%}", "", ""),
            ]

        if not args.skip_memory:
            small, large = (measure_memory(model, n, 2) for n in memory_sizes)
            growth = large["peak_mib"] - small["peak_mib"]
            flat = growth <= max(0.1 * small["peak_mib"], 64)
            rows += [
                (f"peak RSS during a run, {run['prompts']:,} short prompts x 2 tokens ({run['sec']:.0f} s)",
                 f"{run['peak_mib']:,.0f} MiB (model loaded: {run['before_mib']:,.0f})", "", "")
                for run in (small, large)
            ]
            rows += [
                ("RSS growth for 10x the prompts", f"{growth:+,.0f} MiB", "flat", verdict(flat)),
            ]
        threads = torch.get_num_threads()

    print_table(f"meshq inference benchmark: 'bench' tiny Llama, CPU float32, {threads} torch threads, "
                f"greedy", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
