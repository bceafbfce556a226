"""The capability queues a worker consumes (docs/ROUTING.md).

A submitter records every capability queue it sends to in ``meshq:capability-queues``
(queue name → requirement) and, when the queue is new, broadcasts the control command
``meshq_sync_queues``. Each worker then reads the record and starts consuming the
queues whose requirement it meets (``Capabilities.fits``): at start-up, on that
broadcast, and when its heartbeat sees the record grow (in case a broadcast was
missed while it was starting). A worker never consumes a queue it cannot serve, so it
never takes a task it would have to hand back; it consumes at most
``MAX_CAPABILITY_QUEUES`` of them, the oldest first.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from app.core import keys, routing
from app.core.capabilities import Capabilities, Requirement

log = logging.getLogger(__name__)


def chosen_queues(entries: Mapping[str, str], capabilities: Capabilities, topic: str,
                  limit: int) -> list[str]:
    """The recorded capability queues of ``topic`` this worker can serve, oldest first, at most ``limit``."""
    fitting = []
    for queue, raw in entries.items():
        if not routing.is_capability_queue(topic, queue):
            continue
        try:
            data = json.loads(raw)
            need = Requirement.from_json(json.dumps(data["requirement"]))
        except (ValueError, KeyError, TypeError):
            log.warning("capability queue %s has an unreadable record; not consuming it", queue)
            continue
        if capabilities.fits(need):
            fitting.append((str(data.get("registered_at", "")), queue))
    fitting.sort()
    if len(fitting) > limit:
        log.warning("this worker can serve %d capability queues but consumes at most %d; "
                    "not consuming: %s", len(fitting), limit, ", ".join(q for _, q in fitting[limit:]))
    return [queue for _, queue in fitting[:limit]]


def record_entry(need: Requirement, registered_at: str) -> str:
    """The value stored for a capability queue in ``meshq:capability-queues``."""
    return json.dumps({"requirement": json.loads(need.to_json()), "registered_at": registered_at})


class CapabilityQueues:
    """One worker's choice of capability queues, kept up to date from the record."""

    def __init__(self, capabilities: Capabilities, topic: str, limit: int) -> None:
        self.capabilities = capabilities
        self.topic = topic
        self.limit = limit
        self.consumed: list[str] = []
        self.seen_count = -1  # entries in the record when it was last read

    def read(self, client: Any) -> list[str]:
        """Read the record; return the queues to consume that are not consumed yet."""
        entries = {str(k): str(v) for k, v in client.hgetall(keys.CAPABILITY_QUEUES).items()}
        self.seen_count = len(entries)
        room = self.limit - len(self.consumed)
        new = [q for q in chosen_queues(entries, self.capabilities, self.topic, self.limit)
               if q not in self.consumed][:max(room, 0)]
        self.consumed.extend(new)
        return new

    def stale(self, recorded_count: int) -> bool:
        """Whether the record changed since it was last read (its size, from a heartbeat)."""
        return recorded_count != self.seen_count
