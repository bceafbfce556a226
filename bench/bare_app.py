"""A bare Celery app with meshq's worker settings and a no-op task (dispatch baseline)."""

from __future__ import annotations

import os
import time

from celery import Celery

_url = os.environ["REDIS_URL"]
app = Celery("bare", broker=_url, backend=_url)
app.conf.update(
    task_serializer="json", result_serializer="json", accept_content=["json"],
    task_acks_late=True, task_reject_on_worker_lost=True, worker_prefetch_multiplier=1,
    worker_concurrency=1, worker_pool="prefork", worker_send_task_events=True,
    task_send_sent_event=True, task_track_started=True, result_extended=True,
    task_default_queue=os.environ.get("MESHQ_BENCH_BARE_QUEUE", "meshq-bench-bare"),
    broker_connection_retry_on_startup=True,
)


@app.task(name="bare.noop")
def noop(payload: dict) -> dict:
    return {"started_at": time.time(), "payload": payload}
