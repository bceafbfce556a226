"""Reading tabular records for executors: local files, saved datasets, or a cached HF dataset.

A source (``data.url``, ``data.path``, ``data.dataset_name``) is, in this order:

* a local ``.jsonl`` / ``.json`` / ``.csv`` file, or any existing file or directory: a
  file is one split (its ``split`` name is not checked, its slice is applied); a
  directory written by ``datasets.save_to_disk`` is loaded with ``load_from_disk``
  (``split`` picks the split of a ``DatasetDict``); another directory is loaded as a
  folder of data files by ``datasets``;
* otherwise a Hugging Face hub id (``name`` or ``org/name``), read from the local
  datasets cache (``HF_DATASETS_CACHE``) only. Workers run offline: a hub id that is
  not in the cache fails at once with a message saying so, never a download.

(An ``http(s)`` URL is downloaded by the caller into the task directory first.)

``split`` takes the ``datasets`` slicing syntax: ``train``, ``train[:200]``,
``validation[10:20]``, ``train[:2%]``, ``train[:10]+test[:10]``. ``sample`` then
shuffles (``shuffle`` + ``seed``, the permutation ``Dataset.shuffle`` uses) and keeps
the first ``max_samples``: the slice is taken first, as ``datasets`` does when it
loads ``train[:200]``.
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path
from typing import Any, TypeVar

from app.data_roots import allowed_path
from app.errors import SpecError

TABLE_SUFFIXES = (".jsonl", ".json", ".csv")
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?\Z")
SAVED_DATASET_MARKERS = ("dataset_dict.json", "state.json")  # written by Dataset(Dict).save_to_disk

# Workers never download datasets (models.py does the same for models), whatever imports first.
for _variable in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
    os.environ.setdefault(_variable, "1")

Row = TypeVar("Row")


def read_records(path: str, *, field: str = "spec.data.path", split: str = "train",
                 name: str | None = None, split_field: str = "spec.data.split") -> list[dict[str, Any]]:
    """Rows of ``split`` (with slicing) of a local file or directory, or of a dataset in the
    local HF cache. ``field`` is the spec field the source came from, used in error messages."""
    file = Path(path).expanduser()
    if file.suffix.lower() in TABLE_SUFFIXES or file.exists() or looks_local(path):
        file = allowed_path(file, field)  # only under RESULTS_DIR or MESHQ_DATA_DIRS, links resolved
        if file.is_dir():
            return _read_directory(file, split=split, name=name, field=field, split_field=split_field)
        if not file.is_file():
            raise SpecError(field, f"file {path!r} does not exist")
        rows = _read_table_file(file, field)
        return slice_rows(rows, split, split_field)
    if not HUB_ID_RE.match(path):
        raise SpecError(field, f"{path!r} does not exist (and is not a hub id such as org/name)")
    return _read_cached_dataset(path, split=split, name=name, field=field, split_field=split_field)


def looks_local(path: str) -> bool:
    """A path, not a hub id: absolute, ``~``, ``./`` or ``../`` (checked against the data roots
    even when nothing is there, so a refusal does not tell whether a file exists)."""
    return path.startswith(("/", "~", "./", "../")) or "\\" in path


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


def _instructions(split: str, lengths: dict[str, int], split_field: str) -> list[Any]:
    """``datasets``' own reading of ``train[:2%]`` against the split lengths."""
    from datasets import ReadInstruction

    try:
        return list(ReadInstruction.from_spec(split).to_absolute(lengths))
    except (ValueError, KeyError, AssertionError) as exc:
        known = ", ".join(sorted(lengths))
        raise SpecError(split_field, f"{split!r}: {str(exc).strip() or type(exc).__name__} "
                                     f"(splits here: {known}; slices look like train[:200] or train[:2%])") \
            from None


def split_name(split: str) -> str:
    return split.split("[", 1)[0].strip()


