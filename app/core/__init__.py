"""The shared core of meshq: settings, errors, Redis keys and client, names, events, routing,
capabilities, limits, redaction, data roots and the task spec (``task_spec``).

Everything above imports it; it imports no other meshq layer and neither Celery nor
torch (``make lint`` checks both, contracts in setup.cfg).
"""
