"""Fine-tuning through a meshq task vs a plain script with the same library and arguments.

Builds the ~30M-parameter tiny Llama ("bench" size; ``--quick``: the ~1M "test"
size) and a data set, then trains the same LoRA adapter twice per task type on this
machine's CPU (or ``--device cuda``):

* ``lora_sft``: plain = a separate Python process with transformers' ``Trainer`` +
  peft, the same ``TrainingArguments`` (``tasks.executors.training.training_arguments``),
  data and collator; meshq = a ``lora_sft`` task;
* ``dpo``: plain = a separate process with TRL's ``DPOTrainer`` as its documentation
  shows it (``DPOConfig`` with the same argument values, ``peft_config`` for the
  adapter, the preference pairs as a ``datasets.Dataset``); meshq = a ``dpo`` task on
  the same pairs.

The meshq side always runs through a real worker (``LocalCluster``: embedded Redis +
``celery worker``): progress every step, cancel checks, archive; the plain scripts
have no Celery and no progress reporting.

Steps/s is optimiser steps over ``Trainer``'s own ``train_runtime`` in both (model
loading and archiving are reported apart, as wall time). Target: meshq ≥ 0.95× plain.

    python bench/training.py [--quick] [--task lora_sft|dpo|all] [--steps N] [--device cpu|cuda] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SUBJECTS = ["the sky", "a spider", "the sea", "a tree", "the moon", "a river", "the sun", "a fox",
            "a city", "the wind", "a bridge", "the road", "a garden", "the night", "a song", "the rain"]


def make_pairs(n: int) -> list[dict[str, str]]:
    return [{"prompt": f"Question {i}: describe {SUBJECTS[i % len(SUBJECTS)]} in a few words.\nAnswer:",
             "response": f" {SUBJECTS[(i * 7) % len(SUBJECTS)]} is calm, bright and {i % 10} times new."}
            for i in range(n)]


def make_preferences(n: int) -> list[dict[str, str]]:
    """The pairs of ``make_pairs`` with a second, worse answer as ``rejected``."""
    return [{"prompt": pair["prompt"], "chosen": pair["response"],
             "rejected": f" {SUBJECTS[(i * 3) % len(SUBJECTS)]} is {i % 10} and nothing else."}
            for i, pair in enumerate(make_pairs(n))]


def task_spec(model_dir: Path, args: argparse.Namespace, task_type: str = "lora_sft") -> dict[str, Any]:
    spec: dict[str, Any] = {
        "taskType": task_type,
        "model": {"source": {"identifier": str(model_dir)},
                  "transformers": {"device_map": args.device, "dtype": "auto"}},
        "data": {"prompts": make_pairs(args.pairs), "separator": ""},
        "training": {"max_steps": args.steps, "batch_size": args.batch_size, "learning_rate": 1e-3,
                     "max_seq_length": 128, "save_steps": args.steps, "logging_steps": 1,
                     "bf16": args.device == "cuda"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
    }
    if task_type == "dpo":
        spec["data"] = {"preferences": make_preferences(args.pairs), "separator": ""}
        spec["training"]["beta"] = 0.1
    return spec


def plain(spec_json: str, out_json: str) -> None:
    """The plain script of the spec's task type."""
    spec = json.loads(Path(spec_json).read_text())
    (plain_dpo if spec["taskType"] == "dpo" else plain_lora)(spec, out_json)


