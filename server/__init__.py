"""The orchestrator HTTP server (``meshq serve``): artifacts, results, task submission, workers.

``app`` (the FastAPI application, ``create_app``/``serve``), ``routes`` (one router per
resource: health, artifacts, results, tasks, workers), ``gatekeeper`` (token, path
checks, access log), ``documents`` (posted task and pipeline documents), ``openapi``
(the schema), ``result_store`` (task ids to files on disk: ``uploads`` with their checksums, ``envelopes``), ``transfer`` (streamed
uploads and downloads) and ``ui`` (the web view under ``/ui/``).
"""
