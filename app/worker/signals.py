"""Celery signal handlers that turn a plain Celery worker into a meshq worker.

Parent process: name the node after ``WORKER_ID``, consume the tag queues,
register, start the heartbeat thread, unregister on graceful shutdown.
Pool child: mark the worker RUNNING/IDLE and publish task events around each task.
"""

from __future__ import annotations

import functools
import logging
import socket
import time
from typing import Any

from celery import signals
from celery.app import trace
from celery.exceptions import Retry
from celery.worker import state as worker_state
from celery.worker.control import control_command, ok

from app.core import routing
from app.core.events import task_event
from app.core.redaction import redact
from app.core.redis_client import StaleMaster, add_replica_wait, confirm_replicated, get_redis
from app.core.settings import MAX_CAPABILITY_QUEUES, get_settings
from app.worker.capability_queues import CapabilityQueues
from app.worker.invisibility import MessageKeeper
from app.worker.lease import lease_ttl_s, record_last_error, refresh_leases
from app.worker.outage import PUBLISH_RETRY_POLICY, write_with_retry
from app.worker.registry import IDLE, RUNNING, WorkerRegistry, add_status_commands, set_worker_status
from app.worker.status_writer import StatusWriter
from app.worker.watchdog import StuckTaskWatchdog

log = logging.getLogger("meshq.worker")

SYNC_QUEUES_COMMAND = "meshq_sync_queues"  # control command: re-read the capability queues in use

_registry: WorkerRegistry | None = None
_capability_queues: CapabilityQueues | None = None
_started_at: dict[str, float] = {}
_beat_hooks: list[Any] = []


def add_beat_hook(hook: Any) -> None:
    """Add ``hook(pipe, running_task_ids)`` to every heartbeat's Redis pipeline. A hook may
    return ``callback(replies)``: it is called with the replies of the commands it added."""
    _beat_hooks.append(hook)


def _on_beat(pipe: Any, running: list[str]) -> list[tuple[int, int, Any]]:
    callbacks = []
    for hook in _beat_hooks:
        start = len(pipe)
        callback = hook(pipe, running)
        if callback is not None:
            callbacks.append((start, len(pipe), callback))
    return callbacks


def active_task_ids() -> list[str]:
    """Tasks the parent has handed to the pool and not yet seen finish."""
    return [request.id for request in list(worker_state.active_requests)]


@signals.celeryd_init.connect
def configure_worker(sender: str, instance: Any, conf: Any, options: dict, **_: Any) -> None:
    global _registry, _capability_queues
    settings = get_settings()
    # The Celery node name carries the worker id unless the user chose one with -n.
    if instance.hostname.startswith("celery@"):
        instance.hostname = f"meshq-{settings.worker_id}@{socket.gethostname()}"
        trace.setup_worker_optimizations(instance.app, instance.hostname)

    queues = routing.worker_queues(settings.task_topic, settings.worker_tags, settings.worker_id)
    for queue in queues:
        instance.app.amqp.queues.select_add(queue)
    ttl_s = lease_ttl_s(settings.heartbeat_interval_s)
    add_beat_hook(lambda pipe, running: refresh_leases(pipe, running, settings.worker_id, ttl_s))
    # In the same round trip: the messages of running tasks stay invisible (app.worker.invisibility).
    keeper = MessageKeeper(instance.app, settings.worker_id)

    def keep_messages_invisible(pipe: Any, _running: list[str]) -> Any:
        tags = keeper.add_to_beat(pipe, time.time())
        return (lambda replies: keeper.replies(tags, replies)) if tags else None

    add_beat_hook(keep_messages_invisible)
    # A finished task's next chain step is sent through a Redis outage (app.worker.outage).
    instance.app.conf.task_publish_retry_policy = PUBLISH_RETRY_POLICY
    add_beat_hook(StuckTaskWatchdog(settings.stuck_task_s).add_to_beat)  # kills a child that stopped progressing
    if settings.visibility_timeout_s < 3 * settings.heartbeat_interval_s:
        log.warning("MESHQ_VISIBILITY_TIMEOUT_S=%s is under three heartbeats (HEARTBEAT_INTERVAL_SEC=%s): "
                    "a late heartbeat lets the broker hand a running task to another worker",
                    settings.visibility_timeout_s, settings.heartbeat_interval_s)
    node, app = instance.hostname, instance.app

    def resync_if_stale(recorded: int) -> None:
        # A capability queue was recorded that this worker has not looked at (a broadcast
        # missed while it started, say): have its own consumer re-read the record.
        if _capability_queues is not None and _capability_queues.stale(recorded):
            try:
                app.control.broadcast(SYNC_QUEUES_COMMAND, destination=[node], reply=False)
            except Exception as exc:  # the broker is away: the next beat asks again
                log.warning("could not ask for a capability queue sync: %s", exc)

    _registry = WorkerRegistry(settings, queues, active_task_ids=active_task_ids, on_beat=_on_beat,
                               on_capability_queues=resync_if_stale)
    _registry.node = node
    if settings.fake_hardware:
        log.warning("MESHQ_FAKE_HARDWARE is set: this worker reports hardware it may not have "
                    "(for tests only): %s", settings.fake_hardware)
    _capability_queues = CapabilityQueues(_registry.capabilities, settings.task_topic, MAX_CAPABILITY_QUEUES)
    try:
        _registry.register()
        # Registered first, then read: a submitter recording a new queue either sees this
        # worker (and broadcasts to it) or is seen by this read.
        capability_queues = _capability_queues.read(_registry.client)
    except Exception as exc:  # Redis not up yet: the first heartbeat registers us and syncs
        log.warning("could not register worker %s yet: %s", settings.worker_id, exc)
    else:
        for queue in capability_queues:
            instance.app.amqp.queues.select_add(queue)
        _registry.add_queues(capability_queues)


