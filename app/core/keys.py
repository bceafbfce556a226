"""Every Redis key and channel name meshq uses, built in one place (DESIGN §3)."""

from __future__ import annotations

WORKERS_SET = "workers:ids"
WORKERS_CHANNEL = "workers.events"
TASKS_CHANNEL = "tasks.events"


def worker_hash(worker_id: str) -> str:
    return f"worker:{worker_id}"


def worker_heartbeat(worker_id: str) -> str:
    return f"worker:{worker_id}:hb"


def task_lease(task_id: str) -> str:
    """Held by the worker running ``task_id`` (no duplicate concurrent runs)."""
    return f"meshq:task:{task_id}:lease"


def task_runs(task_id: str) -> str:
    """Counter of how many times an executor really started for ``task_id``."""
    return f"meshq:task:{task_id}:runs"


def task_cancel(task_id: str) -> str:
    """Set when the user cancels ``task_id``; executors poll it cooperatively."""
    return f"meshq:task:{task_id}:cancel"


def task_alive(task_id: str) -> str:
    """Time (epoch seconds) of the running task's last step/batch/progress report."""
    return f"meshq:task:{task_id}:alive"


def task_sent(task_id: str) -> str:
    """Set when a meshq task is published (its queue): a queued task is known, not unknown."""
    return f"meshq:task:{task_id}:sent"


def task_last_error(task_id: str) -> str:
    """The last error a run of ``task_id`` ended with (a retry's cause, a lost worker...):
    named when the run cap gives up on the task."""
    return f"meshq:task:{task_id}:last-error"


def task_deliveries(task_id: str) -> str:
    """Counter of deliveries of ``task_id`` (caps tasks that kill their worker)."""
    return f"meshq:task:{task_id}:deliveries"


def task_shards(task_id: str) -> str:
    """JSON plan of a sharded inference task: ``[{index, count, start, stop, task_id}]``."""
    return f"meshq:task:{task_id}:shards"


def pipeline(pipeline_id: str) -> str:
    """Hash describing a submitted pipeline (stage names → task ids)."""
    return f"meshq:pipeline:{pipeline_id}"


# Sorted set of recorded pipeline (and task document) ids by submission time, newest
# highest: the web view's list. Entries older than the records' expiry are trimmed on record.
RECENT_PIPELINES = "meshq:pipelines:recent"


def task_pipeline(task_id: str) -> str:
    """Maps a stage task id back to its pipeline id."""
    return f"meshq:task:{task_id}:pipeline"


# Capability queues in use (docs/ROUTING.md): a hash of queue name → requirement JSON,
# written by submitters, read by workers to choose the queues they consume.
CAPABILITY_QUEUES = "meshq:capability-queues"
