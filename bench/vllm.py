"""vLLM backend vs transformers backend: the same prompts through ``InferenceExecutor`` on
the same machine, tokens/s of each in one run.

Runs in ``.venv-vllm`` (``make install-vllm``); ``make bench`` runs it there when that
environment exists. Both backends get the same task (``inference.backend`` is the only
difference): ``--prompts`` prompts of mixed length (default 512), a fixed output length
(``--max-new-tokens``, ``ignore_eos``: every prompt generates exactly that many tokens,
so both engines do the same work), greedy. Each backend first runs a small warm-up task
(model or engine load, kernels), then the measured task; tokens/s is completion tokens
over generation time (the executor's ``tokens_per_s``), load time is reported apart.

    .venv-vllm/bin/python bench/vllm.py                       # CPU: the tiny vllm model
    .venv-vllm/bin/python bench/vllm.py --size llama-1b       # GPU: a random 1B-shaped Llama

``--size`` is a ``meshq tiny-model`` size (random weights, built once into
``.bench/models``): ``vllm`` (~3.7M parameters), ``bench`` (~30M), ``gpu`` (~100M),
``llama-1b`` (Llama 3.2 1B's layer shape, ~1.0B parameters with the small vocabulary).
On a GPU the dtype defaults to bfloat16 and the GPU memory in use after each backend's
run is reported (vLLM reserves ``--gpu-memory-utilization`` of the GPU for its KV cache by
design; the transformers row also gives torch's peak allocation). Target on a GPU:
vLLM ≥ 5× the transformers backend's tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, this file's folder comes first on sys.path and this file would shadow the
# vllm package: import from the repository root instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

from bench.inference import make_prompts, model_dir  # noqa: E402

GiB = 1024**3


def parse_args(argv: list[str]) -> argparse.Namespace:
    from cli.tiny_model import SIZES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default=None,
                        help="model shape (default: vllm on CPU, llama-1b on a GPU)")
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="tokens generated per prompt (default: 32 on CPU, 128 on a GPU)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=None,
                        help="default: float32 on CPU, bfloat16 on a GPU")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="the transformers backend's micro-batch (default: its automatic one)")
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    return parser.parse_args(argv)


def gpu_memory() -> dict[str, float] | None:
    """GPU memory in use now (GiB, this process and any other on the GPU) and torch's peak allocation."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return {"in_use_gib": round((total - free) / GiB, 2), "total_gib": round(total / GiB, 2),
            "torch_peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GiB, 2)}


def spec(model: Path, prompts: list[str], backend: str, max_new_tokens: int, dtype: str, device: str,
         gpu_memory_utilization: float, batch_size: int | None) -> dict[str, Any]:
    inference: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": False, "ignore_eos": True,
                                 "backend": backend}
    if batch_size is not None and backend == "transformers":
        inference["batch_size"] = batch_size
    return {"taskType": "inference",
            "model": {"source": {"identifier": str(model)},
                      "transformers": {"device_map": device, "dtype": dtype},
                      "vllm": {"gpu_memory_utilization": gpu_memory_utilization}},
            "data": {"type": "list", "items": prompts},
            "inference": inference}


def run_backend(backend: str, model: Path, prompts: list[str], options: argparse.Namespace, device: str,
                dtype: str) -> dict[str, Any]:
    from app.core.task_spec import parse_task_spec
    from tasks.executors.inference import InferenceExecutor
    from tasks.executors.progress import Progress

    executor = InferenceExecutor()
    with tempfile.TemporaryDirectory() as out:
        def task(items: list[str], new_tokens: int) -> dict[str, Any]:
            raw = spec(model, items, backend, new_tokens, dtype, device, options.gpu_memory_utilization,
                       options.batch_size)
            return executor.run(parse_task_spec(raw), Path(out), Progress())

        started = time.perf_counter()
        warm = task(prompts[:8], 4)  # load + first kernels, not measured
        load_s = time.perf_counter() - started
        started = time.perf_counter()
        result = task(prompts, options.max_new_tokens)
        wall_s = time.perf_counter() - started
    assert result["backend"] == backend, result.get("notes")
    expected = options.max_new_tokens * len(prompts)
    assert result["usage"]["completion_tokens"] == expected, (result["usage"], expected)
    return {"backend": backend, "tokens_per_s": result["tokens_per_s"], "generate_s": result["generate_sec"],
            "task_wall_s": round(wall_s, 2), "warm_up_s": round(load_s, 2),
            "completion_tokens": result["usage"]["completion_tokens"],
            "prompt_tokens": result["usage"]["prompt_tokens"], "dtype": result["model"]["dtype"],
            "device": result["model"]["device"], "load_s": warm["model_cache"]["load_sec"],
            "gpu_memory": gpu_memory()}


def main(argv: list[str]) -> int:
    options = parse_args(argv)
    try:
        import vllm
    except ImportError:
        print("vLLM is not installed in this environment: run make install-vllm, then "
              ".venv-vllm/bin/python bench/vllm.py", file=sys.stderr)
        return 2
    import torch

    from tasks.executors.vllm_engine import engine_device

    device = engine_device()
    on_gpu = device != "cpu"
    if on_gpu and not torch.cuda.is_available():
        print(f"vLLM runs on {device} but torch sees no CUDA device", file=sys.stderr)
        return 2
    options.size = options.size or ("llama-1b" if on_gpu else "vllm")
    options.max_new_tokens = options.max_new_tokens or (128 if on_gpu else 32)
    dtype = options.dtype or ("bfloat16" if on_gpu else "float32")
    model = model_dir(options.size)
    prompts = make_prompts(options.prompts)
    machine = (torch.cuda.get_device_name(0) if on_gpu else
               f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print(f"vLLM {vllm.__version__} ({device}) vs transformers {__import__('transformers').__version__}, "
          f"torch {torch.__version__}; {machine}")
    print(f"model {options.size} ({model}), {dtype}, {len(prompts)} prompts of mixed length, "
          f"{options.max_new_tokens} new tokens each (ignore_eos), greedy", flush=True)

    rows = [run_backend(backend, model, prompts, options, "auto" if on_gpu else "cpu", dtype)
            for backend in ("transformers", "vllm")]
    print()
    header = f"{'backend':<14}{'tokens/s':>11}{'generate s':>12}{'task wall s':>13}{'load s':>8}"
    if on_gpu:
        header += f"{'GPU in use GiB':>16}{'torch peak GiB':>16}"
    print(header)
    for row in rows:
        line = (f"{row['backend']:<14}{row['tokens_per_s']:>11.1f}{row['generate_s']:>12.2f}"
                f"{row['task_wall_s']:>13.2f}{row['load_s']:>8.2f}")
        if row["gpu_memory"]:
            line += f"{row['gpu_memory']['in_use_gib']:>16.2f}{row['gpu_memory']['torch_peak_allocated_gib']:>16.2f}"
        print(line)
    ratio = rows[1]["tokens_per_s"] / max(rows[0]["tokens_per_s"], 1e-9)
    target = " (target on a GPU: >= 5x)" if on_gpu else ""
    print(f"\nvLLM / transformers tokens/s: {ratio:.2f}x{target}")
    if options.json:
        print(json.dumps({"size": options.size, "dtype": dtype, "prompts": len(prompts),
                          "max_new_tokens": options.max_new_tokens, "machine": machine, "ratio": round(ratio, 2),
                          "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
