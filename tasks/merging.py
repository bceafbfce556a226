"""Task merging: small inference tasks for one model run as one generation batch.

When an inference task (the *leader*) starts on a worker, it looks for up to
``MESHQ_MERGE_WINDOW_MS`` at the messages waiting in the queue it came from — so every
task it takes is one this worker may run (tags, capabilities) — and claims those with
the same merge key (``merge_key``) up to ``MESHQ_MERGE_MAX_PROMPTS`` prompts in all. A
claim moves the message into kombu's unacknowledged set (``app.worker.merge_claims``):
should the worker die, kombu hands every claimed message back and each task runs again
elsewhere, once (its lease and stored result drop a second copy).

Each claimed task (a *follower*) starts as it would on its own: its lease and run count,
its STARTED state, ``TASK_STARTED`` and Celery's ``task-started`` event. The prompts of
all the tasks then run as one generation (``InferenceExecutor.run(merged=...)``); a
task cancelled meanwhile has its prompts left out of the batches still to run and ends
REVOKED. Each follower then gets its own items (in its own order), usage,
``responses.json``, delivery and postprocess export, its SUCCESS result stored as
Celery stores it, ``task-succeeded``, its lease released, and only then its message
acknowledged. A follower that fails alone (a prompt too long) fails alone. Every
result says ``merged_with`` (tasks in the generation) and ``merge_batch`` (its id).

Only plain ``meshq.inference`` messages merge: inline ``data: {type: list}`` prompts, no
shards, no chain/callbacks/chord around them, not a redelivery, not delayed (eta).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from celery import states
from celery.app.task import Context
from celery.utils.saferepr import saferepr

from app.core import keys
from app.core.errors import LeaseLost, LimitExceeded, SpecError, TaskCancelled
from app.core.events import publish_task_event, task_event, utc_now_iso
from app.core.limits import check_document, check_size
from app.core.names import check_name
from app.core.redaction import redact_secrets
from app.core.redis_client import get_redis
from app.core.settings import get_settings
from app.core.task_spec import InferenceData, InferenceTaskSpec, TaskSpec, parse_task_spec
from app.worker.lease import AlreadyFinished, TaskLease, lease_ttl_s, refresh_leases
from app.worker.merge_claims import ClaimedMessages, WaitingMessage
from tasks.executors.inference import MergedPrompts, Prompts, load_prompts
from tasks.executors.jsonl_export import write_export
from tasks.executors.progress import Progress
from tasks.progress import encoded_started_meta

log = logging.getLogger(__name__)

TASK_NAME = "meshq.inference"
# What may differ between merged tasks: where the prompts come from and what happens to
# each task's own result. Everything else (model, revision, adapters, checkpoint, engine,
# dtype/device, every generation setting, tags and resources) must be equal.
PER_TASK_FIELDS = ("data", "output", "postprocess", "sloSeconds")
SCAN_POLL_S = 0.005  # how often the window looks at the queue again


def merge_key(spec: TaskSpec) -> str | None:
    """The tasks that may run in one generation with this one; None: it never merges."""
    if not isinstance(spec, InferenceTaskSpec) or spec.shards > 1 or spec.parallel is not None:
        return None
    if not isinstance(spec.data, InferenceData) or spec.data.type != "list":
        return None
    dumped = spec.model_dump(mode="json", exclude=set(PER_TASK_FIELDS))
    return json.dumps(dumped, sort_keys=True, separators=(",", ":"))


@dataclass
class Member:
    """One task of a merged generation."""

    task_id: str
    spec: InferenceTaskSpec
    prompts: Prompts
    message: WaitingMessage | None = None  # None: the leader (Celery acknowledges it)
    request: Any = None
    lease: TaskLease | None = None
    runs: int | None = None
    started: float = field(default_factory=time.monotonic)
    started_at: str = field(default_factory=utc_now_iso)


def follower_spec(message: WaitingMessage, key: str,
                  resolvers: list[Callable[..., Any]]) -> InferenceTaskSpec | None:
    """The spec of a waiting message that may join this generation, else None."""
    headers, body = message.headers, message.body
    if headers.get("task") != TASK_NAME or headers.get("eta") or headers.get("redelivered"):
        return None
    if int(headers.get("retries") or 0) or not isinstance(body, list) or len(body) != 3:
        return None
    args, kwargs, embed = body
    if not isinstance(args, list) or len(args) != 1 or kwargs or not isinstance(embed, dict):
        return None
    if any(embed.get(name) for name in ("callbacks", "errbacks", "chain", "chord")) or headers.get("group"):
        return None
    try:
        check_name(str(headers.get("id")), "task_id")
        # The worker's message guard (app.worker.message_guard) checks the configured limit too.
        check_size(len(message.raw), get_settings().max_message_bytes, "MAX_MESSAGE_BYTES", "message")
        check_document(args[0], "spec")
        raw_spec = args[0]
        for resolve in resolvers:
            raw_spec = resolve(raw_spec, None, None)
        spec = parse_task_spec(raw_spec)
    except (ValueError, LimitExceeded, SpecError, TypeError):
        return None  # it runs alone and fails there, naming what is wrong
    if not isinstance(spec, InferenceTaskSpec) or merge_key(spec) != key:
        return None
    return spec


def claim_followers(leader: Member, key: str, claims: ClaimedMessages, window_s: float, max_prompts: int,
                    resolvers: list[Callable[..., Any]]) -> list[Member]:
    """Claim waiting tasks with ``key`` for up to ``window_s``, up to ``max_prompts`` prompts."""
    deadline = time.monotonic() + window_s
    budget = max_prompts - len(leader.prompts.texts)
    looked: set[str] = set()
    followers: list[Member] = []
    while budget > 0:
        chosen: list[tuple[WaitingMessage, InferenceTaskSpec, Prompts]] = []
        for message in claims.waiting(min(4 * max_prompts, 1024)):
            if message.tag in looked:
                continue
            looked.add(message.tag)
            spec = follower_spec(message, key, resolvers)
            if spec is None:
                continue
            try:
                prompts = load_prompts(spec, Path("."))  # inline prompts only: nothing is read
            except SpecError:
                continue
            if not all(prompts.texts):  # an empty prompt fails alone, naming its field
                continue
            if len(prompts.texts) > budget - sum(len(p.texts) for _m, _s, p in chosen):
                continue
            chosen.append((message, spec, prompts))
        by_tag = {m.tag: (m, s, p) for m, s, p in chosen}
        for message in claims.claim([m for m, _s, _p in chosen]):
            _m, spec, prompts = by_tag[message.tag]
            followers.append(Member(str(message.headers["id"]), spec, prompts, message))
            budget -= len(prompts.texts)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(SCAN_POLL_S, remaining))
    return followers


class MergedProgress(Progress):
    """The leader's progress for the whole generation; cancels one task at a time."""

    def __init__(self, inner: Any, members: list[Member], client: redis.Redis) -> None:
        self.inner = inner
        self.task_id = inner.task_id
        self.run = inner.run
        self.members = members
        self.client = client
        self.cancelled_members: set[int] = set()

    def __call__(self, force: bool = False, **fields: Any) -> None:
        self.inner(force=force, **fields)

    def cancelled(self) -> bool:
        """Record which tasks were cancelled; the generation stops only when all were."""
        if self.inner.cancelled():
            self.cancelled_members.add(0)
        try:
            pipe = self.client.pipeline(transaction=False)
            for member in self.members[1:]:
                pipe.exists(keys.task_cancel(member.task_id))
            for number, flag in enumerate(pipe.execute(), 1):
                if flag:
                    self.cancelled_members.add(number)
        except redis.RedisError:
            pass  # cannot tell now: keep going, the next batch asks again
        return len(self.cancelled_members) == len(self.members)