@control_command()
def meshq_sync_queues(state: Any, **_: Any) -> dict[str, Any]:
    """Consume the recorded capability queues this worker can serve and does not consume yet."""
    if _capability_queues is None or _registry is None:
        return ok("not a meshq worker")
    new = _capability_queues.read(_registry.client)
    for queue in new:
        state.consumer.call_soon(state.consumer.add_task_queue, queue)
    if new:
        _registry.add_queues(new)
        log.info("now consuming capability queue(s) %s", ", ".join(new))
    return ok(f"{len(new)} new capability queue(s)")


@signals.after_setup_logger.connect
def log_to_file(logger: logging.Logger, format: str, **_: Any) -> None:
    handler = logging.FileHandler(get_settings().log_file)
    handler.setFormatter(logging.Formatter(format))
    logger.addHandler(handler)
    settings = get_settings()
    if not settings.redis_url_from_env:
        log.warning("REDIS_URL is not set: using %s", settings.redis_url)
    else:
        log.info("Redis: %s%s", redact(settings.redis_url),
                 f" (master {settings.redis_master})" if settings.uses_sentinel else "")


@signals.worker_ready.connect
def start_heartbeat(**_: Any) -> None:
    if _registry is not None:
        _registry.set_status(IDLE)
        _registry.start_heartbeat()


@signals.worker_shutdown.connect
def unregister(**_: Any) -> None:
    if _registry is not None:
        _registry.stop()


def _task_type(task: Any) -> str:
    return str(getattr(task, "task_type", None) or task.name.rsplit(".", 1)[-1])


def _elapsed_s(task_id: str) -> float:
    """Seconds since ``task_id`` started in this process (0 when it is not known here)."""
    started = _started_at.get(task_id)
    return round(time.monotonic() - started, 3) if started is not None else 0.0


_status_writer = StatusWriter()


@signals.worker_process_shutdown.connect
def flush_status_writes(**_: Any) -> None:
    _status_writer.wait()


# Start and end of a task each cost one Redis round trip (status + both events +
# lease). A success's end rides in the round trip that stores its result; any other
# end goes out in the background.
@signals.task_prerun.connect
def on_task_start(task_id: str, task: Any, **_: Any) -> None:
    worker_id = get_settings().worker_id
    _status_writer.wait()  # the previous task's IDLE must not land after this RUNNING
    _started_at[task_id] = time.monotonic()
    # meshq tasks make their first lease attempt in this same round trip; their
    # TASK_STARTED goes out with the lease, only when this delivery really starts.
    started = task_event("TASK_STARTED", worker_id, task_id, taskType=_task_type(task))
    lease = task.lease_for_current() if hasattr(task, "lease_for_current") else None
    if lease is not None:
        lease.started_event = started

    def acquire(pipe: Any) -> None:
        assert lease is not None
        lease.acquire_in(pipe, task.counts_this_run())
        add_replica_wait(pipe)  # behind Sentinel: the lease (and the message's delivery) on a replica

    replies = set_worker_status(
        worker_id, RUNNING, current_task=task_id, task_event=started if lease is None else None,
        extra=acquire if lease is not None else None)
    task.request.meshq_end_in = functools.partial(_add_success_end, task_id, task)
    if lease is not None and replies and not isinstance(replies[0], Exception) and _replicated(replies, task_id):
        task.request.meshq_lease_reply = replies[0]


