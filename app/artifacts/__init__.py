"""The artifact pipeline: archives, safe unpacking, uploads, downloads, manifests.

``archive`` (zip/tar.gz with sha256 while writing, safe unpack within a budget),
``manifest`` (every output file with size and sha256), ``upload``/``download``
(streamed HTTP with retries, ``retry``), ``run_record`` (a late run never overwrites
a later run's outputs: the server's and the workers' commits into a task folder), ``auth`` (the token goes only to the
orchestrator), ``delivery`` (a task's outputs to an ``http`` destination) and
``checkpoints`` (``checkpoint.load``, cached by sha256).
"""
