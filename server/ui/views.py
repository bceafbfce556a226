"""What the web view's pages show, read from Redis and the result store (no HTML here).

Each page is read fresh on every request (a poll included): nothing is kept per
browser, so a page left open for hours costs the server no memory. Values from specs
and results pass through ``redact_secrets``: ``headers`` values, tokens and the query
strings of presigned URLs are never shown.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import datetime
from typing import Any

import redis

from app.core import keys
from app.core.errors import PipelineError
from app.core.redaction import redact_secrets
from app.worker.registry import list_workers
from pipelines import PipelineRun
from pipelines.display import describe_progress, fraction_done
from pipelines.status import FINAL_PIPELINE_STATES
from server.result_store import ResultStore

PAGE_SIZE = 25
# A state filter reads at most this many of the newest runs (each costs one status read).
FILTER_READ_LIMIT = 500
TRAINING_TYPES = frozenset({"sft", "lora_sft", "dpo", "ppo"})
RUNNING_STATES = frozenset({"RECEIVED", "STARTED", "PROGRESS", "RETRY"})
SHOWN_FILES = ("responses.json", "manifest.json")
MAX_PROMPTS_SHOWN = 5
MAX_TEXT_CHARS = 4000  # a prompt or error longer than this is cut (the full text is in the files)


def epoch_of(iso: Any) -> float | None:
    if not isinstance(iso, str) or not iso:
        return None
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def duration_text(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return ""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def mapping(value: Any) -> dict[str, Any]:
    """``value`` if it is a mapping, else an empty one (a record may hold anything)."""
    return value if isinstance(value, dict) else {}


def cut(text: Any) -> str:
    text = str(text)
    return text if len(text) <= MAX_TEXT_CHARS else text[:MAX_TEXT_CHARS] + f"… ({len(text)} characters)"


def run_duration(report: dict[str, Any], now: float) -> float | None:
    """From submission to the last node's end (a run still going: to now)."""
    start = epoch_of(report.get("submitted_at"))
    if start is None:
        return None
    if report["state"] in FINAL_PIPELINE_STATES:
        ends = [e for e in (epoch_of(s.get("date_done")) for s in report["stages"].values()) if e is not None]
        return (max(ends) if ends else start) - start
    return now - start


# -- the pipelines list ------------------------------------------------------------
def pipeline_row(report: dict[str, Any], now: float) -> dict[str, Any]:
    metadata = mapping(redact_secrets(report.get("metadata")))
    counts = Counter(stage["state"] for stage in report["stages"].values())
    return {"id": report["id"], "name": report.get("name") or "", "kind": report.get("kind", "pipeline"),
            "state": report["state"], "submitted_at": report.get("submitted_at") or "",
            "duration": duration_text(run_duration(report, now)),
            "owner": metadata.get("owner"), "project": metadata.get("project"),
            "counts": sorted(counts.items())}


def recent_runs(client: redis.Redis, state: str | None, page: int) -> tuple[list[dict[str, Any]], bool]:
    """One page of the newest recorded runs (pipelines and task documents), optionally only
    those in ``state``; and whether there is a next page."""
    now = time.time()
    start = page * PAGE_SIZE
    if state is None:
        ids = [str(i) for i in client.zrevrange(keys.RECENT_PIPELINES, start, start + PAGE_SIZE)]
        rows = [row for row in (read_row(i, client, now) for i in ids[:PAGE_SIZE]) if row is not None]
        return rows, len(ids) > PAGE_SIZE
    ids = [str(i) for i in client.zrevrange(keys.RECENT_PIPELINES, 0, FILTER_READ_LIMIT - 1)]
    matching: list[dict[str, Any]] = []
    for some_id in ids:
        row = read_row(some_id, client, now)
        if row is not None and row["state"] == state:
            matching.append(row)
            if len(matching) > start + PAGE_SIZE:
                break
    return matching[start:start + PAGE_SIZE], len(matching) > start + PAGE_SIZE


def read_row(pipeline_id: str, client: redis.Redis, now: float) -> dict[str, Any] | None:
    try:
        return pipeline_row(PipelineRun.get(pipeline_id, client).status(), now)
    except PipelineError:  # expired since it was listed
        return None


# -- one pipeline ----------------------------------------------------------------------
def node_files(store: ResultStore, task_id: str) -> list[str]:
    """The files of a task the server can hand out: its uploads, and ``responses.json`` /
    ``manifest.json`` when a worker wrote them into the server's results directory."""
    names = [item["filename"] for item in store.list_artifacts(task_id)]
    task_dir = store.task_dir(task_id)
    names += [n for n in SHOWN_FILES if n not in names and (task_dir / n).is_file()]
    return sorted(names, key=lambda n: (n not in SHOWN_FILES, n))


def loss_history(stage: dict[str, Any]) -> list[Any]:
    """``[[step, loss], ...]``: the finished run's ``loss_history``, else the running one's."""
    for source in (stage.get("result"), stage.get("progress")):
        if isinstance(source, dict) and isinstance(source.get("loss_history"), list):
            return list(source["loss_history"])
    progress = stage.get("progress")
    if isinstance(progress, dict) and progress.get("step") is not None and progress.get("loss") is not None:
        return [[progress["step"], progress["loss"]]]
    return []


