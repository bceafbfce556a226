"""Worker side of pipelines: resolve ``${...}`` just before a stage runs, pin ``runOn`` stages.

Installed into ``tasks.base.SPEC_RESOLVERS`` when a worker imports this module
(``app.celeryconfig.include``). For every task it receives:

* a stage of a cancelled pipeline ends as REVOKED before doing anything;
* ``${stage.result...}`` (and a reference to the previous stage by name) resolves
  against ``previous_result``, the argument Celery's chain passes in (graph nodes
  are immutable signatures and get none);
* ``${<name>.result...}`` for any other ancestor reads its result from the
  result backend by the task id recorded at submission (``stage_result``; a linear
  stage's ancestors are the stages before it, ``links_of``). Each task's Celery result
  is exactly its own ``responses.json`` (DESIGN §6), so results cannot pile up in
  the values passed along the chain; the backend already holds every stage's
  result, and reading only the referenced ones keeps messages small;
* a graph node does not start once another node failed (it ends SKIPPED);
* if the next stage in the chain says ``runOn: {stage: X}`` and X is this stage
  or one of its ancestors, its message is
  pointed at the own queue of the worker that ran X before Celery sends it (the
  worker id is only known at run time; the rest of the chain travels in
  ``request.chain``, where the next signature's options decide its queue);
* a ``runOn`` stage that still reaches another worker forwards itself there with
  ``Task.replace`` (same task id, the rest of the chain follows it).

A plain Celery chain (no ``pipeline`` kwarg) gets ``${stage.result...}`` only.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from celery import current_task, states
from celery.exceptions import Ignore

from app.core import keys, routing
from app.core.errors import SpecError
from app.core.limits import check_document, check_size, json_bytes
from app.core.redis_client import get_redis
from app.core.settings import get_settings
from app.worker.lease import cancelled_at_start
from pipelines.graph_template import expand_graph_template
from pipelines.references import PREVIOUS_STAGE, resolve_stage_references
from pipelines.status import SKIPPED
from tasks.base import SPEC_RESOLVERS

log = logging.getLogger(__name__)

MAX_RUN_ON_FORWARDS = 3  # a runOn stage bouncing between workers more often than this fails
RESULT_STORE_WAIT_S = 30.0  # longest wait for a dependency's result to be stored (see stage_result)


def links_of(info: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The nodes this one depends on and every ancestor (the results it may read).

    A graph node's message lists them; a linear stage's leaves them out (its one
    dependency is the stage before it, its ancestors every stage before it).
    """
    if "ancestors" in info:
        return list(info.get("depends_on") or []), list(info["ancestors"])
    earlier = [s["name"] for s in info["stages"][:int(info["index"])]]
    return earlier[-1:], earlier


def stage_result(task: Any, info: dict[str, Any], name: str, previous: Any) -> Any:
    """The result of ancestor ``name`` (``stage``: the one dependency) of ``info``'s stage."""
    depends_on, ancestors = links_of(info)
    if name == PREVIOUS_STAGE and len(depends_on) == 1:
        name = depends_on[0]
    if name not in ancestors:
        names = [s["name"] for s in info["stages"]]
        if name not in names:
            raise LookupError(f"unknown stage {name!r} (stages: {', '.join(names)})")
        raise LookupError(f"{name!r} is not an ancestor of {info['stage']!r}: it may not have run")
    if previous is not None and depends_on == [name]:
        return previous  # a chain handed the one dependency's result over
    task_id = next(s["task_id"] for s in info["stages"] if s["name"] == name)
    # Celery sends the next task of a chain (and a chord's body) just before it stores the
    # finished task's result, so a dependency may still read STARTED for a moment.
    deadline = time.monotonic() + RESULT_STORE_WAIT_S
    delay_s = 0.02
    while True:
        meta = task.app.backend.get_task_meta(task_id)
        state = meta.get("status")
        if state == states.SUCCESS:
            return meta.get("result")
        if state in states.READY_STATES or time.monotonic() > deadline:
            raise LookupError(f"{name!r} (task {task_id}) has no result: its state is {state}")
        time.sleep(delay_s)
        delay_s = min(delay_s * 2, 0.5)


def _plain_results(previous: Any) -> Any:
    def results(name: str) -> Any:
        if name != PREVIOUS_STAGE:
            raise LookupError(f"a plain Celery chain knows only the previous stage's result: "
                              f"write ${{stage.result...}}, not {name!r}")
        if previous is None:
            raise LookupError("there is no previous stage (this task did not run inside a chain)")
        return previous

    return results


def _stop_if_cancelled(task: Any, info: dict[str, Any]) -> None:
    reply = getattr(task.request, "meshq_lease_reply", None)
    if reply is not None:  # the task-start round trip read the cancel flag a moment ago
        cancelled = cancelled_at_start(reply)
    else:
        try:
            cancelled = bool(get_redis().exists(keys.task_cancel(task.request.id)))
        except redis.RedisError:
            return
    if cancelled:
        log.info("stage %s of pipeline %s was cancelled before it started", info["stage"], info["id"])
        task.update_state(state=states.REVOKED, meta={
            "exc_type": "TaskCancelled", "exc_module": "app.core.errors",
            "exc_message": [task.request.id, "before it started"]})
        raise Ignore()


