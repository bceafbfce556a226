"""The worker record (``worker:<id>``) as the Celery consumer really is, not as it started.

The parent process knows what Celery does; the record follows it:

* ``queues_json`` — the queues the consumer consumes now: ``-Q``, ``celery control
  add_consumer``/``cancel_consumer`` included (written when the worker is ready and
  with every heartbeat), so "no live worker consumes queue X" warnings stay true;
* ``concurrency`` — the pool's process count (one: see ``app.worker.concurrency``);
* ``status``/``current_task`` — a pool child writes RUNNING and IDLE around each task,
  but a child killed mid-task (hard ``time_limit``, ``celery control terminate``) writes
  nothing: the parent then ends the task itself (``TASK_FAILED``, IDLE, lease released),
  and each heartbeat sets IDLE if the record still names a task the parent no longer holds.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from billiard.exceptions import WorkerLostError
from celery import signals
from celery.exceptions import TimeLimitExceeded
from celery.worker import state as worker_state

from app.core import keys
from app.core.events import task_event, utc_now_iso
from app.core.redis_client import get_redis
from app.core.settings import get_settings
from app.worker.lease import TaskLease, lease_ttl_s, record_last_error
from app.worker.registry import IDLE, set_worker_status
from app.worker.signals import add_beat_hook

log = logging.getLogger("meshq.worker")

_consumer: Any = None
_main_pid = 0

# RUNNING → IDLE only when the record still names a task the parent no longer holds (it
# reserves a task before any child runs it and forgets it only once the task ended), so a
# child that is starting the next task is never overwritten. Publishes the STATUS event.
_CORRECT_STATUS = """
if redis.call('hget', KEYS[1], 'status') ~= 'RUNNING' then return false end
local current = redis.call('hget', KEYS[1], 'current_task')
if not current or current == '' then return false end
for i = 3, #ARGV do if ARGV[i] == current then return false end end
redis.call('hset', KEYS[1], 'status', 'IDLE', 'current_task', '', 'last_task', current)
redis.call('publish', KEYS[2], cjson.encode({type = 'STATUS', ts = ARGV[1], worker_id = ARGV[2],
  status = 'IDLE', metrics = {}, payload = {current_task = '', last_task = current,
  corrected = 'the pool process ended without reporting the end of the task'}}))
return current
"""


def consumed_queues() -> list[str] | None:
    """The queues the consumer consumes right now (``None`` before it is ready)."""
    task_consumer = getattr(_consumer, "task_consumer", None)
    if task_consumer is None:
        return None
    return list(dict.fromkeys(queue.name for queue in list(task_consumer.queues)))  # in consuming order


def pool_processes() -> int | None:
    pool = getattr(_consumer, "pool", None)
    try:
        return int(pool.num_processes) if pool is not None else None
    except (AttributeError, TypeError, ValueError):
        return None


def held_task_ids() -> list[str]:
    """Tasks the parent has received and not yet seen end (reserved includes active)."""
    return sorted({request.id for request in list(worker_state.reserved_requests)}
                  | {request.id for request in list(worker_state.active_requests)})


def live_fields() -> dict[Any, Any]:
    fields: dict[Any, Any] = {}
    queues = consumed_queues()
    if queues is not None:
        fields["queues_json"] = json.dumps(queues)
    processes = pool_processes()
    if processes is not None:
        fields["concurrency"] = str(processes)
    return fields


def add_to_beat(pipe: Any, _running: list[str]) -> None:
    """Every heartbeat: the live fields, then the status correction, in the beat's round trip."""
    worker_id = get_settings().worker_id
    fields = live_fields()
    if fields:
        pipe.hset(keys.worker_hash(worker_id), mapping=fields)
    pipe.eval(_CORRECT_STATUS, 2, keys.worker_hash(worker_id), keys.WORKERS_CHANNEL, utc_now_iso(), worker_id,
              *held_task_ids())


@signals.worker_init.connect
def remember_main_process(**_: Any) -> None:
    global _main_pid
    _main_pid = os.getpid()
    add_beat_hook(add_to_beat)


@signals.worker_ready.connect
def record_consumer(sender: Any, **_: Any) -> None:
    """The consumer is ready: remember it and record what it really consumes."""
    global _consumer
    _consumer = sender
    fields = live_fields()
    if fields:
        try:
            get_redis().hset(keys.worker_hash(get_settings().worker_id), mapping=fields)
        except Exception as exc:  # the next heartbeat writes them
            log.warning("could not record the worker's queues yet: %s", exc)
    log.info("consuming from %s", ", ".join(consumed_queues() or []) or "no queue")


def end_task_in_parent(task: Any, task_id: str, state: str, error: str) -> None:
    """A pool child was killed while running ``task_id``: record its end for it."""
    settings = get_settings()
    task_type = str(getattr(task, "task_type", "") or getattr(task, "name", "").rsplit(".", 1)[-1])
    lease = TaskLease(get_redis(), task_id, settings.worker_id, lease_ttl_s(settings.heartbeat_interval_s))

    def extra(pipe: Any) -> None:
        lease.release_in(pipe)
        record_last_error(pipe, task_id, error)

    set_worker_status(settings.worker_id, IDLE, last_task=task_id, extra=extra,
                      task_event=task_event("TASK_FAILED", settings.worker_id, task_id, error=error, state=state,
                                            taskType=task_type))
    log.warning("task %s ended in the worker's main process: %s", task_id, error)


def _in_main_process() -> bool:
    return _main_pid != 0 and os.getpid() == _main_pid


@signals.task_revoked.connect
def on_terminated(sender: Any = None, request: Any = None, terminated: bool = False, signum: Any = None,
                  **_: Any) -> None:
    """``celery control terminate`` (``revoke(terminate=True)``) killed the running child."""
    if terminated and _in_main_process() and request is not None:
        end_task_in_parent(sender, request.id, "REVOKED", f"terminated by signal {signum} (celery control terminate)")


@signals.task_failure.connect
def on_killed(sender: Any = None, task_id: str | None = None, exception: BaseException | None = None,
              **_: Any) -> None:
    """A hard ``time_limit`` (or a lost child that is not retried): the child never reported."""
    if task_id and _in_main_process() and isinstance(exception, TimeLimitExceeded | WorkerLostError):
        end_task_in_parent(sender, task_id, "FAILURE", f"{type(exception).__name__}: {exception}")

