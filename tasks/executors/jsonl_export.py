"""``postprocess.jsonl_export``: an inference task's results as a JSONL dataset.

Each result item becomes one row whose fields are taken, as ``fields`` says, from the
generation (``from: output``), the prompt (``from: prompt``, as given, before any
system prompt or chat template), a metadata column (``from: metadata, key: <name>``,
see ``data.metadata_columns``) or a constant (``from: literal`` with ``value``, or
``value`` alone: any JSON value, the same in every row). A row missing any of the
``required_fields`` (absent, null or an empty string) is left out and counted in
``skipped``; what is left is the dataset a next stage trains on
(``data.jsonl.path: ${gen.result.jsonl_export.path}``). The file is written inside the
task directory only (the schema refuses absolute paths and ``..``); the task layer
uploads it with the other artifacts for an ``http`` destination (``jsonl_export.url``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from app.artifacts.manifest import write_bytes_atomic
from app.artifacts.run_record import fenced
from app.core.task_spec.schema import JsonlExport, JsonlExportField


def field_value(item: dict[str, Any], how: JsonlExportField) -> Any:
    if how.from_ is None or how.from_ == "literal":
        return how.value
    if how.from_ == "metadata":
        return (item.get("metadata") or {}).get(str(how.key))
    return item.get(how.from_)


def export_rows(items: list[dict[str, Any]], export: JsonlExport) -> tuple[list[dict[str, Any]], int]:
    """The rows to write and how many items were left out for a missing required field."""
    rows, skipped = [], 0
    for item in items:
        row = {name: field_value(item, how) for name, how in export.fields.items()}
        if any(row.get(name) in (None, "") for name in export.required_fields):
            skipped += 1
            continue
        rows.append(row)
    return rows, skipped


def write_export(items: list[dict[str, Any]], export: JsonlExport, out_dir: Path,
                 run: int | None = None) -> dict[str, Any]:
    """Write the JSONL file in ``out_dir`` under the run fence of ``run`` (a later run's
    file is never replaced: ``LeaseLost``); return ``{path, rows, skipped, bytes, sha256, fields}``."""
    rows, skipped = export_rows(items, export)
    path = out_dir / export.path
    data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
    with fenced(out_dir, run):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, data)
    return {"path": str(path), "rows": len(rows), "skipped": skipped, "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "fields": list(export.fields)}