def _skip_if_a_branch_failed(task: Any, info: dict[str, Any]) -> None:
    """A graph node does not start once another node of its pipeline failed (it ends SKIPPED).

    Nodes already running elsewhere finish; this only keeps new ones from starting
    (a branch that does not depend on the failed node would otherwise go on). A chain
    has no branches: a stage runs only when every stage before it succeeded.
    """
    if not info.get("graph"):
        return
    others = [s for s in info["stages"] if s["name"] != info["stage"]]
    backend = task.app.backend
    try:
        raw = backend.client.mget([backend.get_key_for_task(s["task_id"]) for s in others]) if others else []
    except redis.RedisError:
        return
    for node, value in zip(others, raw, strict=True):
        if not value:
            continue
        meta = backend.decode_result(value)
        result = meta.get("result")
        if meta.get("status") == states.FAILURE and not (
                isinstance(result, dict) and result.get("exc_type") == "ChordError"):
            log.info("node %s of pipeline %s does not start: node %s failed", info["stage"], info["id"],
                     node["name"])
            task.update_state(state=SKIPPED, meta={"skipped": True, "reason": f"node {node['name']!r} failed"})
            raise Ignore()


def worker_of(task: Any, info: dict[str, Any], stage_name: str, previous: Any) -> str:
    """The worker id that ran ``stage_name`` (this worker when it is the current stage)."""
    if stage_name == info["stage"]:
        return get_settings().worker_id
    result = stage_result(task, info, stage_name, previous)
    worker_id = result.get("worker_id") if isinstance(result, dict) else None
    if not worker_id:
        raise SpecError(f"{info['location']}", f"runOn: stage {stage_name!r} recorded no worker_id")
    return str(worker_id)


def _check_run_on(task: Any, info: dict[str, Any], previous: Any, raw_spec: Any) -> None:
    """A ``runOn`` stage that reached another worker forwards itself (same task id).

    The stage before it normally points it at the right queue; this covers what that
    cannot know, e.g. a redelivered copy of the earlier stage that returned the
    result of the first run, made on another worker.
    """
    target = info.get("run_on")
    if not target:
        return
    wanted = worker_of(task, info, target, previous)
    here = get_settings().worker_id
    if wanted == here:
        return
    forwards = int(task.request.get("replaced_task_nesting") or 0)
    if forwards >= MAX_RUN_ON_FORWARDS:
        where = info["location"].rsplit(".spec", 1)[0]
        raise SpecError(f"{where}.runOn", f"stage {info['stage']!r} must run on worker {wanted} "
                                          f"(which ran {target!r}) but was delivered to {here} "
                                          f"{forwards + 1} times")
    queue = routing.queue_for_worker(get_settings().task_topic, wanted)
    log.info("stage %s of pipeline %s reached worker %s: forwarding it to %s (queue %s)",
             info["stage"], info["id"], here, wanted, queue)
    args = (raw_spec,) if previous is None else (previous, raw_spec)
    raise task.replace(task.signature(args, {"pipeline": info}, queue=queue))


def _route_next_stage(task: Any, info: dict[str, Any], previous: Any) -> None:
    """Point the next stage at the worker its ``runOn`` names, before Celery sends it."""
    remaining = task.request.chain
    if not remaining:
        return
    following = remaining[-1]
    next_info = (following.get("kwargs") or {}).get("pipeline")
    if not isinstance(next_info, dict) or next_info.get("id") != info["id"] or not next_info.get("run_on"):
        return
    if next_info["run_on"] != info["stage"] and next_info["run_on"] not in links_of(info)[1]:
        return  # a result this stage may not read: the next stage forwards itself (_check_run_on)
    worker_id = worker_of(task, info, next_info["run_on"], previous)
    queue = routing.queue_for_worker(get_settings().task_topic, worker_id)
    options = following.setdefault("options", {})
    options["queue"] = queue
    options.pop("routing_key", None)
    options.pop("exchange", None)
    log.info("stage %s of pipeline %s will run on worker %s (queue %s)",
             next_info["stage"], info["id"], worker_id, queue)


def resolve_spec(raw_spec: Any, previous: Any, pipeline: dict[str, Any] | None) -> Any:
    """The ``SPEC_RESOLVERS`` hook: the spec this task really runs with."""
    task = current_task
    max_bytes = get_settings().max_message_bytes
    if pipeline is None:
        return resolve_stage_references(raw_spec, _plain_results(previous), "spec", max_bytes)
    _stop_if_cancelled(task, pipeline)
    _skip_if_a_branch_failed(task, pipeline)
    _check_run_on(task, pipeline, previous, raw_spec)

    def results(name: str) -> Any:
        return stage_result(task, pipeline, name, previous)

    resolved = resolve_stage_references(raw_spec, results, pipeline["location"], max_bytes)
    expanded = expand_graph_template(resolved, results, pipeline["location"])
    if expanded is not resolved:  # prompts built from results: bounded like the references
        check_size(json_bytes(expanded), max_bytes, "MAX_MESSAGE_BYTES", pipeline["location"])
        check_document(expanded, pipeline["location"])
        resolved = expanded
    _route_next_stage(task, pipeline, previous)
    return resolved


def install() -> None:
    if resolve_spec not in SPEC_RESOLVERS:
        SPEC_RESOLVERS.append(resolve_spec)


install()
