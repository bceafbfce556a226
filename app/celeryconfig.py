"""Every Celery setting meshq uses, read from the environment in one place.

Pool choice — prefork with concurrency 1 and children that live forever:
  * one task at a time per worker, because a task owns the whole GPU/CPU;
  * the pool child survives between tasks (``worker_max_tasks_per_child`` unset),
    so a model loaded by one task is still in memory for the next (warm cache);
  * tasks run in the child, never in the parent: the parent never imports torch,
    so CUDA is initialised only in the child and a fork never copies a CUDA context;
  * the parent stays free for the heartbeat thread, which keeps beating while a
    long task holds the child busy (a solo/threads pool would share the GIL and the
    process with the task, and a crash in native code would take the heartbeat down).

Only settings are exported: every other name here starts with ``_`` (Celery and
``celery inspect conf`` skip those), and there is no ``from __future__`` import, whose
``annotations`` would otherwise show up as a setting. Extra settings of your own go in
a module named by ``MESHQ_CELERY_CONFIG`` (applied after these, see ``app/celery.py``).
"""

from app.core.redis_client import SOCKET_TIMEOUT_S as _SOCKET_TIMEOUT_S
from app.core.redis_client import sentinel_connection_options as _sentinel_connection_options
from app.core.settings import UNACKED_MUTEX_EXPIRE_S as _UNACKED_MUTEX_EXPIRE_S
from app.core.settings import get_settings as _get_settings
from app.core.settings import unacked_restore_interval_s as _unacked_restore_interval_s

_settings = _get_settings()

broker_url = _settings.redis_url
# Celery's Redis backend, storing task arguments with secrets redacted (app.celery_redaction).
result_backend = ("app.celery_redaction:RedactingSentinelBackend+" if _settings.uses_sentinel
                  else "app.celery_redaction:RedactingRedisBackend+") + _settings.redis_url
broker_connection_retry_on_startup = True
# Tasks may run for hours: a running task's heartbeat keeps its message invisible
# (app.worker.invisibility), so the visibility timeout only bounds how long the task of a
# dead worker waits; the same for the broker and the result backend. Abandoned messages
# are swept back into their queue every few seconds, so recovery takes about the
# visibility timeout, not 100 s more.
_restore_interval_s = _unacked_restore_interval_s(_settings.visibility_timeout_s)
broker_transport_options: dict = {"visibility_timeout": _settings.visibility_timeout_s,
                                  "unacked_restore_interval": _restore_interval_s,
                                  "unacked_restore_throttle": 1,
                                  # a dead sweeper's lock must not stop redelivery for 300 s
                                  "unacked_mutex_expire": _UNACKED_MUTEX_EXPIRE_S}
result_backend_transport_options = {"visibility_timeout": _settings.visibility_timeout_s,
                                    "retry_policy": {"timeout": 5.0}}
if _settings.uses_sentinel:
    # Behind Sentinel (REDIS_URL=sentinel://..., MESHQ_REDIS_MASTER): both find the master
    # through the sentinels, and notice a master that died or stopped answering within
    # seconds (kombu drops a BRPOP connection whose reply is overdue by the health check
    # interval), then ask the sentinels again. A plain redis:// URL keeps the defaults.
    _FAILOVER_OPTIONS = {"master_name": _settings.redis_master,
                         "sentinel_kwargs": _sentinel_connection_options(),
                         "socket_timeout": _SOCKET_TIMEOUT_S, "socket_connect_timeout": _SOCKET_TIMEOUT_S,
                         "health_check_interval": int(_SOCKET_TIMEOUT_S)}
    broker_transport_options.update(_FAILOVER_OPTIONS)
    result_backend_transport_options.update(master_name=_settings.redis_master,
                                            sentinel_kwargs=_sentinel_connection_options())
    redis_socket_timeout = _SOCKET_TIMEOUT_S
    redis_socket_connect_timeout = _SOCKET_TIMEOUT_S
    redis_backend_health_check_interval = int(_SOCKET_TIMEOUT_S)
    # A task sent while the sentinels promote a replica waits for the new master (about
    # 30 s at most) instead of failing after Celery's default second of retries.
    task_publish_retry_policy = {"max_retries": 30, "interval_start": 0, "interval_step": 1, "interval_max": 1}

# JSON only: no pickle anywhere.
task_serializer = "json"
result_serializer = "json"
event_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]

# Delivery: acknowledge after the task ran; a worker that dies gets its task redelivered.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
worker_concurrency = 1
worker_pool = "prefork"
worker_max_tasks_per_child = None

# Monitoring: events on so Flower sees workers, tasks and progress.
worker_send_task_events = True
task_send_sent_event = True
task_track_started = True
result_extended = True
result_expires = 7 * 24 * 3600

# Routing: the default queue is TASK_TOPIC; tag and capability queues are created on
# demand. The router sends a meshq task given no queue where its spec's tags and
# resources say (docs/ROUTING.md), whatever sent it (celery call, apply_async, a canvas).
task_default_queue = _settings.task_topic
task_create_missing_queues = True
task_routes = ("tasks.router.route_task",)

# pipelines.resolver resolves ${...} references on the worker just before a stage runs.
include = ["tasks", "pipelines.resolver"]
