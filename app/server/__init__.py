"""The orchestrator HTTP server (``meshq serve``): artifacts, results, task submission, workers.

``app`` (the FastAPI application and its routes, ``create_app``/``serve``),
``gatekeeper`` (token, path checks, access log), ``documents`` (posted task and
pipeline documents), ``openapi`` (the schema), ``result_store`` (task ids to
files on disk: ``uploads`` with their checksums, ``envelopes``), ``transfer`` (streamed uploads and downloads) and ``ui`` (the web view
under ``/ui/``).
"""
