"""The thin Celery layer around executors.

``MeshqTask.run`` validates the spec, prepares ``RESULTS_DIR/<task_id>/``, runs the
executor (``tasks.executors``) with a ``CeleryProgress``, writes ``responses.json`` +
``manifest.json``, delivers the outputs to an ``http`` destination and returns the
same dict. Executors are created once per worker process and kept, so they can
keep a model warm between tasks.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import redis
from celery import Task, states
from celery.exceptions import Ignore

from app.artifacts.delivery import deliver_result, undelivered
from app.artifacts.manifest import write_task_outputs
from app.artifacts.run_record import fenced
from app.core.errors import ArtifactError, ExecutorError, LeaseLost, RunRefused, SpecError, TaskCancelled
from app.core.events import utc_now_iso
from app.core.names import check_name
from app.core.redis_client import get_redis
from app.core.settings import get_settings
from app.core.task_spec import TaskSpec, parse_task_spec
from app.worker.lease import LEASE_POLL_S, AlreadyFinished, TaskLease, lease_ttl_s, max_task_runs
from tasks.executors import EXECUTORS, Executor
from tasks.outcome import annotate
from tasks.oversize import stored_result
from tasks.progress import CeleryProgress, announce_revoked, encoded_started_meta
from tasks.sources import pick_sources

log = logging.getLogger(__name__)


# One executor per task type per worker process, created on first use and kept, so
# an executor can keep its model warm between tasks.
_executors: dict[str, Executor] = {}


def get_executor(task_type: str) -> Executor:
    """The process's executor for ``task_type`` (created once, then reused: warm caches)."""
    executor = _executors.get(task_type)
    if executor is None:
        cls = EXECUTORS.get(task_type)
        if cls is None:
            raise SpecError("spec.taskType", f"no executor for task type {task_type!r}")
        executor = _executors[task_type] = cls()
    return executor


