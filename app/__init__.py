"""meshq: LLM batch inference and fine-tuning on a Celery worker fleet.

``celery -A app worker`` finds the Celery application in ``app.celery``.
"""
