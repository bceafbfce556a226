"""Hardware probe (registered once) and load metrics (sent with every heartbeat).

GPU data comes from NVML, which never initialises CUDA, so the worker's parent
process can read it without touching the devices the pool child uses.

``MESHQ_FAKE_HARDWARE`` (tests only) replaces parts of the probe, so a test can start
a worker that says it has an 80 GB A100 on a machine without a GPU; the probe then
carries ``"fake": true`` and the worker logs a warning.
"""

from __future__ import annotations

import os
import platform
from typing import Any

import psutil

from app.core.engines import installed_engines

try:  # nvidia-ml-py is a dependency, but a machine may lack the driver library.
    import pynvml
except ImportError:  # pragma: no cover - depends on the install
    pynvml = None

_nvml_ready: bool | None = None


def _nvml() -> bool:
    global _nvml_ready
    if _nvml_ready is None:
        _nvml_ready = False
        if pynvml is not None:
            try:
                pynvml.nvmlInit()
                _nvml_ready = pynvml.nvmlDeviceGetCount() > 0
            except Exception:  # NVMLError_LibraryNotFound etc.: no GPU here
                _nvml_ready = False
    return _nvml_ready


def _gpu_handles() -> list[Any]:
    if not _nvml():
        return []
    return [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]


def probe(fake: dict[str, Any] | None = None) -> dict[str, Any]:
    """Static description of the machine, stored in ``hardware_json``; ``fake``
    (``MESHQ_FAKE_HARDWARE``, tests only) replaces the parts it names."""
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "memory_total_bytes": psutil.virtual_memory().total,
        "gpus": [],
    }
    for index, handle in enumerate(_gpu_handles()):
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        name = pynvml.nvmlDeviceGetName(handle)
        info["gpus"].append({
            "index": index,
            "name": name.decode() if isinstance(name, bytes) else name,
            "memory_total_bytes": int(mem.total),
        })
    if fake:
        info.update({k: v for k, v in fake.items() if k != "gpus"})
        if "gpus" in fake:
            info["gpus"] = [{"index": i, **gpu} for i, gpu in enumerate(fake["gpus"])]
        info["fake"] = True
    return info


def features() -> list[str]:
    """Capabilities of this worker that are not hardware, matched against a task's required
    features like its hardware (docs/ROUTING.md): the optional inference engines installed
    in its environment (``vllm``)."""
    return installed_engines()


def metrics() -> dict[str, Any]:
    """Current load: load average, CPU %, memory, and per-GPU NVML readings (only with a GPU)."""
    vm = psutil.virtual_memory()
    data: dict[str, Any] = {
        "load_avg": list(os.getloadavg()),
        "cpu_percent": psutil.cpu_percent(interval=None),
        "memory_used_bytes": int(vm.used),
        "memory_total_bytes": int(vm.total),
        "memory_percent": vm.percent,
    }
    gpus = []
    for index, handle in enumerate(_gpu_handles()):
        gpu: dict[str, Any] = {"index": index}
        try:
            util = pynvml.nvmlDeviceGetUtilizationRates(handle)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpu.update(utilization_percent=util.gpu, memory_used_bytes=int(mem.used),
                       memory_total_bytes=int(mem.total))
            gpu["power_watts"] = pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0
            gpu["temperature_c"] = pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
        except Exception as exc:  # one unreadable sensor must not cost the beat
            gpu["error"] = str(exc)
        gpus.append(gpu)
    if gpus:
        data["gpus"] = gpus
    return data
