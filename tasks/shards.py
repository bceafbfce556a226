"""Sharded inference: one task's prompts split across workers, merged in input order.

An inference task whose spec says ``parallel: {enabled: true, max_shards: N}`` (or
``resources.replicas: N``) and has more than one prompt does not run them itself.
Once its spec is resolved it reads the prompts, plans up to N contiguous ranges
(``tasks.executors.shards``) and replaces itself (``Task.replace``, same task id)
with a chord:

* one ``meshq.inference`` task per shard — id ``<task id>-shard<i>``, the resolved
  spec with ``data`` replaced by the prompts of its range only (read, sliced and
  shuffled once, here: a ``shuffle`` without ``seed`` gets one seed for the task,
  ``tasks.executors.inference.shuffle_seed_for``, recorded as ``shuffle_seed``), kwarg
  ``shard`` (the range, the parent's id, the range's ``metadata_columns`` values) —
  sent to the task's own queue (tags, capabilities: ``tasks.placement``), so any
  worker that could run the task can run a shard; each is an ordinary task (lease,
  redelivery, cancel). A shard's message and stored result hold its slice, never the
  whole prompt list;
* ``meshq.inference_merge`` as the chord body, under the task's own id, with the
  spec less its prompts (every shard's message carries the body), so the chain or
  graph around the task goes on from its merged result.

The merge concatenates the shards' items (in input order), sums ``usage``, writes
``postprocess.jsonl_export`` once from all items, writes ``responses.json`` and
delivers the result as an unsharded task would, plus ``shards: [{index, worker_id,
items, latency_sec, ...}]``. The plan is recorded under ``meshq:task:<id>:shards``
for status (shards done/total) and cancel. A shard that fails fails the task: the
chord stores a ``ChordError`` naming the shard's task id, and ``tasks.status`` shows
the shard and its own error.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import redis
from celery import Task, chord, states

from app.celery import PROGRESS_STATE
from app.core import keys
from app.core.events import utc_now_iso
from app.core.redis_client import get_redis
from app.core.settings import get_settings
from app.core.task_spec import InferenceTaskSpec, parse_task_spec, spec_as
from tasks.base import finish_result, results_root
from tasks.executors.inference import load_prompts
from tasks.executors.jsonl_export import write_export
from tasks.executors.shards import PromptRange, plan_shards
from tasks.placement import queue_for_spec

log = logging.getLogger(__name__)

MERGE_TASK_NAME = "meshq.inference_merge"
SHARD_SPEC_DROPPED = ("postprocess", "sloSeconds", "output")  # done once, by the merge


def shard_task_id(task_id: str, index: int) -> str:
    return f"{task_id}-shard{index}"


def shard_spec(raw_spec: dict[str, Any], prompts: list[str]) -> dict[str, Any]:
    """What a shard runs: the resolved spec without what the merge does once, its ``prompts``
    as the data (already sliced, shuffled and cut to ``max_samples``)."""
    spec = {key: value for key, value in raw_spec.items() if key not in SHARD_SPEC_DROPPED}
    spec["data"] = {"type": "list", "items": prompts}
    return spec


def merge_spec(raw_spec: dict[str, Any]) -> dict[str, Any]:
    """What the merge gets: the resolved spec less the prompts (the shards had them)."""
    data = raw_spec.get("data") or {}
    return {**raw_spec, "data": {key: value for key, value in data.items() if key != "items"}}


def record_plan(task_id: str, plan: list[dict[str, Any]], ttl_s: int, client: redis.Redis | None = None) -> None:
    (client or get_redis()).set(keys.task_shards(task_id), json.dumps(plan), ex=max(ttl_s, 1))


def read_plan(task_id: str, client: redis.Redis | None = None) -> list[dict[str, Any]] | None:
    raw = (client or get_redis()).get(keys.task_shards(task_id))
    return json.loads(raw) if raw else None


def split_inference(task: Any, spec: InferenceTaskSpec, raw_spec: dict[str, Any], out_dir: Path) -> None:
    """Replace ``task`` by a chord of shards + merge when its spec asks for shards (else return)."""
    if spec.shards <= 1:
        return
    prompts = load_prompts(spec, out_dir)
    total = len(prompts.texts)
    ranges = plan_shards(total, spec.shards)
    if len(ranges) <= 1:
        return
    task_id = task.request.id
    queue = queue_for_spec(spec)
    plan = [{**r.as_dict(), "task_id": shard_task_id(task_id, r.index)} for r in ranges]
    record_plan(task_id, plan, int(task.app.conf.result_expires or 7 * 24 * 3600))
    inference = task.app.tasks["meshq.inference"]
    merge = task.app.tasks[MERGE_TASK_NAME]
    shards = [inference.si(shard_spec(raw_spec, prompts.texts[r.start:r.stop]),
                           shard={**r.as_dict(), "parent": task_id,
                                  **({"metadata": prompts.metadata[r.start:r.stop]} if prompts.metadata else {})})
              .set(task_id=shard_task_id(task_id, r.index), queue=queue) for r in ranges]
    # The merge goes where the task may run too (it writes the task's outputs and delivers them).
    body = merge.s(spec=merge_spec(raw_spec), task_id=task_id, started_at=utc_now_iso(), started_s=time.time(),
                   shuffle_seed=prompts.seed).set(queue=queue)
    task.update_state(state=PROGRESS_STATE, meta={
        "shards_done": 0, "shards_total": len(ranges), "total": total,
        "worker_id": get_settings().worker_id, "taskType": "inference"})
    log.info("task %s: %d prompts in %d shards on queue %s", task_id, total, len(ranges), queue)
    raise task.replace(chord(shards, body))


def merge_results(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One inference result from the shards' (any order): items in input order, usage summed."""
    ordered = sorted(results, key=lambda r: int(r["shard"]["index"]))
    items = [item for result in ordered for item in result["items"]]
    usage: dict[str, Any] = {}
    for key in ("prompt_tokens", "completion_tokens", "total_tokens", "num_requests"):
        usage[key] = sum(int(r["usage"].get(key) or 0) for r in ordered)
    first = ordered[0]
    merged: dict[str, Any] = {key: first[key] for key in ("backend", "model") if key in first}
    notes = sorted({note for r in ordered for note in r.get("notes") or []})
    warnings = sorted({text for r in ordered for text in r.get("warnings") or []})
    merged.update(
        items=items, usage=usage,
        generate_sec=round(sum(float(r.get("generate_sec") or 0) for r in ordered), 4),
        batches=sum(int(r.get("batches") or 0) for r in ordered),
        max_batch_size=max(int(r.get("max_batch_size") or 0) for r in ordered),
        shards=[{"index": r["shard"]["index"], "task_id": r.get("task_id"), "worker_id": r.get("worker_id"),
                 "items": len(r["items"]), "start": r["shard"]["start"], "stop": r["shard"]["stop"],
                 "latency_sec": r["usage"].get("latency_sec"), "started_at": r.get("started_at"),
                 "finished_at": r.get("finished_at"), "model_cache": r.get("model_cache")} for r in ordered])
    if notes:
        merged["notes"] = notes
    if warnings:
        merged["warnings"] = warnings
    return merged


