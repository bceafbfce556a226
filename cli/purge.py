"""``meshq purge``: empty every queue meshq sends tasks to, not only the default one.

``celery -A app purge`` knows the queues in the app's configuration, which is the
default queue alone: meshq's tag queues (``tasks.gpu``), capability queues
(``tasks.need....``) and workers' own queues (``tasks.worker.<id>``) are made at run
time, so Celery's purge reports "No messages purged from 1 queue" while they hold
messages. This command finds them all: the default queue, every queue a registered
worker consumes, every recorded capability queue, and every other Redis list named
``<TASK_TOPIC>.*`` (a tag queue nobody consumes yet) — and purges each through kombu,
as Celery's own command does.
"""

from __future__ import annotations

from typing import Any

from app.core import keys
from app.worker.registry import list_workers

# kombu's Redis transport keeps a queue's priority levels in keys "<queue>\x06\x16<n>".
_PRIORITY_SEPARATOR = "\x06\x16"


def meshq_queues(client: Any, topic: str) -> list[str]:
    """Every queue name meshq may have sent tasks to, sorted."""
    names = {topic}
    for worker in list_workers(client):
        names.update(worker.get("queues") or [])
    names.update(str(name) for name in client.hkeys(keys.CAPABILITY_QUEUES))
    for key in client.scan_iter(match=f"{topic}.*", _type="list", count=1000):
        names.add(str(key).split(_PRIORITY_SEPARATOR, 1)[0])
    return sorted(names)


def purge_queues(app: Any, names: list[str]) -> dict[str, int]:
    """Purge each queue; the number of messages removed from each."""
    removed = {}
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        for name in names:
            try:
                removed[name] = int(channel.queue_purge(name) or 0)
            except connection.channel_errors:
                removed[name] = 0
    return removed
