"""Per-task leases: a task never runs twice at the same time (DESIGN §10).

The worker that runs a task holds ``meshq:task:<id>:lease`` (value: its worker
id) and its heartbeat thread refreshes it. A redelivered copy — the broker's
visibility timeout passed while the first run still goes on — finds the live
lease and waits instead of starting a second run. When the lease disappears the
copy either finds the stored result (the first run finished) or takes over (the
first worker died: the lease expired). A run counter caps tasks that kill their
worker every time.

The run counter (``meshq:task:<id>:runs``) is also where run numbers come from: each
real start of a task takes the next number from it, here and nowhere else, so a run
number is one the system issued exactly when it is at most the counter. A run older than
the counter's value was superseded by a later start: the fence refuses it for ever, even
once the later run has finished and left the lease free (``LeaseLost``).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import redis

from app.core import keys
from app.core.errors import ConfigError, LeaseLost, TaskCancelled
from app.core.settings import UNACKED_MUTEX_EXPIRE_S, unacked_restore_interval_s

log = logging.getLogger(__name__)

MIN_LEASE_TTL_S = 10
LEASE_POLL_S = 2.0  # how often a redelivered copy looks whether the lease it waits for is free
DEFAULT_MAX_TASK_RUNS = 3
# How long a task's run counter outlives its last start: as long as its result and its
# last sign of life are kept, so no key of a finished task stays for ever (issue #28).
RUNS_TTL_S = 7 * 24 * 3600

# Compare-and-act scripts: only the holder may refresh or release its lease. A refresh
# takes back a lease that expired while Redis was away (or lost its data), so a task that
# goes on running is not taken over by a copy the moment Redis returns.
_REFRESH = """
local holder = redis.call('get', KEYS[1])
if holder == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
if not holder then return redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2], 'NX') and 1 or 0 end
return 0
"""
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
# Take the lease when it is free or ours (an earlier life of this same worker id held
# it); optionally count the run in the same round trip. Returns runs so far, or:
#  -1 another worker holds the lease,  -2 the task was cancelled,
#  -3 the task already succeeded,      -4 a redelivered copy of a task that failed.
# A finished task is seen in Celery's own result key, so a duplicate message (a
# redelivery, or a chain step sent twice) never runs the work again. When the lease
# is taken, ARGV[4] (Celery's encoded STARTED meta, if any) is stored and published
# as Celery's ``task_track_started`` would, with expiry ARGV[5] seconds (0: none):
# the task start then costs one round trip instead of three, and a copy that only
# waits never overwrites the running copy's state. ARGV[6] (a TASK_STARTED event, if
# any) is published on KEYS[5] then too: once per real start, never for a dropped
# duplicate or a copy that waits.
_HELD, _CANCELLED, _SUCCEEDED, _FAILED = -1, -2, -3, -4
_ACQUIRE = """
local meta = redis.call('get', KEYS[4])
if meta then
  local ok, decoded = pcall(cjson.decode, meta)
  if ok and type(decoded) == 'table' then
    if decoded['status'] == 'SUCCESS' then return -3 end
    if decoded['status'] == 'FAILURE' and ARGV[3] == '0' then return -4 end
  end
end
if redis.call('exists', KEYS[3]) == 1 then return -2 end
local holder = redis.call('get', KEYS[1])
if holder and holder ~= ARGV[1] then return -1 end
redis.call('set', KEYS[1], ARGV[1], 'EX', ARGV[2])
if ARGV[6] ~= '' then redis.call('publish', KEYS[5], ARGV[6]) end
if ARGV[4] ~= '' then
  if tonumber(ARGV[5]) > 0 then redis.call('setex', KEYS[4], ARGV[5], ARGV[4])
  else redis.call('set', KEYS[4], ARGV[4]) end
  redis.call('publish', KEYS[4], ARGV[4])
end
if ARGV[3] == '1' then
  local runs = redis.call('incr', KEYS[2])
  redis.call('expire', KEYS[2], RUNS_TTL_S)
  return runs
end
return tonumber(redis.call('get', KEYS[2]) or '0')
""".replace("RUNS_TTL_S", str(RUNS_TTL_S))


def cancelled_at_start(reply: Any) -> bool:
    """Whether the first lease attempt (made in the task-start round trip, its reply kept as
    ``request.meshq_lease_reply``) found the task's cancel flag set."""
    try:
        return int(reply) == _CANCELLED
    except (TypeError, ValueError):
        return False