def prompts_of(result: Any) -> tuple[list[str], int]:
    """The first prompts an inference node ran (a ``graph_template`` node's built prompts)."""
    items = result.get("items") if isinstance(result, dict) else None
    if not isinstance(items, list):
        return [], 0
    prompts = [cut(item["prompt"]) for item in items if isinstance(item, dict) and "prompt" in item]
    return prompts[:MAX_PROMPTS_SHOWN], len(prompts)


def outputs_of(result: Any) -> list[str]:
    items = result.get("items") if isinstance(result, dict) else None
    if not isinstance(items, list):
        return []
    return [cut(item["output"]) for item in items[:MAX_PROMPTS_SHOWN] if isinstance(item, dict) and "output" in item]


def result_text(result: dict[str, Any]) -> str:
    """A finished node's result as JSON (without the items and loss points shown apart)."""
    if not result:
        return ""
    shown = {k: v for k, v in result.items() if k not in ("items", "loss_history")}
    return cut(json.dumps(shown, indent=1, ensure_ascii=False, default=str))


def node_view(name: str, stage: dict[str, Any], depends_on: list[str], store: ResultStore) -> dict[str, Any]:
    stage = redact_secrets(stage)
    progress, result = mapping(stage.get("progress")), mapping(stage.get("result"))
    fraction = fraction_done(progress) if progress else None
    slo = mapping(result.get("slo"))
    prompts, prompt_count = prompts_of(result)
    task_type = str(stage.get("taskType") or "")
    return {
        "name": name, "task_id": stage.get("task_id"), "task_type": task_type, "state": stage["state"],
        "depends_on": depends_on, "worker_id": stage.get("worker_id"),
        "progress_text": describe_progress(progress) if progress else "",
        "percent": round(100 * fraction[0] / fraction[1]) if fraction else None,
        "started_at": result.get("started_at"), "date_done": result.get("finished_at") or stage.get("date_done"),
        "error": cut(stage["error"]) if stage.get("error") else None,
        "runtime": duration_text(result.get("runtime_sec")) if isinstance(result.get("runtime_sec"),
                                                                            int | float) else "",
        "slo_exceeded": bool(slo.get("exceeded")),
        "training": task_type in TRAINING_TYPES, "loss_history": loss_history(stage),
        "prompts": prompts, "prompt_count": prompt_count, "outputs": outputs_of(result),
        "result_text": result_text(result),
        "files": node_files(store, str(stage.get("task_id"))) if stage.get("task_id") else [],
        "running": stage["state"] in RUNNING_STATES}


def pipeline_view(report: dict[str, Any], depends_on: dict[str, list[str]], store: ResultStore) -> dict[str, Any]:
    """The page's model: the run's row fields plus each node, drawn after what it waits for
    (``PipelineRun.depends_on``: a linear stage waits for the one before it)."""
    nodes = [node_view(name, stage, depends_on.get(name, []), store) for name, stage in report["stages"].items()]
    return {**pipeline_row(report, time.time()), "graph": bool(report.get("graph")), "nodes": nodes,
            "final": report["state"] in FINAL_PIPELINE_STATES,
            "failed_stage": report.get("failed_stage"),
            "warnings": [cut(w) for w in report.get("warnings") or []]}


# -- workers -----------------------------------------------------------------------
def worker_view(worker: dict[str, Any], now: float) -> dict[str, Any]:
    hardware, metrics = mapping(worker.get("hardware")), mapping(worker.get("metrics"))
    readings = {g.get("index"): g for g in metrics.get("gpus") or [] if isinstance(g, dict)}
    gpus = []
    for gpu in hardware.get("gpus") or []:
        if isinstance(gpu, dict):
            reading = readings.get(gpu.get("index"), {})
            gpus.append({"name": gpu.get("name"), "memory_total_bytes": gpu.get("memory_total_bytes"),
                         "memory_used_bytes": reading.get("memory_used_bytes"),
                         "utilization_percent": reading.get("utilization_percent")})
    seen = epoch_of(worker.get("last_seen"))
    return {"worker_id": worker["worker_id"], "alive": bool(worker.get("alive")),
            "status": worker.get("status") if worker.get("alive") else "DEAD",
            "tags": [str(t) for t in worker.get("tags") or []],
            "queues": [str(q) for q in worker.get("queues") or []],
            "hostname": hardware.get("hostname"), "cpu_count": hardware.get("cpu_count"),
            "memory_total_bytes": hardware.get("memory_total_bytes"), "gpus": gpus,
            "cpu_percent": metrics.get("cpu_percent"), "memory_percent": metrics.get("memory_percent"),
            "current_task": worker.get("current_task") or None, "last_task": worker.get("last_task") or None,
            "heartbeat_age": duration_text(now - seen) if seen is not None else "",
            "fake_hardware": bool(hardware.get("fake"))}


def workers_view(client: redis.Redis) -> list[dict[str, Any]]:
    now = time.time()
    return [worker_view(w, now) for w in list_workers(client)]