class InferenceMergeTask(Task):
    """The chord body of a sharded inference task: runs under the task's own id."""

    name = MERGE_TASK_NAME
    Request = "app.celery_redaction:RedactingRequest"  # the spec may hold destination headers
    typing = False

    def run(self, results: list[dict[str, Any]], *, spec: dict[str, Any], task_id: str, started_at: str,
            started_s: float, shuffle_seed: int | None = None, **_: Any) -> dict[str, Any]:
        # Checked by the task it was split from.
        parsed = spec_as(parse_task_spec(spec, check_data=False), InferenceTaskSpec)
        settings = get_settings()
        out_dir = results_root(settings.results_dir) / task_id
        out_dir.mkdir(parents=True, exist_ok=True)
        merged = merge_results(results)
        wall_s = max(time.time() - started_s, 1e-9)
        # The shards ran at the same time: the task's latency is from the split to the merge.
        merged["usage"]["latency_sec"] = round(wall_s, 4)
        merged["tokens_per_s"] = round(merged["usage"]["completion_tokens"] / wall_s, 2)
        export = parsed.postprocess.jsonl_export if parsed.postprocess is not None else None
        if export is not None:
            merged["jsonl_export"] = write_export(merged["items"], export, out_dir)
        if shuffle_seed is not None:
            merged["shuffle_seed"] = shuffle_seed
        result = {"task_id": task_id, "taskType": "inference", "output_dir": str(out_dir),
                  "worker_id": settings.worker_id,
                  "started_at": started_at, "finished_at": utc_now_iso(), **merged}
        return finish_result(task_id, parsed, out_dir, result, wall_s)


def shard_progress(app: Any, task_id: str, client: redis.Redis | None = None) -> dict[str, Any] | None:
    """``{done, total, running, failed: [{index, task_id, error}], items_done}`` of a sharded task."""
    try:
        plan = read_plan(task_id, client)
    except redis.RedisError:
        return None
    if not plan:
        return None
    backend = app.backend
    raw = backend.client.mget([backend.get_key_for_task(s["task_id"]) for s in plan])
    done = running = items_done = 0
    failed = []
    for entry, value in zip(plan, raw, strict=True):
        meta = backend.decode_result(value) if value else {}
        state = meta.get("status", states.PENDING)
        result = meta.get("result")
        if state == states.SUCCESS:
            done += 1
            items_done += entry["stop"] - entry["start"]
        elif state in (states.FAILURE, states.REVOKED):
            failed.append({"index": entry["index"], "task_id": entry["task_id"], "state": state, "meta": result})
        elif state != states.PENDING:
            running += 1
            if isinstance(result, dict) and isinstance(result.get("done"), int):
                items_done += result["done"]
    return {"done": done, "total": len(plan), "running": running, "failed": failed,
            "items_done": items_done, "items_total": plan[-1]["stop"]}


__all__ = ["InferenceMergeTask", "PromptRange", "merge_results", "shard_progress", "split_inference"]
