"""The worker's presence in Redis (DESIGN §3): registration, status, heartbeats.

The registry lives in the worker's main process. Its heartbeat thread sends one
Redis pipeline per beat (the changing fields + ``SETEX worker:<id>:hb`` + publish), so
it keeps beating while a pool child runs a task, and it survives Redis being down:
a failed beat is logged and the next one tries again. A beat that finds the hash's
static fields gone (a Redis that lost its data) writes them again, so the worker is
back at the next beat.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import redis

from app.core import events, keys
from app.core.capabilities import Capabilities
from app.core.redaction import redact
from app.core.redis_client import get_redis
from app.core.settings import Settings
from app.worker import hardware

log = logging.getLogger(__name__)

STARTING, IDLE, RUNNING, STOPPING = "STARTING", "IDLE", "RUNNING", "STOPPING"
# A worker's hash outlives its last heartbeat by up to this long, at least 7/8 of it (a
# worker killed without its shutdown leaves it behind): the web view still names a dead worker for a day, and a
# fleet that replaces its workers does not keep every hash it ever had.
WORKER_RECORD_TTL_S = 24 * 3600


def public_env(settings: Settings) -> dict[str, Any]:
    """The worker's configuration as stored in ``env_json`` (no secrets)."""
    return {
        "REDIS_URL": redact(settings.redis_url),
        "RESULTS_DIR": os.path.abspath(settings.results_dir),
        "TASK_TOPIC": settings.task_topic,
        "HEARTBEAT_INTERVAL_SEC": settings.heartbeat_interval_s,
        "WORKER_TAGS": ",".join(settings.worker_tags),
        "LOG_LEVEL": settings.log_level,
        "ORCHESTRATOR_BASE_URL": settings.orchestrator_base_url,
        "ORCHESTRATOR_TOKEN": "set" if settings.orchestrator_token else "",
        "MESHQ_VISIBILITY_TIMEOUT_S": settings.visibility_timeout_s,
    }


def add_status_commands(pipe: Any, worker_id: str, status: str, *, current_task: str = "",
                        last_task: str | None = None, task_event: str | None = None) -> None:
    """Add a status change to a pipeline: the hash's changing fields, ``STATUS`` on the
    workers channel and, if given, a ``tasks.events`` message."""
    fields: dict[Any, Any] = {"status": status, "current_task": current_task,
                              "last_seen": events.utc_now_iso()}
    if last_task is not None:
        fields["last_task"] = last_task
    pipe.hset(keys.worker_hash(worker_id), mapping=fields)
    pipe.publish(keys.WORKERS_CHANNEL, events.worker_event(
        "STATUS", worker_id, status=status,
        payload={"current_task": current_task, "last_task": last_task}))
    if task_event is not None:
        pipe.publish(keys.TASKS_CHANNEL, task_event)


def set_worker_status(worker_id: str, status: str, *, current_task: str = "",
                      last_task: str | None = None, client: redis.Redis | None = None,
                      task_event: str | None = None,
                      extra: Callable[[Any], None] | None = None) -> list[Any] | None:
    """Record a status change (from any process of the worker) and publish ``STATUS``.

    ``task_event`` (a serialised ``tasks.events`` message) rides in the same
    round trip, so a task start or end costs one Redis call; ``extra(pipe)`` may add
    more commands to it, whose replies are returned (``None`` if Redis failed).
    """
    client = client or get_redis()
    try:
        pipe = client.pipeline(transaction=False)
        add_status_commands(pipe, worker_id, status, current_task=current_task, last_task=last_task,
                            task_event=task_event)
        own = len(pipe)
        if extra is not None:
            extra(pipe)
        return list(pipe.execute(raise_on_error=False)[own:])
    except redis.RedisError as exc:
        log.warning("could not record status %s for worker %s: %s", status, worker_id, exc)
        return None