def archive_digests(result: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """Relative path → sha256 of the archives the executor hashed while writing them."""
    digests = {}
    for key, value in result.items():
        if key.endswith("_archive") and isinstance(value, str) and result.get(f"{key}_sha256"):
            path = Path(value)
            if path.is_absolute() and path.parent == out_dir:
                digests[path.name] = str(result[f"{key}_sha256"])
    return digests


@functools.lru_cache(maxsize=8)
def results_root(results_dir: str) -> Path:
    """``RESULTS_DIR`` made absolute once per process, not once per task (a syscall per
    path component)."""
    return Path(results_dir).resolve()


def split_args(args: tuple[Any, ...]) -> tuple[Any, Any]:
    """``task(spec)`` or, inside a plain Celery chain, ``task(previous_result, spec)``."""
    if len(args) == 1:
        return None, args[0]
    if len(args) == 2:
        return args[0], args[1]
    raise SpecError("spec", f"expected (spec) or (previous_result, spec) arguments, got {len(args)}")


# Installed by ``pipelines.resolver`` (a higher layer, imported by the worker through
# ``app.celeryconfig.include``): resolve_spec(spec_dict, previous_result, pipeline_info) -> spec_dict.
SPEC_RESOLVERS: list[Callable[[Any, Any, dict[str, Any] | None], Any]] = []


def finish_result(task_id: str, spec: TaskSpec, out_dir: Path, result: dict[str, Any], runtime_s: float,
                  *, walk: bool = True, run: int | None = None, inline: bool = False) -> dict[str, Any]:
    """Annotate a result, write ``responses.json`` + ``manifest.json`` and deliver it (http);
    return what the result backend stores: the result, or past ``MAX_RESULT_BYTES`` its
    reference (``tasks.oversize``; ``inline``: always the result — a shard's, which its
    merge reads).

    Written under the run fence (``app.artifacts.run_record``): when a later run of the
    task committed its outputs to the same directory (a shared ``RESULTS_DIR``), this run
    raises ``LeaseLost`` and writes nothing."""
    result = annotate(result, spec, out_dir, runtime_s)
    try:
        with fenced(out_dir, run):
            manifest = write_task_outputs(out_dir, result, known_sha256=archive_digests(result, out_dir), walk=walk)
    except OSError as exc:  # disk full, read-only mount...: say where, keep the worker
        raise ExecutorError(f"could not write the results to {out_dir}: {exc}", path=str(out_dir)) from exc
    # An http destination: upload the archives, POST the envelope, add the archive URLs.
    try:
        delivered = deliver_result(task_id, spec.output.destination, result, run=run)
    except ArtifactError as exc:  # the outputs stay; the error says how to deliver them later
        raise undelivered(task_id, spec.output.destination, out_dir, run, str(result.get("worker_id", "?")),
                          exc) from None
    if delivered != result:  # URLs were added: keep responses.json equal to the result
        with fenced(out_dir, run):
            manifest = write_task_outputs(out_dir, delivered, reuse=manifest)
    return delivered if inline else stored_result(delivered, out_dir, manifest, get_settings().max_result_bytes)


def still_ours(lease: TaskLease) -> None:
    """Raise ``LeaseLost`` if another worker took the task over; a Redis that cannot be
    asked right now does not stop a finished run (its result writes retry). A short run
    costs no round trip: its lease was taken moments ago with its whole TTL."""
    if lease.surely_held():
        return
    try:
        lease.check([])
    except redis.RedisError as exc:
        log.warning("could not check the lease of task %s (%s); keeping the run's result", lease.task_id, exc)


class MeshqTask(Task):
    """Base of every meshq task; subclasses only set ``task_type``."""

    abstract = True
    task_type = ""
    Request = "app.celery_redaction:RedactingRequest"  # inspect/Flower show redacted arguments
    # Each message is checked (app.core.limits) before the pool: a poison message fails its task,
    # never the worker (app.worker.message_guard).
    Strategy = "app.worker.message_guard:guarded_strategy"
    typing = False  # arguments are checked by the spec, not by Celery's signature check
    # STARTED is stored by the lease script in the task-start round trip (app.worker.signals),
    # and only when this delivery really starts; Celery's own tracking would cost two
    # more round trips and overwrite a running copy's PROGRESS from a waiting one.
    track_started = False

    def run(self, *args: Any, pipeline: dict[str, Any] | None = None, shard: dict[str, Any] | None = None,
            **_: Any) -> dict[str, Any]:
        started = time.monotonic()
        started_at = utc_now_iso()
        settings = get_settings()
        task_id = self.request.id
        try:
            check_name(task_id, "task_id")
        except ValueError as exc:
            raise SpecError("task_id", str(exc)) from None
        previous, raw_spec = split_args(args)
        if shard is None:  # a shard's spec was resolved by the task it was split from
            for resolve in SPEC_RESOLVERS:
                raw_spec = resolve(raw_spec, previous, pipeline)
        spec = parse_task_spec(raw_spec)
        if spec.taskType != self.task_type:
            raise SpecError("spec.taskType", f"{spec.taskType!r} sent to the {self.task_type!r} task")
        out_dir = results_root(settings.results_dir) / task_id
        out_dir.mkdir(parents=True, exist_ok=True)
        progress = CeleryProgress(self, settings.worker_id, self.task_type,
                                  also_cancelled_by=shard.get("parent") if shard else None)
        # One run at a time: a redelivered copy waits while the first run is alive, then
        # returns the first run's stored result, or takes over if that run died. The
        # first attempt was made in the task-start round trip (app.worker.signals).
        lease = self.lease_for_current()
        try:
            runs = lease.wait_for_turn(poll_s=min(LEASE_POLL_S, settings.heartbeat_interval_s),
                                       count_run=self.counts_this_run(),
                                       first_reply=getattr(self.request, "meshq_lease_reply", None))
        except TaskCancelled as exc:  # cancelled while it waited in a queue
            self._end_cancelled(exc, out_dir, progress)
        except AlreadyFinished as exc:
            # A duplicate delivery of a finished task: its result is stored and its chain
            # continued already. Drop this copy (acknowledged, nothing stored, nothing sent).
            log.info("task %s already ended with %s; this delivery is dropped", task_id, exc.state)
            raise Ignore() from None
        if self.is_redelivery():  # the earlier run's worker is gone: one more real start
            runs = lease.count_run()
        lease.run = runs  # the fence refuses this run for good once a later one started
        if runs > max_task_runs():
            last_error = lease.last_error()
            raise ExecutorError(f"task {task_id} was started {runs - 1} times and its worker died each time; "
                                f"giving up (MESHQ_MAX_TASK_RUNS={max_task_runs()}); last error: "
                                f"{last_error or 'none recorded (the worker process was killed)'}")
        # From here on every step, batch and progress report checks the lease (the fence):
        # a run that lost the task to another worker stops and writes nothing more.
        progress.lease = lease
        progress.run = runs  # the run fence of the executors' final outputs (app.artifacts.run_record)
        try:
            if shard is None:
                self.split(spec, raw_spec, out_dir, progress, pipeline)  # replaces the task when it shards
            # An input named several ways (path, url, taskId) is narrowed to the one that works here.
            spec, sources = pick_sources(spec, out_dir)
            executor = get_executor(self.task_type)
            try:
                result = self.run_executor(executor, spec, out_dir, progress, shard)
            except TaskCancelled as exc:
                self._end_cancelled(exc, out_dir, progress, parent=shard.get("parent") if shard else None)
            sources.add_to(result)
            # Wall-clock start and end on the worker: they show which tasks overlapped.
            # output_dir: the task's own directory on its worker (a name later stages reference).
            result = {"task_id": task_id, "taskType": self.task_type, "output_dir": str(out_dir),
                      "worker_id": settings.worker_id, "started_at": started_at, "finished_at": utc_now_iso(),
                      **result}
            still_ours(lease)  # before anything is written or delivered
            delivered = finish_result(task_id, spec, out_dir, result, time.monotonic() - started,
                                      walk=getattr(executor, "writes_files", True), run=runs,
                                      inline=shard is not None)
            still_ours(lease)  # and before Celery stores it as the task's result
            return delivered
        except RunRefused as exc:
            if self._superseded(lease):
                self._abandon(exc)
            # No later run started: the orchestrator holds a run meshq never issued (or cannot
            # verify this one). End the task visibly rather than leave it running for ever.
            raise ExecutorError(f"{exc}; no later run of the task was started (this is run {runs}, the "
                                "latest), so this run's outputs are the task's: the task fails rather than "
                                "stay unfinished") from None
        except LeaseLost as exc:
            self._abandon(exc)

    @staticmethod
    def _superseded(lease: TaskLease) -> bool:
        """Whether a later run of the task started; a Redis that cannot say counts as no."""
        try:
            return lease.superseded()
        except redis.RedisError as exc:
            log.warning("could not ask whether task %s started again (%s)", lease.task_id, exc)
            return False

    def _abandon(self, exc: LeaseLost) -> NoReturn:
        """This run lost its lease (its worker was paused or cut off and the task started
        again elsewhere): stop, and store, send and publish nothing — the other run's
        result is the task's. Acknowledged, so the broker does not hand it out again."""
        log.warning("%s (its worker was paused or cut off past the lease); nothing of it is kept", exc)
        self.request.meshq_abandoned = True
        raise Ignore()

    def split(self, spec: TaskSpec, raw_spec: Any, out_dir: Path, progress: CeleryProgress,
              pipeline: dict[str, Any] | None) -> None:
        """Hook: a task type that can run in shards replaces itself here (``Task.replace``)."""

    def run_executor(self, executor: Executor, spec: TaskSpec, out_dir: Path, progress: CeleryProgress,
                     shard: dict[str, Any] | None) -> dict[str, Any]:
        """Hook: run the executor (an inference task may run merged with waiting ones)."""
        return executor.run(spec, out_dir, progress, **self.executor_options(shard))

    def executor_options(self, shard: dict[str, Any] | None) -> dict[str, Any]:
        """Hook: extra arguments of the executor's ``run`` (a shard's prompt range)."""
        return {}

    def lease_for_current(self) -> TaskLease:
        """The lease of the task being run (created once per run, released at its end)."""
        lease = getattr(self.request, "meshq_lease", None)
        if lease is None:
            settings = get_settings()
            lease = TaskLease(get_redis(), self.request.id, settings.worker_id,
                              lease_ttl_s(settings.heartbeat_interval_s),
                              result_key=self.backend.get_key_for_task(self.request.id),
                              started_meta=encoded_started_meta(self.backend, self.request),
                              result_expires_s=int(getattr(self.backend, "expires", 0) or 0))
            self.request.meshq_lease = lease  # released by the task_postrun handler (app.worker.signals)
        return lease


    def is_redelivery(self) -> bool:
        """The broker handed this message out again: the worker that had it died (or
        was paused past the visibility timeout) before acknowledging it."""
        return bool((self.request.delivery_info or {}).get("redelivered"))

    def counts_this_run(self) -> bool:
        """The first delivery counts as a run at once. A redelivered one counts only
        after it found that the earlier run did not finish (``is_redelivery``); a Celery
        retry (``self.retry``, ``autoretry_for``) never does: it is the same run going
        on after an error, not a worker that died."""
        return not self.is_redelivery() and not self.request.retries

    def _end_cancelled(self, exc: TaskCancelled, out_dir: Path, progress: CeleryProgress,
                       parent: str | None = None) -> None:
        """Record the cancellation (state REVOKED, ``responses.json``) and stop; a cancelled
        shard ends the task it was split from too (its merge will never run)."""
        info = {"task_id": exc.task_id, "taskType": self.task_type, "cancelled": True,
                "message": str(exc), "progress": progress.last}
        with fenced(out_dir, progress.run):  # a late run's cancel never replaces a later run's outputs
            write_task_outputs(out_dir, info)
        self.request.meshq_cancelled = True
        self.update_state(state=states.REVOKED, meta={
            "exc_type": "TaskCancelled", "exc_module": "app.core.errors",
            "exc_message": [exc.task_id, exc.where]})
        if parent:
            self.update_state(task_id=parent, state=states.REVOKED, meta={
                "exc_type": "TaskCancelled", "exc_module": "app.core.errors",
                "exc_message": [parent, f"while its shard {exc.task_id} ran"]})
        announce_revoked(self, str(exc))
        log.info("%s", exc)
        raise Ignore()