class KeepFresh(threading.Thread):
    """Keeps the followers' messages invisible to redelivery and their leases held while
    the generation runs (the worker's own heartbeat knows only the leader)."""

    def __init__(self, client: redis.Redis, claims: ClaimedMessages, members: list[Member], owner: str,
                 ttl_s: int, interval_s: float) -> None:
        super().__init__(daemon=True, name="meshq-merge-keeper")
        self.client, self.claims, self.members = client, claims, members
        self.owner, self.ttl_s, self.interval_s = owner, ttl_s, interval_s
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            try:
                pipe = self.client.pipeline(transaction=False)
                self.claims.refresh_in(pipe)
                refresh_leases(pipe, [m.task_id for m in self.members if m.lease is not None], self.owner,
                               self.ttl_s)
                pipe.execute()
            except redis.RedisError as exc:
                log.warning("could not refresh the merged tasks' messages: %s", exc)


def follower_request(task: Any, member: Member) -> Context:
    """The Celery request a follower would have had, for its stored meta and events."""
    assert member.message is not None
    headers = member.message.headers
    args = member.message.body[0]
    return Context(id=member.task_id, task=TASK_NAME, args=args, kwargs={}, retries=0,
                   hostname=task.request.hostname, root_id=headers.get("root_id"),
                   parent_id=headers.get("parent_id"), correlation_id=member.task_id, is_eager=False,
                   delivery_info={"exchange": member.message.exchange, "routing_key": member.message.routing_key,
                                  "redelivered": False, "priority": None})


