"""Prompts and specs shared by the vLLM tests."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
# The default environment's interpreter: a worker started from it has no vLLM (``make test-vllm``
# builds it first, as ``make test`` does).
PLAIN_PYTHON = ROOT / ".venv" / "bin" / "python"

_WORDS = ("the quick brown fox jumps over lazy dog question answer paris model worker queue redis "
          "celery spider legs eight blue sky capital france hello bonjour thank danke").split()


def mixed_prompts(count: int = 32, seed: int = 0) -> list[str]:
    """``count`` prompts of 1 to ~120 tokens (short and long ones mixed, never sorted)."""
    rng = random.Random(seed)
    prompts = []
    for number in range(count):
        length = rng.choice([1, 2, 3, 5, 8, 13, 21, 34, 55, 89])
        words = " ".join(rng.choice(_WORDS) for _ in range(length))
        prompts.append(f"Question {number}: {words}" if number % 3 == 0 else words)
    return prompts


def inference_spec(model_dir: Path | str, prompts: list[str], backend: str = "vllm", *,
                   vllm_block: bool = True, **inference: Any) -> dict[str, Any]:
    model: dict[str, Any] = {"source": {"identifier": str(model_dir)},
                             "transformers": {"dtype": "float32", "device_map": "cpu"}}
    if vllm_block:
        model["vllm"] = {"max_model_len": 512}
    return {"taskType": "inference", "model": model, "data": {"type": "list", "items": prompts},
            "inference": {"max_new_tokens": 24, "backend": backend, **inference}}
