"""Shards of an inference task's prompts (pure): which contiguous range each shard runs.

A sharded task (``parallel: {enabled: true, max_shards: N}`` or ``resources.replicas: N``)
is split into up to N shards of nearly equal size; shard ``i`` runs prompts
``[start, stop)`` of the whole task and numbers its items from ``start``, so the
merged items are in input order. Both inference backends take a ``PromptRange``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class PromptRange:
    """Shard ``index`` of ``count``: prompts ``start`` (inclusive) to ``stop`` (exclusive)."""

    index: int
    count: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PromptRange:
        return cls(int(raw["index"]), int(raw["count"]), int(raw["start"]), int(raw["stop"]))


def plan_shards(total: int, max_shards: int) -> list[PromptRange]:
    """At most ``max_shards`` contiguous ranges covering ``total`` prompts, sizes differing by one at most."""
    count = max(1, min(max_shards, total))
    size, extra = divmod(total, count)
    ranges, start = [], 0
    for index in range(count):
        stop = start + size + (1 if index < extra else 0)
        ranges.append(PromptRange(index, count, start, stop))
        start = stop
    return ranges