def _replicated(replies: list[Any], task_id: str) -> bool:
    """Whether the lease just taken counts: not if it went to a master that was replaced
    meanwhile (the task then asks again, on the new master)."""
    try:
        confirm_replicated(get_redis(), replies[-1], f"the lease of task {task_id}")
    except StaleMaster as exc:
        log.warning("%s; asking for the lease again", exc)
        return False
    return True


def _add_success_end(task_id: str, task: Any, pipe: Any) -> None:
    """A success's task-end commands, added by the result backend to the pipeline that stores
    the result (``app.celery_redaction``): the end costs no round trip of its own, and the
    lease is released right after the result is stored, as a redelivered copy waiting for it
    needs."""
    worker_id = get_settings().worker_id
    add_status_commands(pipe, worker_id, IDLE, last_task=task_id,
                        task_event=_end_event(worker_id, task_id, task, "SUCCESS", None, _elapsed_s(task_id)))
    _add_end_commands(pipe, task_id, task, None)


@signals.task_postrun.connect
def on_task_end(task_id: str, task: Any, retval: Any = None, state: str | None = None, **_: Any) -> None:
    runtime_s = _elapsed_s(task_id)
    _started_at.pop(task_id, None)
    if state == "SUCCESS" and getattr(task.request, "meshq_end_written", False):
        return  # written with the result (_add_success_end)
    worker_id = get_settings().worker_id
    event = _end_event(worker_id, task_id, task, state, retval, runtime_s)
    last_error = _error_text(retval) if state in ("FAILURE", "RETRY") else None
    # Retried through a Redis outage (app.worker.outage): the task's end event is not lost.
    _status_writer.submit(write_with_retry, set_worker_status, worker_id, IDLE, last_task=task_id,
                          task_event=event, extra=lambda pipe: _add_end_commands(pipe, task_id, task, last_error),
                          what=f"task-end status write of {task_id}")


def _end_event(worker_id: str, task_id: str, task: Any, state: str | None, retval: Any,
               runtime_s: float) -> str | None:
    """The ``tasks.events`` message of a task's end in ``state`` (None: not an outcome)."""
    payload: dict[str, Any] = {"taskType": _task_type(task), "runtime_sec": runtime_s}
    if state == "SUCCESS":
        return task_event("TASK_SUCCEEDED", worker_id, task_id, **payload)
    if state == "IGNORED" and not getattr(task.request, "meshq_cancelled", False):
        return None  # a dropped duplicate or a stage forwarded to another worker: not an outcome
    if state in ("FAILURE", "REVOKED", "IGNORED") or isinstance(retval, BaseException):
        error = f"{type(retval).__name__}: {retval}" if isinstance(retval, BaseException) else str(state)
        return task_event("TASK_FAILED", worker_id, task_id, error=error, state=state, **payload)
    return None  # RETRY / REJECTED: the task will run again, it has not finished


def _add_end_commands(pipe: Any, task_id: str, task: Any, last_error: str | None) -> None:
    """Besides the status: the task's lease is released (after Celery stored the result, so a
    redelivered copy waiting for it finds the result) and a run's error is recorded."""
    lease = getattr(task.request, "meshq_lease", None)
    if lease is not None:
        lease.release_in(pipe)
    if last_error:  # named by the run cap's message, should the task's worker die later
        record_last_error(pipe, task_id, last_error)


def _error_text(retval: Any) -> str | None:
    """``"ExcType: message"`` of what ended a run (a retry's cause rather than ``Retry``)."""
    exc = getattr(retval, "exception", retval)  # an ExceptionInfo, or the exception itself
    if isinstance(exc, Retry) and isinstance(exc.exc, BaseException):
        exc = exc.exc
    return f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else None
