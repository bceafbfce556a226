"""A running task keeps its own message invisible to the broker's redelivery.

Kombu's Redis transport (pinned in setup.cfg; checked against kombu 5.7) keeps every
unacknowledged message in the hash ``unacked`` (delivery tag → ``[payload, exchange,
routing key]``) and its delivery time in the sorted set ``unacked_index``; every
worker's consumer periodically hands back (``restore_visible``) the messages whose
time is older than the visibility timeout. Left alone, a task that runs longer than the
timeout is handed to another worker while it still runs, and that copy sits waiting
on the task's lease, taking a worker out of the fleet.

So the heartbeat of the worker's main process — the same round trip that refreshes
the task's lease — moves the delivery time of each message it holds (running, or
waiting on a lease after a pause) to "now": the message is redelivered only when the
worker really stopped beating (killed, paused, cut off) for a whole visibility timeout.
A message and its copies share one delivery tag, so a late run of a paused worker that
acknowledges its copy removes the entry of the run that took over: when this worker
holds the lease and the task has not ended, the message is put back, so the run that
goes on stays recoverable should its worker die in turn.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from celery.worker import state as worker_state

from app.core import keys

log = logging.getLogger("meshq.worker")

# KEYS: unacked_index, unacked, lease, result meta. ARGV: tag, now, worker id, payload ('' = not sent).
# Returns 1 refreshed, 0 left alone, -1 the message is missing and its payload is needed.
_KEEP_INVISIBLE = """
local meta = redis.call('get', KEYS[4])
if meta then
  local ok, decoded = pcall(cjson.decode, meta)
  if ok and type(decoded) == 'table' then
    local status = decoded['status']
    if status == 'SUCCESS' or status == 'FAILURE' or status == 'REVOKED' then return 0 end
  end
end
if redis.call('hexists', KEYS[2], ARGV[1]) == 1 then
  redis.call('zadd', KEYS[1], ARGV[2], ARGV[1])
  return 1
end
if redis.call('get', KEYS[3]) ~= ARGV[3] then return 0 end
if ARGV[4] == '' then return -1 end
redis.call('hset', KEYS[2], ARGV[1], ARGV[4])
redis.call('zadd', KEYS[1], ARGV[2], ARGV[1])
return 1
"""


class MessageKeeper:
    """Adds the "keep invisible" script for every held message to each heartbeat."""

    def __init__(self, app: Any, worker_id: str) -> None:
        options = dict(app.conf.broker_transport_options or {})
        prefix = str(options.get("global_keyprefix", "") or "")
        self.unacked_key = prefix + str(options.get("unacked_key", "unacked"))
        self.unacked_index_key = prefix + str(options.get("unacked_index_key", "unacked_index"))
        self.app = app
        self.worker_id = worker_id
        self._needs_payload: set[str] = set()

    def held(self) -> list[Any]:
        """Requests of messages the worker holds unacknowledged (running or reserved)."""
        requests = {id(r): r for r in list(worker_state.reserved_requests)}
        requests.update({id(r): r for r in list(worker_state.active_requests)})
        return list(requests.values())

    def add_to_beat(self, pipe: Any, now: float) -> list[str]:
        """Queue one script per held message; returns their delivery tags, in order."""
        tags = []
        for request in self.held():
            message = getattr(request, "message", None)
            tag = getattr(message, "delivery_tag", None)
            raw = getattr(message, "_raw", None)
            if message is None or not tag or raw is None:
                continue
            tag = str(tag)
            payload = ""
            if tag in self._needs_payload:
                delivery = message.delivery_info or {}
                payload = json.dumps([raw, delivery.get("exchange", ""), delivery.get("routing_key", "")])
            pipe.eval(_KEEP_INVISIBLE, 4, self.unacked_index_key, self.unacked_key,
                      keys.task_lease(request.id), self.app.backend.get_key_for_task(request.id),
                      tag, repr(now), self.worker_id, payload)
            tags.append(tag)
        return tags

    def replies(self, tags: list[str], replies: list[Any]) -> None:
        """Remember which messages need their payload sent with the next beat."""
        self._needs_payload = {tag for tag, reply in zip(tags, replies, strict=False) if reply == -1}
        if self._needs_payload:
            log.warning("message(s) %s of running task(s) were acknowledged elsewhere (a late run of a "
                        "paused worker?); putting them back with the next heartbeat",
                        ", ".join(sorted(self._needs_payload)))
