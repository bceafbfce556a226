"""Queue names (DESIGN §4, docs/ROUTING.md): pure functions from tags and requirements.

* Tags only: ``TASK_TOPIC.<sorted tags joined by +>``; a worker consumes one queue per
  non-empty subset of its tags.
* Anything more (``resources.hardware``, features): one *capability queue* named from
  the whole requirement, ``TASK_TOPIC.need.<part>.<part>...`` (``tasks.need.cpu=1.mem=1Gi``);
  workers consume the capability queues in use that they can serve (``app.core.capabilities``).
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import combinations

from app.core.capabilities import Requirement
from app.core.errors import SpecError
from app.core.settings import TAG_RE

CAPABILITY_QUEUE_MARK = "need"


def queue_for_tags(topic: str, required: Iterable[str]) -> str:
    """The queue a task requiring ``required`` tags is sent to.

    No requirement → the default queue ``topic``; otherwise
    ``topic + "." + "+".join(sorted(required))``, consumed only by workers whose
    tags include every required tag.
    """
    tags = sorted(set(required))
    for tag in tags:
        if not TAG_RE.match(tag):
            raise SpecError("spec.tags", f"tag {tag!r} is not 1-32 characters of [A-Za-z0-9_-]")
    return f"{topic}.{'+'.join(tags)}" if tags else topic


def queue_for_requirement(topic: str, need: Requirement) -> str:
    """The one queue a task with requirement ``need`` is sent to: its tag queue when it
    needs tags only, else the capability queue named from every part of ``need``."""
    if not need.needs_capabilities:
        return queue_for_tags(topic, need.tags)
    return ".".join([topic, CAPABILITY_QUEUE_MARK, *need.name_parts()])


def is_capability_queue(topic: str, queue: str) -> bool:
    return queue.startswith(f"{topic}.{CAPABILITY_QUEUE_MARK}.")


def queue_for_worker(topic: str, worker_id: str) -> str:
    """A worker's own queue, for tasks pinned to that worker."""
    return f"{topic}.worker.{worker_id}"


def worker_queues(topic: str, tags: Iterable[str], worker_id: str) -> list[str]:
    """Every queue a worker with ``tags`` consumes: default, one per non-empty tag subset, own."""
    tags = sorted(set(tags))
    queues = [topic]
    for size in range(1, len(tags) + 1):
        for subset in combinations(tags, size):
            queues.append(queue_for_tags(topic, subset))
    queues.append(queue_for_worker(topic, worker_id))
    return queues
