"""MESHQ_CELERY_CONFIG of the retry tests: the workers also load ``tests.retrying_tasks``."""

include = ["tests.retrying_tasks"]