def send_celery_event(task: Any, type_: str, task_id: str, **fields: Any) -> None:
    """A Celery event for a follower, as its own run would send it (Flower shows it)."""
    try:
        with task.app.events.default_dispatcher(hostname=task.request.hostname) as dispatcher:
            dispatcher.send(type_, uuid=task_id, **fields)
    except Exception as exc:  # an event lost must not change the task's outcome
        log.warning("could not send %s for task %s: %s", type_, task_id, exc)


def start_follower(task: Any, member: Member, client: redis.Redis, owner: str, ttl_s: int,
                   claims: ClaimedMessages) -> bool:
    """Take a follower's lease as its own start would; False when it cannot join (handled)."""
    backend = task.backend
    member.request = request = follower_request(task, member)
    member.lease = TaskLease(client, member.task_id, owner, ttl_s, result_key=backend.get_key_for_task(member.task_id),
                             started_meta=encoded_started_meta(backend, request), result_expires_s=int(backend.expires or 0),
                             started_event=task_event("TASK_STARTED", owner, member.task_id, taskType="inference"))
    assert member.message is not None
    try:
        member.runs = member.lease.try_acquire(count_run=True)
    except TaskCancelled as exc:
        member.lease = None  # never taken: a cancelled task's lease script stops before it
        end_cancelled(task, member, str(exc), claims)
        return False
    except AlreadyFinished:  # a duplicate of a finished task: dropped, as base.py drops it
        member.lease = None
        claims.ack(member.message)
        return False
    if member.runs is None:  # another worker runs it (a copy): leave it to the queue
        member.lease = None
        claims.unclaim(member.message)
        return False
    send_celery_event(task, "task-received", member.task_id, name=TASK_NAME,
                      args=saferepr(redact_secrets(request.args)), kwargs="{}", root_id=request.root_id, parent_id=request.parent_id, retries=0)
    send_celery_event(task, "task-started", member.task_id)  # the dispatcher adds pid and hostname
    return True


def finish(member: Member, claims: ClaimedMessages) -> None:
    """The follower's outcome is stored: release its lease, then acknowledge its message."""
    if member.lease is not None:
        member.lease.release()
    if member.message is not None:
        claims.ack(member.message)


def check_fence(member: Member) -> None:
    """The fence before a follower's outcome is stored: ``LeaseLost`` when another worker took it
    over (its lease, or a later run started). A follower cancelled as it joined took no lease."""
    if member.lease is not None:
        member.lease.check([])


def taken_over(member: Member, lost: LeaseLost, what: str) -> None:
    """The follower's run decides nothing: ``what`` is not recorded, its lease (the other worker's
    now) is not released and its message stays unacknowledged, for kombu to hand back if nobody
    finishes it."""
    log.warning("%s; %s", lost, what)
    member.lease = None