def plain_lora(raw_spec: dict[str, Any], out_json: str) -> None:
    """Trainer + peft with meshq's arguments, data and collator; nothing else."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, set_seed
    from transformers.trainer_callback import PrinterCallback

    from app.core.task_spec import TrainingTaskSpec, parse_task_spec, spec_as
    from tasks.executors.training import training_arguments
    from tasks.executors.training_data import PaddingCollator, load_examples, tokenize_examples

    spec = spec_as(parse_task_spec(raw_spec), TrainingTaskSpec)
    assert spec.training is not None and spec.lora is not None
    started = time.perf_counter()
    device = "cuda" if spec.model.transformers.device_map == "cuda" else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(spec.model.source.identifier)
    rows = tokenize_examples(load_examples(spec.training_data()), tokenizer, spec.training.max_seq_length)
    model = AutoModelForCausalLM.from_pretrained(spec.model.source.identifier, dtype=torch.float32)
    lora = spec.lora
    set_seed(spec.training.seed)
    peft_model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                  target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model=peft_model, args=training_arguments(spec.training, Path(tmp), device),
                          train_dataset=rows, data_collator=PaddingCollator(tokenizer.pad_token_id),  # type: ignore[arg-type]
                          processing_class=tokenizer)
        trainer.remove_callback(PrinterCallback)  # meshq removes it too (one stdout line per step)
        output = trainer.train()
        peft_model.save_pretrained(str(Path(tmp) / "final_lora"))
    write_plain_result(out_json, trainer, output, started)


def plain_dpo(raw_spec: dict[str, Any], out_json: str) -> None:
    """TRL's DPOTrainer as its documentation shows it: model, DPOConfig, dataset, peft_config."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    from app.core.task_spec import TrainingTaskSpec, parse_task_spec, spec_as
    from tasks.executors.training import supported_arguments, training_argument_values

    spec = spec_as(parse_task_spec(raw_spec), TrainingTaskSpec)
    assert spec.training is not None and spec.lora is not None
    started = time.perf_counter()
    device = "cuda" if spec.model.transformers.device_map == "cuda" else "cpu"
    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(spec.model.source.identifier)
    pairs = datasets.Dataset.from_list(raw_spec["data"]["preferences"])
    model = AutoModelForCausalLM.from_pretrained(spec.model.source.identifier, dtype=torch.float32)
    lora = spec.lora
    set_seed(spec.training.seed)
    with tempfile.TemporaryDirectory() as tmp:
        values = {**training_argument_values(spec.training, Path(tmp), device), "beta": spec.training.beta,
                  "max_length": spec.training.max_seq_length, "gradient_checkpointing": False}
        trainer = DPOTrainer(model=model, args=supported_arguments(DPOConfig, values), train_dataset=pairs,
                             processing_class=tokenizer,
                             peft_config=LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                    target_modules=lora.target_modules, task_type="CAUSAL_LM"))
        trainer.remove_callback(PrinterCallback)
        output = trainer.train()
        trainer.save_model(str(Path(tmp) / "final_lora"))
    write_plain_result(out_json, trainer, output, started)


def write_plain_result(out_json: str, trainer: Any, output: Any, started: float) -> None:
    import torch

    runtime = float(output.metrics["train_runtime"])
    Path(out_json).write_text(json.dumps({
        "steps_per_second": trainer.state.global_step / runtime, "train_runtime_sec": runtime,
        "torch_threads": torch.get_num_threads(), "wall_s": time.perf_counter() - started,
        "loss_last": next((e["loss"] for e in reversed(trainer.state.log_history) if "loss" in e), None)}))


def cancel_check_cost_us(calls: int = 2000) -> float:
    """Mean cost of the per-step cancel check (a Redis EXISTS), in microseconds."""
    from app.core import keys
    from app.core.redis_client import get_redis

    client = get_redis()
    client.exists(keys.task_cancel("bench"))
    started = time.perf_counter()
    for _ in range(calls):
        client.exists(keys.task_cancel("bench"))
    return (time.perf_counter() - started) / calls * 1e6


