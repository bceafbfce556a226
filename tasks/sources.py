"""Several sources for one input: the first that works on this worker.

The original templates often name one input several ways at once — an earlier stage's
local file (``path``), its uploaded copy (``url``) and its task (``taskId``, that task's
archive on the orchestrator) — because the stage that reads it may run on another
machine than the one that wrote it. Wherever a spec may do that (``checkpoint.load``,
``model.adapters[]``, ``data.jsonl``), the task takes, in this order:

1. ``path`` when it lies inside this worker's data roots and exists and is readable here
   (a path outside the roots, missing or unreadable is passed over with a note);
2. else ``url``, downloaded (a download that fails after its retries is passed over with a
   note when a ``taskId`` follows);
3. else the ``taskId``'s archive on the orchestrator.

The input is then narrowed to the one source that worked (a remote one to the local copy
it was fetched to), so the executors see exactly one source, as if only it had been given;
the result's ``sources`` says which one each input used and ``notes`` why the others were
passed over. An input named by a single source is left alone: it keeps its own errors.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.artifacts.checkpoints import download_file, fetch_checkpoint
from app.core.data_roots import allowed_path
from app.core.errors import ArtifactError, SpecError
from app.core.redaction import redact
from app.core.task_spec import CheckpointLoad, ModelTaskSpec, TaskSpec
from app.core.task_spec.schema import AdapterSpec, JsonlSource, TrainingData

ORDER = ("path", "url", "task_id")
SPELLING = {"path": "path", "url": "url", "task_id": "taskId"}


@dataclass
class SourcesUsed:
    """Which source each several-source input used (``{field: "path" | "url" | "taskId"}``)
    and why the ones before it were passed over."""

    used: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add_to(self, result: dict[str, Any]) -> None:
        if self.used:
            result["sources"] = dict(self.used)
        if self.notes:
            result["notes"] = [*result.get("notes", []), *self.notes]


def given(values: dict[str, Any]) -> list[str]:
    return [name for name in ORDER if values.get(name)]


def usable_local(path: str, field_name: str, *, want_file: bool) -> tuple[Path | None, str]:
    """``(resolved path, "")`` when ``path`` can be read here, else ``(None, why not)``."""
    try:
        resolved = allowed_path(path, field_name)
    except SpecError:
        return None, "is outside this worker's data roots"
    if not (resolved.is_file() if want_file else resolved.exists()):
        return None, "does not exist on this worker"
    if not os.access(resolved, os.R_OK):
        return None, "is not readable on this worker"
    return resolved, ""


def first_that_works(field_name: str, names: list[str], values: dict[str, Any], *, want_file: bool,
                     fetch: Callable[[str], Path], used: SourcesUsed) -> tuple[str, Path]:
    """Try each given source of ``field_name`` in order; return ``(source name, local path)``.

    ``fetch(name)`` makes a remote source (``url``, ``task_id``) local. The last source
    given is tried without a safety net: its error is the input's error.
    """
    skipped: list[str] = []
    for position, name in enumerate(names):
        last = position == len(names) - 1
        shown = f"{field_name}.{SPELLING[name]}"
        if name == "path":
            local, why = usable_local(str(values["path"]), shown, want_file=want_file)
            if local is None and not last:
                skipped.append(f"{shown} {redact(str(values['path']))!r} {why}")
                continue
            if local is None:  # unreachable in practice: path is always tried first
                raise SpecError(shown, f"{str(values['path'])!r} {why}")
        else:
            try:
                local = fetch(name)
            except ArtifactError as exc:
                if last:
                    raise
                skipped.append(f"{shown} could not be fetched ({exc})")
                continue
        used.used[field_name] = SPELLING[name]
        passed_over = f" ({'; '.join(skipped)})" if skipped else ""
        used.notes.append(f"{field_name}: used {SPELLING[name]}{passed_over}")
        return name, local
    raise AssertionError("first_that_works: no source given")  # callers pass at least two


def checkpoint_from_sources(load: CheckpointLoad, field_name: str, out_dir: Path,
                            used: SourcesUsed) -> CheckpointLoad:
    """``load`` narrowed to its first working source: ``path`` as it is, a fetched archive
    as the local directory it was unpacked to."""
    values = load.model_dump()

    def fetch(name: str) -> Path:
        remote = CheckpointLoad(type="http", url=load.url if name == "url" else None,
                                task_id=load.task_id if name == "task_id" else None,
                                filename=load.filename if name == "task_id" else None,
                                sha256=load.sha256, archive_format=load.archive_format)
        return fetch_checkpoint(remote, out_dir)

    name, local = first_that_works(field_name, given(values), values, want_file=False, fetch=fetch, used=used)
    if name == "path":
        return CheckpointLoad(type="local", path=str(load.path), sha256=load.sha256,
                              archive_format=load.archive_format)
    return CheckpointLoad(type="local", path=str(local))


def pick_sources(spec: TaskSpec, out_dir: Path) -> tuple[TaskSpec, SourcesUsed]:
    """``spec`` with every several-source input narrowed to the source that works here."""
    used = SourcesUsed()
    updates: dict[str, Any] = {}
    if isinstance(spec, ModelTaskSpec):  # the weights to start from
        checkpoint = spec.checkpoint
        if checkpoint is not None and checkpoint.load is not None and len(given(checkpoint.load.model_dump())) > 1:
            narrowed = checkpoint_from_sources(checkpoint.load, "spec.checkpoint.load", out_dir, used)
            updates["checkpoint"] = checkpoint.model_copy(update={"load": narrowed})
        if any(len(given(a.model_dump())) > 1 for a in spec.model.adapters):
            adapters = [_adapter_from_sources(adapter, f"spec.model.adapters[{i}]", out_dir, used)
                        for i, adapter in enumerate(spec.model.adapters)]
            updates["model"] = spec.model.model_copy(update={"adapters": adapters})
    data = spec.data
    if isinstance(data, TrainingData) and data.jsonl is not None and data.jsonl.path and data.jsonl.url:
        narrowed_jsonl = JsonlSource.model_validate(_jsonl_from_sources(data.jsonl.model_dump(exclude_none=True),
                                                                        out_dir, used))
        updates["data"] = data.model_copy(update={"jsonl": narrowed_jsonl})
    return (spec.model_copy(update=updates) if updates else spec), used


def _adapter_from_sources(adapter: AdapterSpec, field_name: str, out_dir: Path, used: SourcesUsed) -> AdapterSpec:
    if len(given(adapter.model_dump())) < 2:
        return adapter
    as_load = CheckpointLoad(type="http" if adapter.url or adapter.task_id else "local", path=adapter.path,
                             url=adapter.url, task_id=adapter.task_id, filename=adapter.filename,
                             sha256=adapter.sha256)
    narrowed = checkpoint_from_sources(as_load, field_name, out_dir, used)
    return adapter.model_copy(update={"path": narrowed.path, "url": None, "task_id": None, "filename": None,
                                      "sha256": narrowed.sha256})


def _jsonl_from_sources(jsonl: dict[str, Any], out_dir: Path, used: SourcesUsed) -> dict[str, Any]:
    def fetch(name: str) -> Path:
        return download_file(str(jsonl["url"]), out_dir / "inputs")

    name, local = first_that_works("spec.data.jsonl", ["path", "url"], jsonl, want_file=True, fetch=fetch,
                                   used=used)
    narrowed = {key: value for key, value in jsonl.items() if key != "url"}
    narrowed["path"] = str(jsonl["path"]) if name == "path" else str(local)
    return narrowed
