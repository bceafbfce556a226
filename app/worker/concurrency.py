"""One task at a time per worker (a task owns the whole GPU), enforced rather than assumed.

A worker with ``-c 2``/``--concurrency 2``, ``--concurrency auto`` or ``--autoscale`` is
refused at start-up; ``celery control pool_grow`` is answered with an error instead of
starting a second pool process (Celery's own command would run two tasks on one GPU while
the worker record says one). More throughput: start more workers (one per GPU).

So is any pool but prefork (``-P threads``, ``solo``, ``eventlet``, ``gevent``): meshq's
worker runs each task in a pool child process that it can watch, kill when stuck and
replace, while its main process keeps beating (``app/celeryconfig.py`` says why).
"""

from __future__ import annotations

from typing import Any

from celery import signals
from celery.concurrency import ALIASES
from celery.concurrency.prefork import TaskPool as PreforkPool
from celery.worker import control  # Celery's commands, registered first so ours replace them
from celery.worker.control import control_command

from app.core.errors import ConfigError
from app.worker.startup import refuse

ONE_TASK_AT_A_TIME = ("a meshq worker runs one task at a time (one task per GPU); "
                      "start one worker per GPU instead")


PREFORK_ONLY = ("a meshq worker runs tasks in the prefork pool (a child process it watches, kills "
                "when stuck and replaces); leave -P out or give -P prefork")


def is_prefork(pool_cls: Any) -> bool:
    """Whether the worker's pool (an alias such as ``threads``, a ``module:Class`` path or the
    class the CLI hands over) is Celery's prefork pool; nothing is imported for an alias."""
    if isinstance(pool_cls, str):
        path = ALIASES.get(pool_cls, pool_cls)
        return path == ALIASES["prefork"]
    return isinstance(pool_cls, type) and issubclass(pool_cls, PreforkPool)


def pool_name(pool_cls: Any) -> str:
    if isinstance(pool_cls, str):
        return pool_cls
    path = f"{getattr(pool_cls, '__module__', '')}:{getattr(pool_cls, '__qualname__', pool_cls)}"
    return next((alias for alias, target in ALIASES.items() if target == path), path)


@signals.worker_init.connect
def refuse_concurrency(sender: Any, **_: Any) -> None:
    pool_cls = getattr(sender, "pool_cls", "prefork")
    if not is_prefork(pool_cls):
        refuse(ConfigError("--pool", f"{pool_name(pool_cls)!r} asked, but {PREFORK_ONLY}"))
    if getattr(sender, "options", {}).get("autoscale"):  # the Pool bootstep reads it later
        refuse(ConfigError("--autoscale", ONE_TASK_AT_A_TIME))
    concurrency = getattr(sender, "concurrency", 1)
    if concurrency != 1:
        refuse(ConfigError("--concurrency", f"{concurrency!r} asked, but {ONE_TASK_AT_A_TIME}"))


@control_command(args=[("n", int)], signature="[N=1]")
def pool_grow(state: Any, n: int = 1, **_: Any) -> dict[str, str]:
    """Refused: a meshq worker runs one task at a time."""
    return control.nok(f"pool_grow refused: {ONE_TASK_AT_A_TIME}")
