"""One training task on N ranks vs one rank: samples/s at the same global batch.

Builds the ~30M-parameter tiny Llama ("bench" size; ``--quick``: the ~1M "test" size)
and runs the same ``lora_sft`` task (``--task sft``: full fine-tuning) through its
executor twice, each in a fresh process:

* 1 rank: ``allow_multi_gpu: false``, ``per_device_train_batch_size`` = the global batch,
  one core (``OMP_NUM_THREADS=1``, pinned with ``taskset`` where there is one);
* N ranks: ``allow_multi_gpu: true``, ``MESHQ_CPU_RANKS=N``, per-rank batch = global / N,
  each rank on one core (torchrun's launcher, ``OMP_NUM_THREADS=1``).

Samples/s is optimiser steps × global batch over the ``Trainer``'s own ``train_runtime``
(rank 0's), so model loading and the launcher's start are reported apart (wall s).
Target on CPU: 2 ranks ≥ 1.6× one rank.

On a machine with several GPUs (one command, as ``bench/vllm.py`` for vLLM):

    python bench/multi_rank.py --device cuda --ranks 2     # ranks = GPUs (NCCL)

    python bench/multi_rank.py [--quick] [--task lora_sft|sft] [--ranks N] [--steps N] [--batch N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run_once(spec: dict[str, Any], workdir: Path, ranks: int, device: str) -> dict[str, Any]:
    """The executor in a fresh process (no warm state); its result."""
    out = workdir / f"out-{ranks}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "RESULTS_DIR": str(workdir), "MESHQ_DATA_DIRS": str(workdir),
           "MESHQ_CPU_RANKS": str(ranks), "TRANSFORMERS_VERBOSITY": "error"}
    command = [sys.executable, str(Path(__file__)), "--one", str(out)]
    if device == "cpu":
        env["OMP_NUM_THREADS"] = "1"
        if ranks == 1 and shutil.which("taskset"):
            command = ["taskset", "-c", "0", *command]
    subprocess.run(command, env=env, check=True, cwd=ROOT)
    result: dict[str, Any] = json.loads((out / "result.json").read_text())
    return result


def one(out: Path) -> None:
    import time

    from app.core.task_spec import parse_task_spec
    from tasks.executors import EXECUTORS
    from tasks.executors.progress import Progress

    spec = parse_task_spec(json.loads((out / "spec.json").read_text()))
    started = time.perf_counter()
    result = EXECUTORS[spec.taskType]().run(spec, out / "task", Progress())
    result["wall_s"] = time.perf_counter() - started
    (out / "result.json").write_text(json.dumps(result))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the ~1M test model")
    parser.add_argument("--task", choices=("lora_sft", "sft"), default="lora_sft")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16, help="global batch (split over the ranks)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        one(Path(args.one))
        return 0
    if args.batch % args.ranks:
        parser.error("--batch must be a multiple of --ranks")

    from bench.training import make_pairs
    from cli.tiny_model import build_tiny_model, parameter_count

    workdir = Path(tempfile.mkdtemp(prefix="meshq-bench-ranks-"))
    size = "test" if args.quick else "bench"
    model_dir = build_tiny_model(workdir / f"tiny-{size}", size=size)

    def spec(ranks: int) -> dict[str, Any]:
        raw: dict[str, Any] = {
            "taskType": args.task,
            "model": {"source": {"identifier": str(model_dir)}, "transformers": {"device_map": args.device}},
            "data": {"prompts": make_pairs(64), "separator": ""},
            "training": {"max_steps": args.steps, "per_device_train_batch_size": args.batch // ranks,
                         "learning_rate": 1e-4, "save_steps": 100_000, "seed": 0, "allow_multi_gpu": ranks > 1,
                         "max_seq_length": 64},
        }
        if args.device == "cuda" and ranks > 1:  # N of this machine's GPUs (the rest stay idle)
            raw["training"]["visible_devices"] = list(range(ranks))
        if args.task == "lora_sft":
            raw["lora"] = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
        return raw

    rows = []
    for ranks in (1, args.ranks):
        print(f"{ranks} rank(s): {args.steps} steps, global batch {args.batch} ...", flush=True)
        result = run_once(spec(ranks), workdir, ranks, args.device)
        samples_s = result["steps"] * result["global_batch"] / result["train_runtime_sec"]
        rows.append((ranks, result, samples_s))
    print(f"\n{args.task}, tiny Llama {size} ({parameter_count(model_dir) / 1e6:.1f}M parameters), {args.device}, "
          f"{args.steps} steps x global batch {args.batch}")
    print(f"{'ranks':>6} {'world':>6} {'strategy':>15} {'samples/s':>10} {'train s':>8} {'wall s':>8} "
          f"{'loss_last':>10}")
    for ranks, result, samples_s in rows:
        print(f"{ranks:>6} {result['world_size']:>6} {result['strategy']:>15} {samples_s:>10.2f} "
              f"{result['train_runtime_sec']:>8.2f} {result['wall_s']:>8.2f} {result['loss_last']:>10.4f}")
    speedup = rows[1][2] / rows[0][2]
    print(f"  {args.ranks} ranks / 1 rank: {speedup:.2f}x samples/s   (target on CPU, 2 ranks: >= 1.6x)")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
