"""Messages a running task takes from its own queue to run with it (task merging).

Kombu's Redis transport keeps a queue as a Redis list and every message a worker holds
unacknowledged in the hash ``unacked`` (delivery tag → ``[payload, exchange, routing
key]``) plus the sorted set ``unacked_index`` (delivery time); ``restore_visible`` puts
back the ones whose worker stopped refreshing them (``app.worker.invisibility``).

A claim moves a waiting message from the queue into exactly those two structures in one
script, as kombu's own delivery would: the claiming worker then holds it like any other
unacknowledged message. Should the worker die, kombu restores it after the visibility
timeout and another worker runs it (its lease and stored result drop a second copy).
While the worker lives, ``ClaimedMessages.refresh`` moves each claimed message's time to
"now", and ``ack`` removes it once its task's result is stored.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis

# KEYS: queue, unacked, unacked_index. ARGV: now, then (raw payload, tag, unacked entry)
# triples. A payload no longer in the queue (another worker took it) is not claimed.
# Returns the tags claimed.
_CLAIM = """
local claimed = {}
for i = 2, #ARGV, 3 do
  if redis.call('lrem', KEYS[1], 1, ARGV[i]) == 1 then
    redis.call('hset', KEYS[2], ARGV[i + 1], ARGV[i + 2])
    redis.call('zadd', KEYS[3], ARGV[1], ARGV[i + 1])
    claimed[#claimed + 1] = ARGV[i + 1]
  end
end
return claimed
"""
# Refresh the delivery time of claimed messages still held (KEYS: unacked, unacked_index).
_REFRESH = """
for i = 2, #ARGV do
  if redis.call('hexists', KEYS[1], ARGV[i]) == 1 then redis.call('zadd', KEYS[2], ARGV[1], ARGV[i]) end
end
return 1
"""
# Hand a claimed message back to the front of its queue (KEYS: queue, unacked, unacked_index).
_UNCLAIM = """
if redis.call('hdel', KEYS[2], ARGV[1]) == 1 then
  redis.call('zrem', KEYS[3], ARGV[1])
  redis.call('rpush', KEYS[1], ARGV[2])
end
return 1
"""


@dataclass(frozen=True)
class WaitingMessage:
    """A message seen in a queue: its raw JSON (as the list holds it) and decoded parts."""

    raw: str
    tag: str
    exchange: str
    routing_key: str
    headers: dict[str, Any]
    body: Any  # the decoded Celery protocol-2 body: [args, kwargs, embed]

    def unacked_entry(self) -> str:
        # The payload is spliced in as it is: decoding and re-encoding could change it.
        return f"[{self.raw}, {json.dumps(self.exchange)}, {json.dumps(self.routing_key)}]"


def decode_message(raw: str | bytes) -> WaitingMessage | None:
    """A kombu Redis message (JSON envelope, JSON body, base64 or not), or None if it is
    not one this worker can read."""
    import base64

    text = raw.decode() if isinstance(raw, bytes) else raw
    try:
        envelope = json.loads(text)
        properties = envelope["properties"]
        body = envelope["body"]
        if properties.get("body_encoding") == "base64":
            body = base64.b64decode(body)
        if envelope.get("content-type") != "application/json":
            return None
        delivery = properties.get("delivery_info") or {}
        return WaitingMessage(raw=text, tag=str(properties["delivery_tag"]),
                              exchange=str(delivery.get("exchange", "")),
                              routing_key=str(delivery.get("routing_key", "")),
                              headers=dict(envelope.get("headers") or {}), body=json.loads(body))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


class ClaimedMessages:
    """The messages one merged batch holds: claim, keep invisible, acknowledge or hand back."""

    def __init__(self, client: redis.Redis, queue: str, unacked_key: str = "unacked",
                 unacked_index_key: str = "unacked_index") -> None:
        self.client = client
        self.queue = queue
        self.unacked_key = unacked_key
        self.unacked_index_key = unacked_index_key
        self.held: dict[str, WaitingMessage] = {}

    def waiting(self, limit: int) -> list[WaitingMessage]:
        """The next ``limit`` messages the queue would deliver, oldest first (kombu pops
        from the right)."""
        raws = self.client.lrange(self.queue, -limit, -1)
        messages = (decode_message(raw) for raw in reversed(raws))
        return [m for m in messages if m is not None]

    def claim(self, messages: list[WaitingMessage]) -> list[WaitingMessage]:
        """Take ``messages`` out of the queue into this worker's unacknowledged ones; returns
        those it got (others were delivered elsewhere meanwhile)."""
        if not messages:
            return []
        argv: list[str] = [repr(time.time())]
        for message in messages:
            argv += [message.raw, message.tag, message.unacked_entry()]
        tags = {t.decode() if isinstance(t, bytes) else str(t)
                for t in self.client.eval(_CLAIM, 3, self.queue, self.unacked_key, self.unacked_index_key, *argv)}
        got = [m for m in messages if m.tag in tags]
        self.held.update({m.tag: m for m in got})
        return got

    def refresh_in(self, pipe: Any) -> None:
        """Add "still held, now" for every claimed message to a pipeline."""
        if self.held:
            pipe.eval(_REFRESH, 2, self.unacked_key, self.unacked_index_key, repr(time.time()), *self.held)

    def ack(self, message: WaitingMessage) -> None:
        """The task's result is stored: the message is done (as kombu's ``ack``)."""
        pipe = self.client.pipeline()
        pipe.zrem(self.unacked_index_key, message.tag)
        pipe.hdel(self.unacked_key, message.tag)
        pipe.execute()
        self.held.pop(message.tag, None)

    def unclaim(self, message: WaitingMessage) -> None:
        """Put a claimed message back where the queue delivers next (its task could not join)."""
        self.client.eval(_UNCLAIM, 3, self.queue, self.unacked_key, self.unacked_index_key, message.tag,
                         message.raw)
        self.held.pop(message.tag, None)