def end_cancelled(task: Any, member: Member, reason: str, claims: ClaimedMessages) -> None:
    """A cancelled follower ends REVOKED (as ``MeshqTask._end_cancelled`` ends a task), unless
    another worker took it over meanwhile: then that run decides its outcome, as for a result."""
    from app.artifacts.manifest import write_task_outputs
    from app.artifacts.run_record import fenced
    from tasks.base import results_root

    out_dir = results_root(get_settings().results_dir) / member.task_id
    try:
        check_fence(member)
        out_dir.mkdir(parents=True, exist_ok=True)
        with fenced(out_dir, member.runs):  # a late run's cancel never replaces a later run's outputs
            write_task_outputs(out_dir, {"task_id": member.task_id, "taskType": "inference", "cancelled": True,
                                         "message": reason, "progress": {}})
    except LeaseLost as lost:
        taken_over(member, lost, "its cancellation is not recorded")
        return
    task.backend.store_result(member.task_id, {"exc_type": "TaskCancelled", "exc_module": "app.core.errors",
                                               "exc_message": [member.task_id, reason]},
                              states.REVOKED, request=member.request)
    send_celery_event(task, "task-revoked", member.task_id, terminated=False, signum=None, expired=False,
                      reason=reason)
    publish_task_event("TASK_FAILED", get_settings().worker_id, member.task_id, error=reason, state="REVOKED",
                       taskType="inference")
    finish(member, claims)


def member_result(common: dict[str, Any], result: dict[str, Any], merged: MergedPrompts, number: int,
                  batch_id: str, members: int) -> dict[str, Any] | None:
    """Task ``number``'s own part of the generation's result; None if its prompts were dropped."""
    indices = merged.ranges()[number]
    items = [result["items"][i] for i in indices]
    if any(item is None for item in items):
        return None
    own = [dict(item, index=position) for position, item in enumerate(items)]
    prompt_tokens = sum(merged.tokens[i][0] for i in indices)
    completion_tokens = sum(merged.tokens[i][1] for i in indices)
    generate_sec = float(result.get("generate_sec") or 0)
    return {**common, "items": own,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens, "num_requests": len(own),
                      "latency_sec": result["usage"]["latency_sec"]},
            "tokens_per_s": result.get("tokens_per_s"), "generate_sec": generate_sec,
            "batches": result.get("batches"), "max_batch_size": result.get("max_batch_size"),
            "merged_with": members, "merge_batch": batch_id}


def complete_follower(task: Any, member: Member, own: dict[str, Any], claims: ClaimedMessages) -> None:
    """Write, deliver and store a follower's result, as its own run would have."""
    from tasks.base import finish_result, results_root

    settings = get_settings()
    out_dir = results_root(settings.results_dir) / member.task_id
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        export = member.spec.postprocess.jsonl_export if member.spec.postprocess is not None else None
        if export is not None:
            own["jsonl_export"] = write_export(own["items"], export, out_dir, member.runs)
        result = {"task_id": member.task_id, "taskType": "inference", "output_dir": str(out_dir),
                  "worker_id": settings.worker_id, "started_at": member.started_at,
                  "finished_at": utc_now_iso(), **own}
        assert member.lease is not None
        check_fence(member)
        delivered = finish_result(member.task_id, member.spec, out_dir, result,
                                  time.monotonic() - member.started, run=member.runs)
    except LeaseLost as lost:
        taken_over(member, lost, "nothing of it is kept")
        return
    except Exception as exc:
        fail_follower(task, member, exc, claims)
        return
    task.backend.store_result(member.task_id, delivered, states.SUCCESS, request=member.request)
    runtime = round(time.monotonic() - member.started, 3)
    send_celery_event(task, "task-succeeded", member.task_id, result=saferepr(redact_secrets(delivered)),
                      runtime=runtime)
    publish_task_event("TASK_SUCCEEDED", settings.worker_id, member.task_id, taskType="inference",
                       runtime_sec=runtime)
    finish(member, claims)


def fail_follower(task: Any, member: Member, exc: BaseException, claims: ClaimedMessages) -> None:
    """A follower that failed alone: FAILURE stored, ``task-failed`` sent, message acknowledged —
    unless another worker took it over meanwhile (its run decides the outcome)."""
    try:
        check_fence(member)
    except LeaseLost as lost:
        taken_over(member, lost, f"its failure ({exc}) is not recorded")
        return
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    task.backend.mark_as_failure(member.task_id, exc, traceback=tb, request=member.request,
                                 call_errbacks=False)
    send_celery_event(task, "task-failed", member.task_id, exception=saferepr(exc), traceback=tb)
    publish_task_event("TASK_FAILED", get_settings().worker_id, member.task_id,
                       error=f"{type(exc).__name__}: {exc}", state="FAILURE", taskType="inference")
    finish(member, claims)


