"""File checksums and the ``manifest.json`` of a task directory (DESIGN §6)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

CHUNK_BYTES = 1024 * 1024
MANIFEST_NAME = "manifest.json"
RESPONSES_NAME = "responses.json"


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def build_manifest(task_dir: str | os.PathLike[str], *, skip_dirs: tuple[str, ...] = ("checkpoints",)) -> dict[str, Any]:
    """Every regular file under ``task_dir`` (except the manifest itself and ``skip_dirs``)
    with its size and sha256, sorted by relative path."""
    root = Path(task_dir)
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        if rel_dir == Path("."):
            dirnames[:] = [d for d in dirnames if d not in skip_dirs]
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = (rel_dir / name).as_posix()
            if rel == MANIFEST_NAME or path.is_symlink() or not path.is_file():
                continue
            files.append({"path": rel, "bytes": path.stat().st_size, "sha256": sha256_file(path)})
    return {"files": files, "total_bytes": sum(f["bytes"] for f in files)}


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write JSON to a temporary file and rename it, so readers never see half a file.

    No fsync: the rename is atomic for readers and a killed worker loses nothing
    (the page cache survives it); the Celery result in Redis is the durable copy.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.write("\n")
    except BaseException:
        tmp.unlink(missing_ok=True)  # no half-written leftovers (e.g. disk full)
        raise
    os.replace(tmp, path)


def write_task_outputs(task_dir: str | os.PathLike[str], result: dict[str, Any]) -> dict[str, Any]:
    """Write ``responses.json`` then ``manifest.json`` (which covers it); return the manifest."""
    task_dir = Path(task_dir)
    task_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(task_dir / RESPONSES_NAME, result)
    manifest = build_manifest(task_dir)
    write_json_atomic(task_dir / MANIFEST_NAME, manifest)
    return manifest
