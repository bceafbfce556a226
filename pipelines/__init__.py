"""Staged pipelines: templates → Celery chains, ``${...}`` references, submission API."""
