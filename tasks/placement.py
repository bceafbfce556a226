"""Where a task goes: its queue from its requirement, recorded and checked at submission.

One path for every way a task enters (``tasks.submit``, ``Pipeline.submit``, the HTTP
API through pipelines, and a plain ``apply_async`` through the Celery router
``tasks.router``):

* ``queue_for_spec`` names the queue (pure): the worker's own queue when pinned, the
  tag queue for tags alone, else the capability queue of the whole requirement;
* ``record_queue`` records a capability queue in ``meshq:capability-queues`` and, the
  first time, tells every worker to look (``meshq_sync_queues``) so those that can
  serve it start consuming it;
* ``queue_warning`` says when no live worker consumes the queue (tags) or none has
  what the requirement asks for (capabilities): the task waits until one starts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import redis

from app.celery import app
from app.core import keys, routing
from app.core.capabilities import Capabilities, Requirement, requirement_of, requirement_of_raw
from app.core.events import utc_now_iso
from app.core.redis_client import get_redis
from app.core.settings import get_settings
from app.core.task_spec import BaseTaskSpec
from app.worker.capability_queues import record_entry
from app.worker.registry import list_workers
from app.worker.signals import SYNC_QUEUES_COMMAND

log = logging.getLogger(__name__)


def requirement_for(spec: BaseTaskSpec | Mapping[str, Any]) -> Requirement:
    """The requirement of a validated spec, or of a raw spec dict (routing fields only)."""
    return requirement_of(spec) if isinstance(spec, BaseTaskSpec) else requirement_of_raw(spec)


def queue_for(requirement: Requirement, worker_id: str | None = None) -> str:
    """The queue a task with ``requirement`` is sent to (no I/O): pinned, tags, or capabilities."""
    topic = get_settings().task_topic
    if worker_id:
        return routing.queue_for_worker(topic, worker_id)
    return routing.queue_for_requirement(topic, requirement)


def queue_for_spec(spec: BaseTaskSpec | Mapping[str, Any], worker_id: str | None = None) -> str:
    """The queue ``spec`` is sent to (``queue_for`` of its requirement)."""
    return queue_for(requirement_for(spec), worker_id)


def record_queue(queue: str, requirement: Requirement, client: redis.Redis | None = None) -> None:
    """Record a capability queue before anything is sent to it (nothing to do for others);
    ``requirement``: what its tasks need (the caller worked it out once for the queue too)."""
    if not routing.is_capability_queue(get_settings().task_topic, queue):
        return
    client = client or get_redis()
    if client.hsetnx(keys.CAPABILITY_QUEUES, queue, record_entry(requirement, utc_now_iso())):
        log.info("new capability queue %s: asking the workers that can serve it to consume it", queue)
        try:
            app.control.broadcast(SYNC_QUEUES_COMMAND, reply=False)
        except Exception as exc:  # each worker's heartbeat notices the new record anyway
            log.warning("could not broadcast %s: %s", SYNC_QUEUES_COMMAND, exc)


# The live workers, read at most once a second per process for a submission that finds
# its queue served: reading every worker's hash on each submit halved the throughput of
# a loop of submissions. A warning is never given from that cache: "no live worker" is
# always checked afresh (a worker that just started is seen at once).
LIVE_WORKERS_CACHE_S = 1.0
_live_workers: tuple[float, list[dict[str, Any]]] | None = None


def live_workers(client: redis.Redis | None = None, *, cached: bool = False) -> list[dict[str, Any]]:
    """The workers whose heartbeat key is alive (``list_workers``); ``cached``: a read
    of up to ``LIVE_WORKERS_CACHE_S`` ago will do."""
    global _live_workers
    now = time.monotonic()
    if cached and _live_workers is not None and now - _live_workers[0] < LIVE_WORKERS_CACHE_S:
        return _live_workers[1]
    workers = [w for w in list_workers(client or get_redis()) if w["alive"]]
    _live_workers = (now, workers)
    return workers


# The queues of the last read of the live workers (that very list): a submission that finds
# its queue served asks this of the cached read, and building the set again on every send cost
# in proportion to the fleet (one entry per queue of every worker).
_live_queues: tuple[list[dict[str, Any]], frozenset[str]] | None = None


def live_queues(client: redis.Redis | None = None, *, cached: bool = False) -> frozenset[str]:
    """Every queue consumed by a worker whose heartbeat key is alive."""
    global _live_queues
    workers = live_workers(client, cached=cached)
    memo = _live_queues  # read once: another thread may replace it meanwhile
    if memo is None or memo[0] is not workers:
        memo = _live_queues = (workers, frozenset(q for worker in workers for q in worker.get("queues") or []))
    return memo[1]


def capability_warning(need: Requirement, queue: str, client: redis.Redis | None = None) -> str | None:
    """A message when no live worker has what ``need`` asks for, with what each lacks."""
    if any(not Capabilities.from_dict(w.get("capabilities") or {}).unmet(need)
           for w in live_workers(client, cached=True)):
        return None
    workers = live_workers(client)
    lacking = []
    for worker in workers:
        capabilities = Capabilities.from_dict(worker.get("capabilities") or {})
        unmet = capabilities.unmet(need)
        if not unmet:
            return None
        lacking.append(f"{worker['worker_id']}: {'; '.join(unmet)}")
    detail = f" ({' | '.join(lacking)})" if lacking else " (no live worker)"
    return (f"no live worker has what the task needs ({need.describe()}){detail}; "
            f"it waits in queue {queue!r} until such a worker starts")


def queue_warning(queue: str, requirement: Requirement | None = None) -> str | None:
    """``None`` when a live worker will take tasks from ``queue``, else what to tell the user."""
    try:
        if requirement is not None and routing.is_capability_queue(get_settings().task_topic, queue):
            return capability_warning(requirement, queue)
        if queue in live_queues(cached=True) or queue in live_queues():
            return None
    except redis.RedisError as exc:
        return f"could not check live workers: {exc}"
    return f"no live worker consumes queue {queue!r}; the task waits until one starts"
