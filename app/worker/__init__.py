"""The worker runtime: what turns a plain ``celery worker`` into a meshq worker.

``signals`` (Celery signal handlers: node name, queues, task start/end status),
``registry`` (the ``worker:<id>`` hash and the heartbeat thread), ``lease``
(a task never runs twice at once), ``hardware`` (probe and load metrics) and
``status_writer`` (task-end status writes off the task's critical path).
"""
