"""One task at a time per worker (a task owns the whole GPU), enforced rather than assumed.

A worker with ``-c 2``/``--concurrency 2``, ``--concurrency auto`` or ``--autoscale`` is
refused at start-up; ``celery control pool_grow`` is answered with an error instead of
starting a second pool process (Celery's own command would run two tasks on one GPU while
the worker record says one). More throughput: start more workers (one per GPU).
"""

from __future__ import annotations

from typing import Any

from celery import signals
from celery.worker import control  # Celery's commands, registered first so ours replace them
from celery.worker.control import control_command

from app.errors import ConfigError
from app.worker.startup import refuse

ONE_TASK_AT_A_TIME = ("a meshq worker runs one task at a time (one task per GPU); "
                      "start one worker per GPU instead")


@signals.worker_init.connect
def refuse_concurrency(sender: Any, **_: Any) -> None:
    if getattr(sender, "options", {}).get("autoscale"):  # the Pool bootstep reads it later
        refuse(ConfigError("--autoscale", ONE_TASK_AT_A_TIME))
    concurrency = getattr(sender, "concurrency", 1)
    if concurrency != 1:
        refuse(ConfigError("--concurrency", f"{concurrency!r} asked, but {ONE_TASK_AT_A_TIME}"))


@control_command(args=[("n", int)], signature="[N=1]")
def pool_grow(state: Any, n: int = 1, **_: Any) -> dict[str, str]:
    """Refused: a meshq worker runs one task at a time."""
    return control.nok(f"pool_grow refused: {ONE_TASK_AT_A_TIME}")