def run_plain(spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    spec_path, out_path = workdir / "plain-spec.json", workdir / "plain.json"
    spec_path.write_text(json.dumps(spec))
    code = subprocess.call([sys.executable, str(Path(__file__).resolve()), "--plain", str(spec_path),
                            str(out_path)], cwd=ROOT, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    if code != 0:
        raise SystemExit(f"training: the plain script failed (exit {code})")
    return dict(json.loads(out_path.read_text()))


LABELS = {"lora_sft": ("LoRA fine-tuning", "plain Trainer script", "meshq lora_sft task"),
          "dpo": ("DPO with LoRA", "plain TRL DPOTrainer script", "meshq dpo task")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the ~1M test model and 20 steps")
    parser.add_argument("--task", choices=("lora_sft", "dpo", "all"), default="all")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps (default 60; --quick 20)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each (alternating); the best counts")
    parser.add_argument("--plain", nargs=2, metavar=("SPEC_JSON", "OUT_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plain:
        plain(*args.plain)
        return 0
    args.steps = args.steps or (20 if args.quick else 60)

    from cli.local_cluster import LocalCluster
    from cli.tiny_model import build_tiny_model, parameter_count

    workdir = Path(tempfile.mkdtemp(prefix="meshq-bench-training-"))
    size = "test" if args.quick else "bench"
    model_dir = build_tiny_model(workdir / f"tiny-{size}", size=size)
    params = parameter_count(model_dir)
    task_types = ["lora_sft", "dpo"] if args.task == "all" else [args.task]
    runs: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}
    with LocalCluster(workdir / "cluster") as cluster:
        os.environ["REDIS_URL"] = cluster.start_redis()  # before the Celery client is imported
        cluster.start_worker("bench-train", results_dir=workdir / "results",
                             extra_env={"TRANSFORMERS_VERBOSITY": "error"})
        from app.celery import app
        from tasks.submit import submit_task

        check_us = cancel_check_cost_us()
        for task_type in task_types:
            spec = task_spec(model_dir, args, task_type)
            plain_runs: list[dict[str, Any]] = []
            meshq_runs: list[dict[str, Any]] = []
            for n in range(1, args.repeat + 1):
                print(f"run {n}/{args.repeat}: {LABELS[task_type][1]}, {args.steps} steps ...", flush=True)
                plain_runs.append(run_plain(spec, workdir))
                print(f"run {n}/{args.repeat}: {LABELS[task_type][2]} through a worker ...", flush=True)
                started = time.perf_counter()
                result = app.AsyncResult(submit_task(spec).task_id).get(timeout=3600)
                result["wall_s"] = time.perf_counter() - started
                meshq_runs.append(result)
            runs[task_type] = (plain_runs, meshq_runs)

    for task_type, (plain_runs, meshq_runs) in runs.items():
        title, plain_label, meshq_label = LABELS[task_type]
        best_plain = max(plain_runs, key=lambda r: r["steps_per_second"])
        best_meshq = max(meshq_runs, key=lambda r: r["steps_per_second"])
        ratio = best_meshq["steps_per_second"] / best_plain["steps_per_second"]
        print(f"\n{title}, tiny Llama {size} ({params / 1e6:.1f}M parameters), {args.device}, "
              f"{args.steps} steps x batch {args.batch_size}, r=16 all-linear, best of {args.repeat}")
        print(f"{'':30} {'steps/s':>8} {'train s':>8} {'wall s':>8}")
        for label, best in ((plain_label, best_plain), (meshq_label, best_meshq)):
            print(f"  {label:<28} {best['steps_per_second']:8.2f} {best['train_runtime_sec']:8.2f} "
                  f"{best['wall_s']:8.2f}")
        paired = sorted(m["steps_per_second"] / p["steps_per_second"]
                        for p, m in zip(plain_runs, meshq_runs, strict=True))
        print(f"  ratio meshq / plain: {ratio:.3f} best vs best, {paired[len(paired) // 2]:.3f} median of "
              f"back-to-back pairs   (target >= 0.95)")
        print(f"  torch threads: plain {best_plain['torch_threads']}, meshq {best_meshq['torch_threads']}; "
              f"all runs steps/s: plain {[round(r['steps_per_second'], 3) for r in plain_runs]}, "
              f"meshq {[round(r['steps_per_second'], 3) for r in meshq_runs]}")
    print(f"\n  meshq's per-step extra: one cancel-flag check, {check_us:.0f} µs against this Redis; progress is "
          "sent at most once a second")
    print("  wall s: plain = process start to adapter saved; meshq = submit to result "
          "(worker warm; includes loading, archive, result)")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
