"""The vLLM backend's tests: collected only where vLLM is installed (``make test-vllm`` runs
them in ``.venv-vllm``); elsewhere each module is skipped, saying so in pytest's summary."""

from __future__ import annotations

import os

import pytest

# vLLM's engine in this (test) process, not in a child of it; the workers do the same
# (tasks/executors/vllm_engine.py). The KV cache of the tiny models needs little memory.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # vLLM and its dependencies warn about their own use of deprecated torch APIs
    # (FutureWarning); the suite turns warnings into errors, which is meant for meshq's code.
    for item in items:
        item.add_marker(pytest.mark.filterwarnings("ignore::FutureWarning"))
        item.add_marker(pytest.mark.filterwarnings("ignore::UserWarning"))