def slice_rows(rows: list[Row], split: str, split_field: str = "spec.data.split") -> list[Row]:
    """``split``'s slice of the rows of a single file (one split, whatever its name)."""
    names = {split_name(part) for part in split.split("+")}
    if len(names) != 1:
        raise SpecError(split_field, f"{split!r}: a single file is one split; give one split name")
    (name,) = names
    picked: list[Row] = []
    for instruction in _instructions(split, {name: len(rows)}, split_field):
        picked.extend(rows[instruction.from_:instruction.to])
    return picked


def _read_directory(directory: Path, *, split: str, name: str | None, field: str,
                    split_field: str) -> list[dict[str, Any]]:
    import datasets

    datasets.disable_progress_bars()
    if any((directory / marker).is_file() for marker in SAVED_DATASET_MARKERS):
        try:
            loaded = datasets.load_from_disk(str(directory))
        except Exception as exc:
            raise SpecError(field, f"{str(directory)!r}: cannot load the saved dataset: "
                                   f"{type(exc).__name__}: {exc}") from None
        if isinstance(loaded, datasets.Dataset):
            return slice_rows(loaded.to_list(), split, split_field)
        rows: list[dict[str, Any]] = []
        lengths = {split_name: len(part) for split_name, part in loaded.items()}
        for instruction in _instructions(split, lengths, split_field):
            rows.extend(loaded[instruction.splitname].select(range(instruction.from_, instruction.to)).to_list())
        return rows
    try:
        return list(datasets.load_dataset(str(directory), name, split=split).to_list())
    except ValueError as exc:
        raise SpecError(split_field, f"{split!r}: {exc}") from None
    except Exception as exc:
        raise SpecError(field, f"{str(directory)!r}: cannot load it as a folder of data files: "
                               f"{type(exc).__name__}: {exc}") from None


def _read_cached_dataset(hub_id: str, *, split: str, name: str | None, field: str,
                         split_field: str) -> list[dict[str, Any]]:
    import datasets
    from datasets import config as datasets_config

    datasets.disable_progress_bars()
    cache = datasets_config.HF_DATASETS_CACHE
    try:
        ds = datasets.load_dataset(hub_id, name, split=split)
    except ValueError as exc:
        message = str(exc).strip()
        if "Couldn't find cache for" in message and name:  # the dataset is cached, not this config
            raise SpecError("spec.data.name", f"{name!r}: not in the local cache for {hub_id!r}: "
                                              f"{' '.join(message.split())}") from None
        if "split" in message.lower():
            raise SpecError(split_field, f"{split!r}: {message}") from None
        raise SpecError(field, f"{hub_id!r}: {type(exc).__name__}: {message}") from None
    except Exception as exc:  # ConnectionError (offline), DatasetNotFoundError, FileNotFoundError...
        raise SpecError(field, f"{hub_id!r} is not in the local Hugging Face datasets cache ({cache}) and "
                               "workers do not download datasets (they run offline): put it in that "
                               "cache, or give a local path or an http(s) URL "
                               f"({type(exc).__name__})") from None
    return list(ds.to_list())


def sample(rows: list[Row], *, shuffle: bool = False, seed: int | None = None,
           max_samples: int | None = None) -> list[Row]:
    """Shuffle (``Dataset.shuffle``'s permutation for ``seed``), then keep the first ``max_samples``."""
    if shuffle and len(rows) > 1:
        import numpy as np

        order = np.random.default_rng(seed).permutation(len(rows))
        rows = [rows[int(i)] for i in order]
    return rows[:max_samples] if max_samples is not None else rows


def column(rows: list[dict[str, Any]], name: str, field: str) -> list[str]:
    """The values of column ``name`` as strings; a missing column names the spec field."""
    if not rows:
        raise SpecError(field, "the dataset has no rows")
    if name not in rows[0]:
        # The other column names are not listed: a CSV's header row is data of its own.
        raise SpecError(field, f"column {name!r} not found in the dataset ({len(rows[0])} columns)")
    return ["" if row.get(name) is None else str(row.get(name)) for row in rows]
