"""A result too big for the result backend is kept as a file; the backend holds a reference.

Every task writes its whole result to ``RESULTS_DIR/<task_id>/responses.json``. The
result backend (Redis, kept for a week, read by every status call and by the stages
that reference it) holds the same dict only while it is at most ``MAX_RESULT_BYTES``
(``MESHQ_MAX_RESULT_BYTES``). A bigger one is stored as its small top-level fields
(task id, worker, times, notes, scalar metrics) plus ``result_file``: where the whole
result is, its size and checksum. ``${x.result.<field>}`` of a field left out fails
with an error that says so (``pipelines.references``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.artifacts.manifest import RESPONSES_NAME
from app.core.limits import RESULT_FILE, json_bytes

SMALL_FIELD_BYTES = 1024  # a top-level field this small stays in the stored reference


def stored_result(result: dict[str, Any], out_dir: Path, manifest: dict[str, Any], max_bytes: int) -> dict[str, Any]:
    """``result`` itself when it fits ``max_bytes`` as JSON, else its reference. ``manifest``
    lists the ``responses.json`` just written from it."""
    entry: dict[str, Any] = next((f for f in manifest.get("files", []) if f.get("path") == RESPONSES_NAME), {})
    if entry.get("bytes") is not None and int(entry["bytes"]) <= max_bytes:  # indented: never smaller
        return result
    size = json_bytes(result)
    if size <= max_bytes:
        return result
    kept: dict[str, Any] = {}
    room = max_bytes // 2  # the reference stays well inside the limit it reports
    for key, value in result.items():
        field_bytes = json_bytes(value)
        if field_bytes <= min(SMALL_FIELD_BYTES, room):
            kept[key] = value
            room -= field_bytes + len(key)
    kept[RESULT_FILE] = {
        "path": str(out_dir / RESPONSES_NAME), "bytes": entry.get("bytes"), "sha256": entry.get("sha256"),
        "json_bytes": size, "worker_id": result.get("worker_id"),
        "omitted": sorted(key for key in result if key not in kept),
        "reason": f"the result is {size} bytes, more than MAX_RESULT_BYTES={max_bytes}: the result backend "
                  f"holds its small fields, {RESPONSES_NAME} the whole result"}
    return kept
