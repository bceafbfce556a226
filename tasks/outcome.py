"""What the task layer adds to every executor's result (``tasks.base``).

* ``notes``: fields of the spec that had no effect on this worker, and why (executors add
  their own: a vLLM configuration run on transformers, multi-GPU settings on one GPU...).
* ``slo``: with ``sloSeconds``, the target, the task's run time on the worker (from the
  start of the task to its result; time spent waiting in the queue is not counted) and
  whether it was exceeded (then also a ``warnings`` entry).
* ``warnings``: every ``output.artifacts`` path the task directory lacks when the task
  ends (a warning, not a failure).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.artifacts.manifest import MANIFEST_NAME, RESPONSES_NAME
from app.core.names import check_name
from app.core.task_spec import ModelTaskSpec, TaskSpec

WRITTEN_LAST = (RESPONSES_NAME, MANIFEST_NAME)  # written right after this check


def spec_notes(spec: TaskSpec) -> list[str]:
    notes = []
    destination = spec.output.destination
    if destination.type == "local" and destination.path:
        notes.append(f"output.destination.path: {destination.path!r} is informational; the results are in "
                     "this worker's RESULTS_DIR/<task_id>/")
    if isinstance(spec, ModelTaskSpec) and spec.model.transformers.low_cpu_mem_usage is False:
        notes.append("model.transformers.low_cpu_mem_usage: false has no effect; transformers 5 always "
                     "loads weights without an extra full copy in memory")
    if getattr(spec.data, "trust_remote_code", False):
        notes.append("data.trust_remote_code: datasets are read from files and the local cache only; "
                     "dataset loading scripts are never run")
    return notes


def missing_artifacts(spec: TaskSpec, out_dir: Path) -> list[str]:
    """A warning for each ``output.artifacts`` entry the task directory does not hold."""
    warnings = []
    for entry in spec.output.artifacts:
        parts = [p for p in entry.strip("/").split("/") if p]
        try:
            for part in parts:
                check_name(part, "path")
        except ValueError:
            warnings.append(f"output.artifacts: {entry!r} is not a path inside the task directory; not checked")
            continue
        relative = "/".join(parts)
        if relative in WRITTEN_LAST or (out_dir / relative).exists():
            continue
        warnings.append(f"output.artifacts: {entry!r} is missing from the task directory")
    return warnings


def annotate(result: dict[str, Any], spec: TaskSpec, out_dir: Path, runtime_s: float) -> dict[str, Any]:
    """``result`` with ``notes``, ``slo`` and ``warnings`` added (each only when there is one)."""
    notes = [*result.get("notes", []), *spec_notes(spec)]
    warnings = [*result.get("warnings", []), *missing_artifacts(spec, out_dir)]
    if spec.sloSeconds is not None:
        exceeded = runtime_s > spec.sloSeconds
        result["slo"] = {"seconds": spec.sloSeconds, "runtime_sec": round(runtime_s, 3), "exceeded": exceeded}
        if exceeded:
            warnings.append(f"sloSeconds: the task ran {runtime_s:.1f} s, over its {spec.sloSeconds:g} s target")
    if notes:
        result["notes"] = notes
    if warnings:
        result["warnings"] = warnings
    return result
