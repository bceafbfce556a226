"""A submitted pipeline: its record in Redis, status, waiting, cancelling.

``submit`` records ``meshq:pipeline:<id>`` (a hash: id, name, stage names with
their pre-generated task ids, queues, the document, submitted_at) and
``meshq:task:<task_id>:pipeline`` for each stage *before* the chain is sent, so
``PipelineRun.get(id)`` works from any process at any time. Both expire with the
Celery results (``result_expires``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import IO, Any

import redis
from celery import states
from celery.exceptions import TimeoutError as CeleryTimeoutError

from app.celery import app as celery_app
from app.core import keys
from app.core.errors import PipelineError, UnknownIdError
from app.core.events import utc_now_iso
from app.core.redaction import redact_secrets
from app.core.redis_client import get_redis
from app.sent_tasks import sent_queue
from pipelines.display import ProgressDisplay
from pipelines.status import FINAL_PIPELINE_STATES, mark_skipped, pipeline_state
from tasks.control import request_cancel
from tasks.shards import read_plan
from tasks.status import stored_meta, task_status

DEFAULT_POLL_INTERVAL_S = 0.5
# Without a progress display, how long one wait on a stage's end lasts before the
# status (cancellation, a stage started) is read again.
STAGE_WAIT_S = 2.0


# KEYS[1] the pipeline's hash, KEYS[2] the recent-pipelines index, KEYS[3..] each stage's
# task → pipeline key; ARGV[1] ttl (s), ARGV[2] the pipeline id, ARGV[3..] the hash's
# field/value pairs. The index forgets entries whose records have expired.
_RECORD = """
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('EXPIRE', KEYS[1], ARGV[1])
for i = 3, #KEYS do redis.call('SET', KEYS[i], ARGV[2], 'EX', ARGV[1]) end
local now = tonumber(redis.call('TIME')[1])
redis.call('ZADD', KEYS[2], now, ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[1]))
redis.call('EXPIRE', KEYS[2], ARGV[1])
return 1
"""


@dataclass
class PipelineRun:
    """Handle on a submitted pipeline (or, for a plain task id, a one-stage view of it)."""

    id: str
    name: str
    stages: list[dict[str, Any]]          # {name, task_id, taskType, queue, run_on}
    submitted_at: str = ""
    document: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    is_pipeline: bool = True
    is_graph: bool = False                # stages are graph nodes, each with its depends_on

    # -- records --------------------------------------------------------------
    def record(self, client: redis.Redis, ttl_s: int) -> None:
        """The pipeline's hash and each stage's task → pipeline key, atomically and in one
        round trip (a script: no MULTI pipeline object to build on every submit)."""
        fields = {"id": self.id, "name": self.name, "submitted_at": self.submitted_at,
                  "stages_json": json.dumps(self.stages), "document_json": json.dumps(redact_secrets(self.document)),
                  "warnings_json": json.dumps(self.warnings), "graph": "1" if self.is_graph else ""}
        client.eval(_RECORD, 2 + len(self.stages), keys.pipeline(self.id), keys.RECENT_PIPELINES,
                    *(keys.task_pipeline(stage["task_id"]) for stage in self.stages),
                    ttl_s, self.id, *(item for pair in fields.items() for item in pair))

    @classmethod
    def get(cls, pipeline_id: str, client: redis.Redis | None = None) -> PipelineRun:
        """The pipeline recorded under ``pipeline_id``; ``PipelineError`` if there is none."""
        client = client or get_redis()
        fields = {str(k): str(v) for k, v in client.hgetall(keys.pipeline(pipeline_id)).items()}
        if not fields:
            raise PipelineError(pipeline_id, "no such pipeline (unknown id, or its records expired)")
        return cls(id=fields["id"], name=fields.get("name", ""), stages=json.loads(fields["stages_json"]),
                   submitted_at=fields.get("submitted_at", ""),
                   document=json.loads(fields.get("document_json") or "{}"),
                   warnings=json.loads(fields.get("warnings_json") or "[]"), is_graph=bool(fields.get("graph")))

    @classmethod
    def find(cls, some_id: str, client: redis.Redis | None = None) -> PipelineRun:
        """A pipeline id, the task id of one of its stages, or any other Celery task id.

        A task that is not part of a pipeline is shown as a one-stage run whose id
        is the task id (its state comes from the result backend alone).
        """
        client = client or get_redis()
        if client.exists(keys.pipeline(some_id)):
            return cls.get(some_id, client)
        owner = client.get(keys.task_pipeline(some_id))
        if owner:
            return cls.get(str(owner), client)
        meta = celery_app.backend.get_task_meta(some_id)
        queue = meta.get("queue")
        if meta.get("status", states.PENDING) == states.PENDING and not meta.get("result"):
            # Not started yet, or unknown: only a record of its publication tells them apart.
            queue = sent_queue(some_id, client)
            if queue is None:
                raise UnknownIdError(some_id)
        name = str(meta.get("name") or "meshq.task").rsplit(".", 1)[-1]
        return cls(id=some_id, name=name, is_pipeline=False,
                   stages=[{"name": name, "task_id": some_id, "taskType": name, "queue": queue,
                            "run_on": None}])

    def cancelled(self, client: redis.Redis | None = None) -> bool:
        return bool(self._ask_cancelled(client or get_redis()))

    def _ask_cancelled(self, client: Any) -> Any:
        """The read that says whether the run was cancelled, on a client or into a pipeline."""
        if not self.is_pipeline:
            return client.exists(keys.task_cancel(self.id))
        return client.hget(keys.pipeline(self.id), "cancelled_at")

    # -- status ---------------------------------------------------------------
    def depends_on(self) -> dict[str, list[str]]:
        """What each stage waits for: a graph node's recorded ``depends_on``, a stage the one before it."""
        names = [stage["name"] for stage in self.stages]
        return {stage["name"]: list(stage["depends_on"]) if "depends_on" in stage else names[max(i - 1, 0):i]
                for i, stage in enumerate(self.stages)}

    def _read_state(self) -> tuple[bool, list[dict[str, Any]]]:
        """Whether the run was cancelled and every stage's stored meta, in one round trip:
        one consistent view, and ``.wait()`` on many runs costs one read per run."""
        backend = celery_app.backend
        pipe = get_redis().pipeline(transaction=False)
        self._ask_cancelled(pipe)
        for stage in self.stages:
            pipe.get(backend.get_key_for_task(stage["task_id"]))
        cancelled, *raw = pipe.execute()
        return bool(cancelled), [stored_meta(celery_app, value) for value in raw]

    def status(self) -> dict[str, Any]:
        """``{id, name, state, stages: {name: {state, task_id, worker_id, progress|result|error}}}``."""
        cancelled, metas = self._read_state()
        stages = []
        for stage, meta in zip(self.stages, metas, strict=True):
            info = task_status(celery_app, stage["task_id"], meta)
            info["taskType"] = stage.get("taskType")
            if "depends_on" in stage:  # recorded (and shown) for a graph's nodes only
                info["depends_on"] = list(stage["depends_on"])
            stages.append({"name": stage["name"], **info})
        mark_skipped(stages, self.depends_on(), cancelled)
        state = pipeline_state([s["state"] for s in stages], cancelled)
        report: dict[str, Any] = {
            "id": self.id, "name": self.name, "kind": "pipeline" if self.is_pipeline else "task",
            "state": state, "submitted_at": self.submitted_at,
            "stages": {s.pop("name"): s for s in stages}}
        if self.is_graph:
            report["graph"] = True
        failed = next(((name, s) for name, s in report["stages"].items()
                       if s["state"] in (states.FAILURE, states.REVOKED)), None)
        if failed is not None and state in ("FAILURE", "CANCELLED", "CANCELLING"):
            report["failed_stage"] = failed[0]
            report["error"] = failed[1].get("error")
        if self.warnings:
            report["warnings"] = self.warnings
        metadata = self.document.get("metadata")
        if metadata:  # the template's metadata (name, owner, project, annotations...), as submitted
            report["metadata"] = metadata
        return report

    # -- waiting --------------------------------------------------------------
    def wait(self, timeout: float | None = None, progress: bool = False,
             interval_s: float = DEFAULT_POLL_INTERVAL_S, stream: IO[str] | None = None) -> dict[str, Any]:
        """Block until every stage succeeded; return ``{stage_name: result}``.

        Raises ``PipelineError`` naming the failed stage and its error (or saying it
        was cancelled) and ``TimeoutError`` after ``timeout`` seconds. ``progress``
        shows each stage's progress on ``stream`` (default stderr) while waiting.
        """
        report = self.follow(timeout=timeout, progress=progress, interval_s=interval_s, stream=stream)
        return self.results_of(report)

    def follow(self, timeout: float | None = None, progress: bool = False,
               interval_s: float = DEFAULT_POLL_INTERVAL_S, stream: IO[str] | None = None) -> dict[str, Any]:
        """Like ``wait`` but returns the final status report instead of raising on failure."""
        display = ProgressDisplay(stream) if progress else None
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                report = self.status()
                if display is not None:
                    display.update(report)
                if report["state"] in FINAL_PIPELINE_STATES:
                    return report
                if deadline is not None and time.monotonic() > deadline:
                    summary = ", ".join(f"{n}={s['state']}" for n, s in report["stages"].items())
                    raise TimeoutError(f"pipeline {self.id} did not finish within {timeout}s ({summary})")
                wait_s = interval_s if display is not None else max(interval_s, STAGE_WAIT_S)
                if deadline is not None:
                    wait_s = max(min(wait_s, deadline - time.monotonic()), 0.01)
                self._wait_for_a_stage(report, wait_s)
        finally:
            if display is not None:
                display.close()

    @staticmethod
    def _wait_for_a_stage(report: dict[str, Any], wait_s: float) -> None:
        """Block until the first unfinished stage ends or ``wait_s`` passed: the result
        backend's notification (Redis pub/sub), not a poll, wakes the waiter as soon as
        the stage ends; waiting on many runs in turn costs each finished one a single read."""
        pending = next((s["task_id"] for s in report["stages"].values()
                        if s["state"] not in states.READY_STATES and s["state"] != "SKIPPED"), None)
        if pending is None:
            time.sleep(wait_s)
            return
        try:
            celery_app.AsyncResult(pending).get(timeout=wait_s, propagate=False, disable_sync_subtasks=False)
        except CeleryTimeoutError:
            pass

    def results_of(self, report: dict[str, Any]) -> dict[str, Any]:
        if report["state"] == "SUCCESS":
            return {name: stage["result"] for name, stage in report["stages"].items()}
        stage = report.get("failed_stage")
        if report["state"] == "FAILURE":
            raise PipelineError(self.id, f"stage {stage!r} failed: {report.get('error')}", stage=stage)
        if report["state"] == "CANCELLED":
            raise PipelineError(self.id, "cancelled" + (f" (stage {stage!r} was stopped)" if stage else ""),
                                stage=stage)
        raise PipelineError(self.id, f"not finished: {report['state']}")

    # -- cancelling -----------------------------------------------------------
    def cancel(self) -> dict[str, Any]:
        """Stop the running stage cooperatively; later stages never start.

        Every unfinished stage gets the cancel flag (the running one stops at its
        next step; one that is about to start sees it and ends REVOKED before doing
        anything) and its task id is revoked, so a worker that receives it drops it.
        A finished pipeline is left as it is.
        """
        report = self.status()
        if report["state"] in FINAL_PIPELINE_STATES:
            return report
        client = get_redis()
        unfinished = [s["task_id"] for s in report["stages"].values() if s["state"] != states.SUCCESS]
        if self.is_pipeline:
            client.hset(keys.pipeline(self.id), "cancelled_at", utc_now_iso())
        pending = [s["task_id"] for s in report["stages"].values()
                   if s["state"] in (states.PENDING, "SKIPPED")]
        for task_id in unfinished:
            request_cancel(task_id, client)
            for shard in read_plan(task_id, client) or []:  # a sharded task: every shard stops too
                request_cancel(shard["task_id"], client)
                pending.append(shard["task_id"])
        if pending:
            celery_app.control.revoke(pending)
        return self.status()



def cancel_any(some_id: str, client: redis.Redis | None = None) -> dict[str, Any]:
    """Cancel a pipeline by its id or a stage's task id (the whole pipeline), or a single task.

    A single task still waiting in its queue is asked to stop too (cancel flag + revoke),
    so it ends REVOKED instead of running. An id nobody submitted raises ``UnknownIdError``.
    """
    return PipelineRun.find(some_id, client or get_redis()).cancel()
