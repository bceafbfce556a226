"""MESHQ_CELERY_CONFIG of ``test_sentinel``'s acknowledgement test: the consumer never sweeps
abandoned messages back, so a task's acknowledgement is the first command of the worker's
consumer to meet a paused master (the sweep, every 2 s there, otherwise may meet it first)."""

from app.celeryconfig import broker_transport_options as _meshq_options

broker_transport_options = {**_meshq_options, "unacked_restore_interval": 3600}