# The fence of a running task, checked at each step/batch/progress report: returns
# [cancelled (0/1), holder, latest run] where holder is the lease's owner after the
# check. A run older than the task's latest run (a later start superseded it: a paused
# worker's run) touches nothing — also when the later run has finished and left the
# lease free. Otherwise a lease that expired while nobody took it
# (this worker was slow to beat) is taken back, and a lease held is extended by its
# whole TTL; one another worker holds means this run lost the task. A run counter that
# Redis lost is restored from the running run, so the orchestrator can verify it again.
# KEYS: lease, alive, runs, cancel flags...
# ARGV: owner, ttl s, now (the run's last sign of life, read by the stuck-task watchdog),
#       this run's number (0: not known).
_FENCE = """
local latest = tonumber(redis.call('get', KEYS[3]) or '0')
local run = tonumber(ARGV[4])
if latest == 0 and run > 0 then  -- Redis lost its data: this running run is the latest issued
  redis.call('set', KEYS[3], run, 'EX', RUNS_TTL_S)
  latest = run
end
local cancelled = 0
for i = 4, #KEYS do if redis.call('exists', KEYS[i]) == 1 then cancelled = 1 end end
if run > 0 and latest > run then return {cancelled, redis.call('get', KEYS[1]) or '', latest} end
local holder = redis.call('get', KEYS[1])
if not holder then
  redis.call('set', KEYS[1], ARGV[1], 'EX', ARGV[2])
  holder = ARGV[1]
end
if holder == ARGV[1] then
  redis.call('expire', KEYS[1], ARGV[2])
  redis.call('set', KEYS[2], ARGV[3], 'EX', 7 * 24 * 3600)
end
return {cancelled, holder, latest}
""".replace("RUNS_TTL_S", str(RUNS_TTL_S))


class AlreadyFinished(Exception):
    """The task already ended (``state``): this delivery must not run it again."""

    def __init__(self, task_id: str, state: str) -> None:
        super().__init__(task_id, state)
        self.task_id = task_id
        self.state = state


def lease_ttl_s(heartbeat_interval_s: float) -> int:
    """Three missed heartbeats (at least ``MIN_LEASE_TTL_S``) and the lease is gone."""
    return max(int(3 * heartbeat_interval_s) + 1, MIN_LEASE_TTL_S)


def recovery_bound_s(visibility_timeout_s: int, heartbeat_interval_s: float) -> float:
    """Longest wait before the task of a worker killed mid-run starts again elsewhere: its
    message comes back after the visibility timeout (plus one sweep of abandoned messages),
    and the heir takes over once the dead worker's lease expired (polled every
    ``LEASE_POLL_S`` at most). A worker killed in the middle of a sweep leaves kombu's sweep
    lock behind, which delays the next sweep by up to ``UNACKED_MUTEX_EXPIRE_S``."""
    return max(visibility_timeout_s, lease_ttl_s(heartbeat_interval_s)) \
        + unacked_restore_interval_s(visibility_timeout_s) + min(LEASE_POLL_S, heartbeat_interval_s) \
        + UNACKED_MUTEX_EXPIRE_S


def max_task_runs() -> int:
    raw = os.environ.get("MESHQ_MAX_TASK_RUNS", "").strip()
    if not raw:
        return DEFAULT_MAX_TASK_RUNS
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError("MESHQ_MAX_TASK_RUNS", f"{raw!r} must be a positive integer")
    return int(raw)


LAST_ERROR_TTL_S = 7 * 24 * 3600
MAX_LAST_ERROR_CHARS = 2000


def record_last_error(pipe: Any, task_id: str, error: str) -> None:
    """Add ``error`` as the task's last error to a pipeline (the task-end round trip)."""
    pipe.set(keys.task_last_error(task_id), error[:MAX_LAST_ERROR_CHARS], ex=LAST_ERROR_TTL_S)


def refresh_leases(pipe: Any, task_ids: list[str], owner: str, ttl_s: int) -> None:
    """Add lease refreshes for ``task_ids`` to a heartbeat pipeline."""
    for task_id in task_ids:
        pipe.eval(_REFRESH, 1, keys.task_lease(task_id), owner, ttl_s * 1000)


