"""Celery tasks (thin wrappers) and their executors (plain classes).

Importing this package registers every meshq task with the Celery app.
"""

from tasks.echo import echo

__all__ = ["echo"]