class WorkerRegistry:
    """Registers one worker, beats for it in a thread, unregisters it on shutdown."""

    def __init__(self, settings: Settings, queues: Iterable[str], *,
                 active_task_ids: Callable[[], list[str]] = list,
                 on_beat: Callable[[Any, list[str]], Any] | None = None,
                 on_capability_queues: Callable[[int], None] | None = None,
                 client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.worker_id = settings.worker_id
        self.queues = list(queues)
        self.client = client or get_redis(settings.redis_url)
        # Parent-side view of what runs now; used to restore status after a Redis flush.
        self.active_task_ids = active_task_ids
        # Extra commands added to every beat's pipeline (e.g. task lease refresh).
        self.on_beat = on_beat
        # Called with the number of recorded capability queues after every beat.
        self.on_capability_queues = on_capability_queues
        self.started_at = events.utc_now_iso()
        self.hardware = hardware.probe(settings.fake_hardware)
        self.capabilities = Capabilities.from_hardware(self.hardware, settings.worker_tags, hardware.features())
        self.node = ""  # the Celery node name, once the worker has one
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._redis_was_down = False
        self._record_expiry_set_at: float | None = None

    # -- the hash -------------------------------------------------------------
    def static_fields(self) -> dict[Any, Any]:
        return {
            "worker_id": self.worker_id,
            "started_at": self.started_at,
            "pid": str(os.getpid()),
            "env_json": json.dumps(public_env(self.settings)),
            "hardware_json": json.dumps(self.hardware),
            "tags_json": json.dumps(list(self.settings.worker_tags)),
            "queues_json": json.dumps(self.queues),
            "capabilities_json": json.dumps(self.capabilities.to_dict()),
            "node": self.node,
            "cost_per_hour": str(self.settings.cost_per_hour),
        }

    def add_queues(self, queues: Iterable[str]) -> None:
        """Record queues the worker started consuming (its hash says so at once)."""
        self.queues.extend(q for q in queues if q not in self.queues)
        try:
            self.client.hset(keys.worker_hash(self.worker_id), "queues_json", json.dumps(self.queues))
        except redis.RedisError as exc:  # the next heartbeat writes it again
            log.warning("could not record the queues of worker %s: %s", self.worker_id, exc)

    def register(self) -> None:
        """Write every field with status ``STARTING`` and publish ``REGISTER``."""
        now = events.utc_now_iso()
        fields: dict[Any, Any] = self.static_fields() | {"status": STARTING, "last_seen": now,
                                         "current_task": "", "last_task": ""}
        pipe = self.client.pipeline(transaction=False)
        self._add_record(pipe, fields)
        pipe.setex(keys.worker_heartbeat(self.worker_id), self.settings.heartbeat_ttl_s, now)
        pipe.publish(keys.WORKERS_CHANNEL, events.worker_event(
            "REGISTER", self.worker_id, status=STARTING, tags=list(self.settings.worker_tags),
            metrics=hardware.metrics(), payload={"queues": self.queues, "hardware": self.hardware}))
        pipe.execute()
        self._record_expiry_set_at = time.monotonic()
        log.info("worker %s registered (tags %s, %d queues)", self.worker_id,
                 ",".join(self.settings.worker_tags) or "-", len(self.queues))

    def set_status(self, status: str, current_task: str = "") -> None:
        set_worker_status(self.worker_id, status, current_task=current_task, client=self.client)

    # -- heartbeats -----------------------------------------------------------
    def beat(self) -> None:
        """One heartbeat: one Redis round trip. Only what changes is written (the time, the
        load); the static fields go again only when Redis lost the hash (issue #28: an idle
        fleet's Redis traffic is per worker, not per worker times its hash's size)."""
        now = events.utc_now_iso()
        running = self.active_task_ids()
        hkey = keys.worker_hash(self.worker_id)
        load = hardware.metrics()
        pipe = self.client.pipeline(transaction=False)
        # The latest load readings stay in the hash too: a reader of the registry (the web
        # view) sees GPU use without listening to the channel.
        pipe.hset(hkey, mapping={"last_seen": now, "metrics_json": json.dumps(load)})
        # Its reply (1: the field was missing) says the rest must be written again (a status
        # write of the pool child may have re-created the hash without the static fields).
        pipe.hsetnx(hkey, "worker_id", self.worker_id)
        pipe.setex(keys.worker_heartbeat(self.worker_id), self.settings.heartbeat_ttl_s, now)
        if self._record_expiry_due():
            pipe.expire(hkey, WORKER_RECORD_TTL_S)
        pipe.publish(keys.WORKERS_CHANNEL, events.worker_event(
            "HEARTBEAT", self.worker_id, status=RUNNING if running else IDLE,
            tags=list(self.settings.worker_tags), metrics=load,
            payload={"current_tasks": running}))
        pipe.hlen(keys.CAPABILITY_QUEUES)
        recorded_at = len(pipe) - 1
        after = self.on_beat(pipe, running) if self.on_beat is not None else None
        replies = pipe.execute()
        if replies[1]:  # the hash was gone (Redis restarted empty, or it expired): write it whole
            self._restore_record(running)
        for start, end, callback in after or ():  # hooks that want their replies
            callback(replies[start:end])
        if self.on_capability_queues is not None:
            self.on_capability_queues(int(replies[recorded_at]))

    def _record_expiry_due(self) -> bool:
        """Whether this beat pushes the hash's expiry back (a few times per TTL, not each beat)."""
        now = time.monotonic()
        if self._record_expiry_set_at is not None and now - self._record_expiry_set_at < WORKER_RECORD_TTL_S / 8:
            return False
        self._record_expiry_set_at = now
        return True

    def _restore_record(self, running: list[str]) -> None:
        hkey = keys.worker_hash(self.worker_id)
        pipe = self.client.pipeline(transaction=False)
        self._add_record(pipe, self.static_fields())
        # Status is owned by the process running tasks; only restored when Redis lost it.
        pipe.hsetnx(hkey, "status", RUNNING if running else IDLE)
        pipe.hsetnx(hkey, "current_task", running[0] if running else "")
        pipe.execute()
        self._record_expiry_set_at = time.monotonic()

    def _add_record(self, pipe: Any, fields: dict[Any, Any]) -> None:
        """The worker's hash (``fields``), its expiry and its id in ``workers:ids``."""
        pipe.hset(keys.worker_hash(self.worker_id), mapping=fields)
        pipe.expire(keys.worker_hash(self.worker_id), WORKER_RECORD_TTL_S)
        pipe.sadd(keys.WORKERS_SET, self.worker_id)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_interval_s):
            try:
                self.beat()
            except Exception as exc:  # Redis down, or anything else: never kill the thread
                if not self._redis_was_down:
                    log.warning("heartbeat failed (%s); retrying every %ss", exc,
                                self.settings.heartbeat_interval_s)
                self._redis_was_down = True
            else:
                if self._redis_was_down:
                    log.info("heartbeat resumed: Redis is reachable again")
                self._redis_was_down = False

    def start_heartbeat(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="meshq-heartbeat", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop beating, remove the worker's keys and publish ``UNREGISTER``."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.settings.heartbeat_interval_s + 5)
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.srem(keys.WORKERS_SET, self.worker_id)
            pipe.delete(keys.worker_hash(self.worker_id), keys.worker_heartbeat(self.worker_id))
            pipe.publish(keys.WORKERS_CHANNEL, events.worker_event(
                "UNREGISTER", self.worker_id, status=STOPPING, tags=list(self.settings.worker_tags)))
            pipe.execute()
            log.info("worker %s unregistered", self.worker_id)
        except redis.RedisError as exc:
            log.warning("could not unregister worker %s: %s (its :hb key will expire)",
                        self.worker_id, exc)


def list_workers(client: redis.Redis) -> list[dict[str, Any]]:
    """Every registered worker's hash, decoded, with ``alive`` (its ``:hb`` key exists)."""
    ids = sorted(str(i) for i in client.smembers(keys.WORKERS_SET))
    if not ids:
        return []
    pipe = client.pipeline(transaction=False)
    for worker_id in ids:
        pipe.hgetall(keys.worker_hash(worker_id))
        pipe.ttl(keys.worker_heartbeat(worker_id))
    replies = pipe.execute()
    workers = []
    gone = []
    for worker_id, fields, ttl in zip(ids, replies[::2], replies[1::2], strict=True):
        if not fields:  # its hash expired (the worker died a day ago): forget it
            gone.append(worker_id)
            continue
        worker: dict[str, Any] = {k: v for k, v in fields.items() if not k.endswith("_json")}
        for name in ("env", "hardware", "tags", "queues", "capabilities", "metrics"):
            raw = fields.get(f"{name}_json")
            worker[name] = json.loads(raw) if raw else None
        worker["worker_id"] = worker_id
        worker["alive"] = ttl is not None and ttl > 0
        worker["hb_ttl_s"] = ttl if ttl and ttl > 0 else 0
        workers.append(worker)
    if gone:
        with contextlib.suppress(redis.RedisError):  # a reader that may not write: next time
            client.srem(keys.WORKERS_SET, *gone)
    return workers