class TaskLease:
    def __init__(self, client: redis.Redis, task_id: str, owner: str, ttl_s: int,
                 result_key: str | bytes = b"", started_meta: str | bytes = "",
                 result_expires_s: int = 0, started_event: str = "") -> None:
        self.client = client
        self.started_event = started_event  # published when the lease is taken (a real start)
        self.task_id = task_id
        self.result_key = result_key  # Celery's result-backend key of the task
        self.started_meta = started_meta  # stored under result_key when the lease is taken
        self.result_expires_s = result_expires_s
        self.key = keys.task_lease(task_id)
        self.owner = owner
        self.ttl_s = ttl_s
        self.held_since: float | None = None  # when the lease was last taken or extended (monotonic)
        self.run: int | None = None  # this run's number (set by the task once counted): the fence compares it

    def _acquire_args(self, count_run: bool) -> tuple[Any, ...]:
        return (_ACQUIRE, 5, self.key, keys.task_runs(self.task_id), keys.task_cancel(self.task_id),
                self.result_key or f"celery-task-meta-{self.task_id}", keys.TASKS_CHANNEL, self.owner, self.ttl_s,
                "1" if count_run else "0", self.started_meta, self.result_expires_s, self.started_event)

    def acquire_in(self, pipe: Any, count_run: bool) -> None:
        """Add a first acquisition attempt to a pipeline (the task-start round trip);
        hand its reply to ``wait_for_turn(first_reply=...)``."""
        pipe.eval(*self._acquire_args(count_run))

    def try_acquire(self, count_run: bool = False, reply: Any = None) -> int | None:
        """Take the lease if it is free (or left by an earlier life of this worker id).

        Returns the number of runs recorded so far (this one included when
        ``count_run``), or ``None`` when another live worker holds the lease; raises
        ``TaskCancelled`` when the task was cancelled before it could start and
        ``AlreadyFinished`` when it already ended.
        """
        asked_at = time.monotonic()
        runs = int(self.client.eval(*self._acquire_args(count_run)) if reply is None else reply)
        if runs >= 0:
            self.held_since = asked_at  # set with its whole TTL by the script
        if runs == _CANCELLED:
            raise TaskCancelled(self.task_id, "before it started")
        if runs in (_SUCCEEDED, _FAILED):
            raise AlreadyFinished(self.task_id, "SUCCESS" if runs == _SUCCEEDED else "FAILURE")
        return None if runs == _HELD else runs

    def holder(self) -> str | None:
        value = self.client.get(self.key)
        return str(value) if value is not None else None

    def wait_for_turn(self, poll_s: float, count_run: bool = False, first_reply: Any = None) -> int:
        """Block until this worker holds the lease; return the runs recorded so far.

        ``first_reply`` is the answer to an attempt already made by ``acquire_in``.
        """
        announced = False
        runs = self.try_acquire(count_run, reply=first_reply)
        while runs is None:
            if not announced:
                log.info("task %s is running on worker %s; this delivery waits for it",
                         self.task_id, self.holder())
                announced = True
            time.sleep(poll_s)
            runs = self.try_acquire(count_run)
        return runs

    def release_in(self, pipe: Any) -> None:
        """Add the release to a pipeline (the task-end round trip)."""
        pipe.eval(_RELEASE, 1, self.key, self.owner)

    def release(self) -> None:
        try:
            self.client.eval(_RELEASE, 1, self.key, self.owner)
        except redis.RedisError as exc:  # it expires by itself
            log.warning("could not release lease of task %s: %s", self.task_id, exc)

    def last_error(self) -> str | None:
        """The last error recorded for the task (``record_last_error``), if any."""
        try:
            value = self.client.get(keys.task_last_error(self.task_id))
        except redis.RedisError:
            return None
        return None if value is None else (value.decode() if isinstance(value, bytes) else str(value))

    def check(self, cancel_keys: list[str]) -> bool:
        """The fence: ``True`` if the task was cancelled; raises ``LeaseLost`` when another
        worker holds the lease now or a later run of the task started (this run never
        runs again). Also records this run's last sign of life."""
        cancelled, holder, latest = self.client.eval(
            _FENCE, 3 + len(cancel_keys), self.key, keys.task_alive(self.task_id), keys.task_runs(self.task_id),
            *cancel_keys, self.owner, self.ttl_s, repr(time.time()), self.run or 0)
        holder = holder.decode() if isinstance(holder, bytes) else str(holder)
        if self.run and int(latest) > self.run:
            raise LeaseLost(self.task_id, holder, run=self.run, later_run=int(latest))
        if holder != self.owner:
            raise LeaseLost(self.task_id, holder)
        self.held_since = time.monotonic()
        return bool(cancelled)

    def superseded(self) -> bool:
        """Whether a later run of the task than this one was started (asked of Redis)."""
        latest = latest_run(self.client, self.task_id)
        return self.run is not None and latest is not None and latest > self.run

    def surely_held(self) -> bool:
        """Whether the lease is certainly still this run's without asking Redis: it was
        taken or extended by its whole TTL less than half a TTL ago."""
        return self.held_since is not None and time.monotonic() - self.held_since < self.ttl_s / 2

    def count_run(self) -> int:
        """Record one real start of the task; return how many there have been (this run's
        number)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.incr(keys.task_runs(self.task_id))
        pipe.expire(keys.task_runs(self.task_id), RUNS_TTL_S)
        self.run = int(pipe.execute()[0])
        return self.run


def latest_run(client: redis.Redis, task_id: str) -> int | None:
    """The number of the task's latest run (None: it never started). Every run number up to
    it was issued by a start of the task; none above it was."""
    value = client.get(keys.task_runs(task_id))
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