def run_with_merges(task: Any, executor: Any, spec: TaskSpec, out_dir: Path, progress: Any) -> dict[str, Any] | None:
    """Run the leader ``task`` together with the waiting tasks it can take; None when merging
    is off or it found none (the caller runs it alone). Raises ``TaskCancelled`` when the
    leader itself was cancelled (the followers are finished first)."""
    if not isinstance(spec, InferenceTaskSpec):
        return None
    settings = get_settings()
    key = merge_key(spec)
    queue = (task.request.delivery_info or {}).get("routing_key")
    if settings.merge_window_ms <= 0 or key is None or not queue:
        return None
    client = get_redis()
    options = dict(task.app.conf.broker_transport_options or {})
    claims = ClaimedMessages(client, str(queue), str(options.get("unacked_key", "unacked")),
                             str(options.get("unacked_index_key", "unacked_index")))
    leader = Member(task.request.id, spec, load_prompts(spec, out_dir))
    if not all(leader.prompts.texts):  # it fails alone, naming the empty prompt
        return None
    from tasks.base import SPEC_RESOLVERS

    claimed = claim_followers(leader, key, claims, settings.merge_window_ms / 1000, settings.merge_max_prompts,
                              SPEC_RESOLVERS)
    if not claimed:
        return None
    ttl_s = lease_ttl_s(settings.heartbeat_interval_s)
    followers = [m for m in claimed if start_follower(task, m, client, settings.worker_id, ttl_s, claims)]
    if not followers:
        return None
    members = [leader, *followers]
    keeper = KeepFresh(client, claims, followers, settings.worker_id, ttl_s,
                       min(settings.heartbeat_interval_s, max(1.0, settings.visibility_timeout_s / 4)))
    keeper.start()
    batch_id = uuid.uuid4().hex[:12]
    log.info("task %s runs with %d merged task(s) as batch %s", leader.task_id, len(followers), batch_id)
    try:
        starts: list[int] = []
        texts: list[str] = []
        for member in members:
            starts.append(len(texts))
            texts.extend(member.prompts.texts)
        merged_progress = MergedProgress(progress, members, client)
        merged = MergedPrompts(Prompts(texts), starts,
                               dropped=lambda: {i for n in merged_progress.cancelled_members
                                                for i in merged.ranges()[n]})
        run_spec = spec.model_copy(update={"postprocess": None})
        try:
            result = executor.run(run_spec, out_dir, merged_progress, merged=merged)
        except TaskCancelled:  # every task of the batch was cancelled
            result = None
        except LeaseLost:
            raise  # this worker lost the leader: the followers' messages come back to the queue
        except Exception:
            for member in followers:  # each runs again on its own (and fails alone, if it must)
                if member.lease is not None:
                    member.lease.release()
                if member.message is not None:
                    claims.unclaim(member.message)
            raise
    finally:
        keeper.stopped.set()
    common = {k: v for k, v in (result or {}).items()
              if k not in ("items", "usage", "tokens_per_s", "generate_sec", "batches", "max_batch_size")}
    outcomes: list[dict[str, Any] | None] = []
    for number, member in enumerate(members):
        own = member_result(common, result, merged, number, batch_id, len(members)) if result else None
        outcomes.append(own)
        if number == 0:
            continue
        if number in merged.errors:
            fail_follower(task, member, merged.errors[number], claims)
        elif own is None:
            end_cancelled(task, member, "cancelled while it ran in a merged batch", claims)
        else:
            complete_follower(task, member, own, claims)
    if 0 in merged.errors:
        raise merged.errors[0]
    if outcomes[0] is None:
        raise TaskCancelled(leader.task_id, "while it ran in a merged batch")
    leader_result = outcomes[0]
    export = spec.postprocess.jsonl_export if spec.postprocess is not None else None
    if export is not None:
        leader_result["jsonl_export"] = write_export(leader_result["items"], export, out_dir, progress.run)
    return leader_result
