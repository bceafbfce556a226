"""What one task is doing, read from the result backend: the one JSON shape of a task's status.

``{task_id, state, worker_id, task_name?, queue?, worker?, retries?, date_done?}`` plus,
by state, ``result`` (SUCCESS), ``progress`` (PROGRESS: the executor's fields) or
``error`` (``"ExcType: message"``, with ``error_type`` and, for a bad spec,
``error_field``). ``meshq status``, ``PipelineRun.status()`` (each stage) and
``GET /api/v1/tasks/{id}`` all show this shape. A sharded inference task
(``tasks.shards``) adds its shards' progress while they run (one more read) and,
when a shard failed, that shard and its own error.
"""

from __future__ import annotations

from typing import Any

from celery import states

from app.celery import PROGRESS_STATE
from app.core.errors import SpecError
from tasks.shards import shard_progress

CHORD_ERROR = "ChordError"  # stored under a chord body's id when a header task failed

PROGRESS = PROGRESS_STATE
STOPPED_STATES = frozenset({states.FAILURE, states.REVOKED})
_META_ONLY = ("worker_id", "taskType")  # fields CeleryProgress adds to every progress report
# Celery's result_extended fields, under the names they have here (the stage name is "name").
_EXTENDED = {"name": "task_name", "queue": "queue", "worker": "worker", "retries": "retries"}


def worker_from_hostname(hostname: Any) -> str | None:
    """``meshq-<WORKER_ID>@host`` (the node name the worker shim sets) → ``WORKER_ID``."""
    if not isinstance(hostname, str) or not hostname:
        return None
    node = hostname.split("@", 1)[0]
    return node[len("meshq-"):] if node.startswith("meshq-") else node


def stored_exception(app: Any, result: Any) -> BaseException | None:
    """The exception a failed or revoked task stored (rebuilt from its meta when needed)."""
    if isinstance(result, BaseException):
        return result
    if isinstance(result, dict) and "exc_type" in result:
        try:
            exc = app.backend.exception_to_python(result)
        except Exception:
            return None
        return exc if isinstance(exc, BaseException) else None
    return None


def _error_fields(app: Any, result: Any) -> dict[str, Any]:
    exc = stored_exception(app, result)
    if exc is None:
        if isinstance(result, dict) and "exc_type" in result:
            return {"error": f"{result['exc_type']}: {result.get('exc_message')}",
                    "error_type": str(result["exc_type"])}
        return {"error": str(result), "error_type": None}
    fields: dict[str, Any] = {"error": f"{type(exc).__name__}: {exc}", "error_type": type(exc).__name__}
    if isinstance(exc, SpecError):
        fields["error_field"] = exc.field
    return fields


def _failed_shard(app: Any, task_id: str) -> dict[str, Any] | None:
    """The error of a sharded task: the first failed shard, named, with its own error."""
    shards = shard_progress(app, task_id)
    if not shards or not shards["failed"]:
        return None
    shard = shards["failed"][0]
    fields = _error_fields(app, shard["meta"])
    fields["error"] = (f"shard {shard['index']} of {shards['total']} (task {shard['task_id']}) "
                       f"{'failed' if shard['state'] == states.FAILURE else 'was revoked'}: {fields['error']}")
    fields["failed_shard"] = shard["index"]
    return fields


def stored_meta(app: Any, raw: Any) -> dict[str, Any]:
    """Celery's meta from a raw value of its result key (read with others in one round
    trip); what ``backend.get_task_meta`` gives for a task nothing was stored for yet."""
    if not raw:
        return {"status": states.PENDING, "result": None}
    meta: dict[str, Any] = app.backend.decode_result(raw)
    return meta


def task_status(app: Any, task_id: str, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The status of ``task_id`` in the shape described above (one backend read, none when
    ``meta`` was read already; a sharded task's shards are read too while it runs)."""
    if meta is None:
        meta = app.backend.get_task_meta(task_id)
    state = str(meta.get("status") or states.PENDING)
    result = meta.get("result")
    info: dict[str, Any] = {"task_id": task_id, "state": state, "worker_id": None}
    for key, shown_as in _EXTENDED.items():
        if meta.get(key) is not None:
            info[shown_as] = meta[key]
    worker_id = None
    if state == states.SUCCESS:
        info["result"] = result
        worker_id = result.get("worker_id") if isinstance(result, dict) else None
    elif state in STOPPED_STATES:
        info.update(_error_fields(app, result))
        if info.get("error_type") == CHORD_ERROR:  # a sharded task whose shard failed?
            info.update(_failed_shard(app, task_id) or {})
    elif state == PROGRESS and isinstance(result, dict):
        info["progress"] = {k: v for k, v in result.items() if k not in _META_ONLY}
        worker_id = result.get("worker_id")
        if "shards_total" in result:  # split into shards: their progress, read now
            shards = shard_progress(app, task_id)
            if shards is not None:
                info["progress"].update(shards_done=shards["done"], shards_total=shards["total"],
                                        shards_running=shards["running"], done=shards["items_done"],
                                        total=shards["items_total"])
                worker_id = None  # the shards run on several workers
    elif state == states.STARTED and isinstance(result, dict):
        worker_id = worker_from_hostname(result.get("hostname"))
    info["worker_id"] = worker_id or worker_from_hostname(meta.get("worker"))
    if meta.get("date_done"):
        info["date_done"] = str(meta["date_done"])
    return info
