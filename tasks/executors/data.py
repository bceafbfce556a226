"""Reading tabular records for executors: local files, saved datasets, or a cached HF dataset.

A source (``data.url``, ``data.path``, ``data.dataset_name``) is, in this order:

* a local data file (``.jsonl``, ``.json``, ``.csv``, ``.parquet``, ``.arrow``, ``.txt``),
  or any existing file or directory: a file is one split (its ``split`` name is not
  checked, its slice is applied); a directory written by ``datasets.save_to_disk`` is
  read split by split from the arrow files its ``state.json`` names; another directory
  is a folder of such data files, put into splits by their names as ``datasets`` does
  (``train*.jsonl``, ``test/``...);
* otherwise a Hugging Face hub id (``name`` or ``org/name``), read from the local
  datasets cache (``HF_DATASETS_CACHE``) only. Workers run offline: a hub id that is
  not in the cache fails at once with a message saying so, never a download. The name
  of a ``datasets`` file format (``json``, ``csv``, ``text``, ``imagefolder``...) is
  refused: ``datasets`` would read it as that format over the worker's working directory.

Every local file is opened by meshq itself through ``app.core.data_roots.open_data_file``:
each one, links resolved, must lie under ``RESULTS_DIR`` or ``MESHQ_DATA_DIRS`` when it
is opened. ``datasets`` never reads a local directory on its own, so a ``README.md``
whose YAML names other files (``configs``, ``data_files``) is not followed, and a link
inside a data directory to a file elsewhere is refused.

(An ``http(s)`` URL is downloaded by the caller into the task directory first.)

``split`` takes the ``datasets`` slicing syntax: ``train``, ``train[:200]``,
``validation[10:20]``, ``train[:2%]``, ``train[:10]+test[:10]``. ``sample`` then
shuffles (``shuffle`` + ``seed``, the permutation ``Dataset.shuffle`` uses) and keeps
the first ``max_samples``: the slice is taken first, as ``datasets`` does when it
loads ``train[:200]``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path
from typing import Any, TypeVar

from app.core.data_roots import allowed_path, open_data_file
from app.core.errors import SpecError

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow", ".txt")
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?\Z")
GLOB_CHARACTERS = re.compile(r"[*?\[\]{}]")
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
    if file.suffix.lower() in DATA_SUFFIXES or file.exists() or looks_local(path):
        resolved = allowed_path(file, field)  # only under RESULTS_DIR or MESHQ_DATA_DIRS, links resolved
        if resolved.is_dir():
            if name:
                raise SpecError("spec.data.name", f"{name!r}: a local directory has no configurations "
                                                  "(name one for a hub dataset only)")
            return _read_directory(resolved, split=split, field=field, split_field=split_field)
        return slice_rows(_read_data_file(file, field), split, split_field)
    refuse_builder_name(path, field)
    if not HUB_ID_RE.match(path):
        raise SpecError(field, f"{path!r} does not exist (and is not a hub id such as org/name)")
    return _read_cached_dataset(path, split=split, name=name, field=field, split_field=split_field)


def looks_local(path: str) -> bool:
    """A path, not a hub id: absolute, ``~``, ``./`` or ``../`` (checked against the data roots
    even when nothing is there, so a refusal does not tell whether a file exists)."""
    return path.startswith(("/", "~", "./", "../")) or "\\" in path


def refuse_builder_name(path: str, field: str) -> None:
    """``json``, ``text``, ``imagefolder``...: to ``load_dataset`` these are file formats
    read over the current directory (the worker's own files), never a dataset."""
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    if path.strip().lower() in {name.lower() for name in _PACKAGED_DATASETS_MODULES}:
        raise SpecError(field, f"{path!r} is the name of a datasets file format, not a dataset: "
                               "datasets would read the worker's working directory with it. Give the path "
                               "of a data file or directory under RESULTS_DIR or MESHQ_DATA_DIRS, or a hub "
                               "id (org/name) in the local Hugging Face datasets cache")


def _read_data_file(file: Path, field: str) -> list[dict[str, Any]]:
    """The rows of one data file, opened (and checked against the data roots) here."""
    suffix = file.suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise SpecError(field, f"{file}: unsupported file type {suffix!r} (use {', '.join(DATA_SUFFIXES)})")
    with open_data_file(file, field) as raw:
        try:
            if suffix in (".parquet", ".arrow"):
                return _read_arrow_table(raw, suffix, file, field)
            text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
            if suffix == ".txt":  # datasets' text format: one row per line
                return [{"text": line.rstrip("\r\n")} for line in text]
            return _read_table_text(text, suffix, file, field)
        except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as exc:
            raise SpecError(field, f"{file}: cannot parse: {exc}") from None


def _read_table_text(text: io.TextIOWrapper, suffix: str, file: Path, field: str) -> list[dict[str, Any]]:
    if suffix == ".jsonl":
        rows = []
        for line_no, line in enumerate(text, 1):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise SpecError(field, f"{file}:{line_no}: each line must be a JSON object")
                rows.append(row)
        return rows
    if suffix == ".json":
        data = json.loads(text.read())
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise SpecError(field, f"{file}: expected a JSON list of objects")
        return data
    return list(csv.DictReader(text))


def _read_arrow_table(raw: Any, suffix: str, file: Path, field: str) -> list[dict[str, Any]]:
    """A parquet file, or an arrow stream (what ``save_to_disk`` writes) or arrow file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if suffix == ".parquet":
            return list(pq.read_table(raw).to_pylist())
        data = raw.read()
        try:
            return list(pa.ipc.open_stream(data).read_all().to_pylist())
        except pa.ArrowInvalid:
            return list(pa.ipc.open_file(data).read_all().to_pylist())
    except (pa.ArrowException, OSError) as exc:
        raise SpecError(field, f"{file}: cannot read it as {suffix[1:]}: {exc}") from None


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


def _read_directory(directory: Path, *, split: str, field: str, split_field: str) -> list[dict[str, Any]]:
    """``split`` of a saved dataset or of a folder of data files, every file read by meshq."""
    if any((directory / marker).is_file() for marker in SAVED_DATASET_MARKERS):
        splits = _saved_dataset_files(directory, field)
    else:
        splits = _data_files_by_split(directory, field)
    wanted = sorted({split_name(part) for part in split.split("+")})
    unknown = [name for name in wanted if name not in splits]
    if unknown:
        raise SpecError(split_field, f"{split!r}: no split {unknown[0]!r} (splits here: {', '.join(sorted(splits))})")
    loaded = {name: [row for file in splits[name] for row in _read_data_file(file, field)] for name in wanted}
    rows: list[dict[str, Any]] = []
    for instruction in _instructions(split, {name: len(part) for name, part in loaded.items()}, split_field):
        rows.extend(loaded[instruction.splitname][instruction.from_:instruction.to])
    return rows


def _plain_name(value: Any, directory: Path, what: str, field: str) -> str:
    """A name a saved dataset's own JSON gives (a split, an arrow file): one path component."""
    if not isinstance(value, str) or not value or value in (".", "..") or "/" in value or "\\" in value:
        raise SpecError(field, f"{str(directory)!r}: not a saved dataset ({what} {value!r} is not a plain name)")
    return value


def _read_json_file(file: Path, field: str) -> Any:
    with open_data_file(file, field) as raw:
        try:
            return json.loads(raw.read().decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SpecError(field, f"{file}: cannot parse: {exc}") from None


def _saved_dataset_files(directory: Path, field: str) -> dict[str, list[Path]]:
    """The arrow files of each split of a ``save_to_disk`` directory, named by its own JSON
    (``dataset_dict.json``'s splits, each ``state.json``'s ``_data_files``); a single
    ``Dataset`` is one split, called ``train``."""
    if (directory / "dataset_dict.json").is_file():
        listing = _read_json_file(directory / "dataset_dict.json", field)
        names = listing.get("splits") if isinstance(listing, dict) else None
        if not isinstance(names, list):
            raise SpecError(field, f"{str(directory)!r}: not a saved dataset (dataset_dict.json has no splits)")
        return {_plain_name(name, directory, "split", field):
                _state_files(directory / _plain_name(name, directory, "split", field), field) for name in names}
    return {"train": _state_files(directory, field)}


def _state_files(directory: Path, field: str) -> list[Path]:
    state = _read_json_file(directory / "state.json", field)
    entries = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise SpecError(field, f"{str(directory)!r}: not a saved dataset (state.json lists no data files)")
    return [directory / _plain_name(entry.get("filename"), directory, "file", field) for entry in entries]


def _data_files_by_split(directory: Path, field: str) -> dict[str, list[Path]]:
    """The data files of a folder, put into splits by ``datasets``' naming rules (listing
    only: its README.md is not read, the files are read by ``_read_data_file``)."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    if GLOB_CHARACTERS.search(str(directory)):
        raise SpecError(field, f"{str(directory)!r}: a data directory's path may not contain any of * ? [ ] {{ }}")
    try:
        patterns = get_data_patterns(str(directory))
        found = DataFilesDict.from_patterns(patterns, base_path=str(directory),
                                            allowed_extensions=[*DATA_SUFFIXES, *(s.upper() for s in DATA_SUFFIXES)])
    except FileNotFoundError:  # datasets' EmptyDatasetError, DataFilesNotFoundError
        found = DataFilesDict()
    splits = {str(name): [Path(file) for file in files] for name, files in found.items() if files}
    if not splits:
        raise SpecError(field, f"{str(directory)!r} holds no data files ({', '.join(DATA_SUFFIXES)}) "
                               "and is not a saved dataset")
    return splits


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
