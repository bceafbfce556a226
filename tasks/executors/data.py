"""Reading tabular records for executors: local .jsonl/.json/.csv files or a cached HF dataset.

Nothing is downloaded here: a dataset name resolves only from the local Hugging
Face cache (``HF_DATASETS_OFFLINE``-style), a ``url`` is fetched through the
artifact download path by the caller.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from app.errors import SpecError

TABLE_SUFFIXES = (".jsonl", ".json", ".csv")


def read_records(path: str, *, field: str = "spec.data.path", split: str = "train",
                 name: str | None = None) -> list[dict[str, Any]]:
    """Rows of a local table file, or of a dataset in the local HF cache.

    ``field`` is the spec field the path came from, used in error messages.
    """
    file = Path(path).expanduser()
    if file.suffix.lower() in TABLE_SUFFIXES or file.exists():
        if not file.is_file():
            raise SpecError(field, f"file {path!r} does not exist")
        return _read_table_file(file, field)
    return _read_cached_dataset(path, split=split, name=name, field=field)


def _read_table_file(file: Path, field: str) -> list[dict[str, Any]]:
    suffix = file.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = []
            with open(file, encoding="utf-8") as fh:
                for line_no, line in enumerate(fh, 1):
                    if line.strip():
                        row = json.loads(line)
                        if not isinstance(row, dict):
                            raise SpecError(field, f"{file}:{line_no}: each line must be a JSON object")
                        rows.append(row)
            return rows
        if suffix == ".json":
            data = json.loads(file.read_text(encoding="utf-8"))
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                data = data["data"]
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise SpecError(field, f"{file}: expected a JSON list of objects")
            return data
        if suffix == ".csv":
            with open(file, encoding="utf-8", newline="") as fh:
                return list(csv.DictReader(fh))
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as exc:
        raise SpecError(field, f"{file}: cannot parse: {exc}") from None
    raise SpecError(field, f"{file}: unsupported file type {suffix!r} (use .jsonl, .json or .csv)")


def _read_cached_dataset(name_or_path: str, *, split: str, name: str | None, field: str) -> list[dict[str, Any]]:
    try:
        import datasets
        from datasets import load_dataset
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise SpecError(field, f"{name_or_path!r} is not a file and the datasets package is missing") from None
    datasets.disable_progress_bars()
    try:
        # download_mode reuse + offline: only the local cache or a local dataset folder.
        ds = load_dataset(name_or_path, name, split=split, download_mode="reuse_dataset_if_exists")
    except Exception as exc:  # datasets raises many types; the message says what it missed
        raise SpecError(field, f"{name_or_path!r} is neither a local file nor a dataset in the local "
                                f"Hugging Face cache ({type(exc).__name__}: {exc})") from None
    return [dict(row) for row in ds]


def column(rows: list[dict[str, Any]], name: str, field: str) -> list[str]:
    """The values of column ``name`` as strings; a missing column names the spec field."""
    if not rows:
        raise SpecError(field, "the dataset has no rows")
    if name not in rows[0]:
        raise SpecError(field, f"column {name!r} not found; columns are {', '.join(map(str, rows[0]))}")
    return ["" if row.get(name) is None else str(row.get(name)) for row in rows]
