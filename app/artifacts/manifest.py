"""File checksums and the ``manifest.json`` of a task directory (DESIGN §6)."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from typing import Any

import orjson

CHUNK_BYTES = 1024 * 1024
MANIFEST_NAME = "manifest.json"
RESPONSES_NAME = "responses.json"
# checkpoints: large, transient, and not part of the result; .meshq: the task folder's
# bookkeeping (app.artifacts.run_record)
SKIP_DIRS = ("checkpoints", ".meshq")


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def build_manifest(task_dir: str | os.PathLike[str], *, skip_dirs: tuple[str, ...] = SKIP_DIRS,
                   known: dict[str, bytes] | None = None,
                   known_sha256: dict[str, str] | None = None) -> dict[str, Any]:
    """Every regular file under ``task_dir`` (except the manifest itself and ``skip_dirs``)
    with its size and sha256, sorted by relative path.

    ``known`` maps relative paths to contents just written, hashed from memory;
    ``known_sha256`` to digests computed already (a model archive hashed while it
    was written), so multi-gigabyte files are not read again.
    """
    known = known or {}
    known_sha256 = known_sha256 or {}
    files: list[dict[str, Any]] = []

    def walk(directory: str, prefix: str) -> None:
        with os.scandir(directory) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                rel = prefix + entry.name
                if entry.is_dir(follow_symlinks=False):
                    if not (prefix == "" and entry.name in skip_dirs):
                        walk(entry.path, rel + "/")
                elif entry.is_file(follow_symlinks=False) and rel != MANIFEST_NAME:
                    content = known.get(rel)
                    if content is not None:
                        size, digest = len(content), hashlib.sha256(content).hexdigest()
                    elif rel in known_sha256:
                        size, digest = entry.stat().st_size, known_sha256[rel]
                    else:
                        size, digest = entry.stat().st_size, sha256_file(entry.path)
                    files.append({"path": rel, "bytes": size, "sha256": digest})

    walk(os.fspath(task_dir), "")
    files.sort(key=lambda f: str(f["path"]))
    return {"files": files, "total_bytes": sum(f["bytes"] for f in files)}


# orjson writes the indented, key-sorted document json.dumps(indent=2, sort_keys=True) writes
# (non-ASCII as UTF-8 rather than \u escapes, floats in their shortest form: the same values)
# in a fraction of the time: the standard library indents in pure Python, and that encoder was
# the largest piece of a short task's result files. Subclasses of str, int, dict and list,
# datetimes and dataclasses are left to the standard library (the passthrough options).
_ORJSON_OPTIONS = (orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE
                   | orjson.OPT_PASSTHROUGH_SUBCLASS | orjson.OPT_PASSTHROUGH_DATETIME
                   | orjson.OPT_PASSTHROUGH_DATACLASS)


def json_bytes(data: Any) -> bytes:
    """``data`` as an indented JSON document with sorted keys (every JSON file meshq writes)."""
    try:
        # The standard library's C encoder checks first what orjson would write differently:
        # NaN and infinities (orjson writes null) and types it serialises where json refuses
        # them (UUIDs, enums). Either way the document is then json's, as it always was.
        json.dumps(data, allow_nan=False)
        return orjson.dumps(data, option=_ORJSON_OPTIONS)
    except (TypeError, ValueError):  # also orjson's: keys that are not strings, integers over 64 bits
        return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")


def write_bytes_atomic(path: str | os.PathLike[str], content: bytes) -> None:
    """Write to a temporary file of this call's own and rename it over ``path``: readers
    never see half a file, and two writers of one path at once never mix their bytes.
    The temporary name ends in ``~``, which no name a client gives can (``app.core.names``),
    so the server never serves one.

    No fsync: the rename is atomic for readers and a killed process loses nothing
    (the page cache survives it); the Celery result in Redis is the durable copy.
    """
    path = os.fspath(path)
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.{secrets.token_hex(6)}~")
    # os-level calls, not open(): a buffered file object costs three more syscalls (fstat,
    # isatty, lseek) on every task's two result files. O_EXCL: the name is this call's own.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        try:
            view = memoryview(content)
            while view:  # a write may be partial (a signal, a pipe-like filesystem)
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)  # no half-written leftovers (e.g. disk full)
        except FileNotFoundError:
            pass
        raise


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """The one atomic JSON write of meshq's files (see ``write_bytes_atomic``)."""
    write_bytes_atomic(path, json_bytes(data))


def write_task_outputs(task_dir: str | os.PathLike[str], result: dict[str, Any], *,
                       known_sha256: dict[str, str] | None = None,
                       reuse: dict[str, Any] | None = None, walk: bool = True) -> dict[str, Any]:
    """Write ``responses.json`` then ``manifest.json`` (which covers it); return the manifest.

    ``reuse``: the manifest this directory got moments ago; only ``responses.json``
    changed since, so every other entry is kept instead of hashing the files again.
    ``walk=False``: the executor wrote no files of its own, so the manifest lists
    ``responses.json`` alone without reading the directory.
    """
    task_dir = os.fspath(task_dir)
    body = json_bytes(result)
    try:
        write_bytes_atomic(os.path.join(task_dir, RESPONSES_NAME), body)
    except FileNotFoundError:  # the task made no directory yet (checked lazily: one syscall less)
        os.makedirs(task_dir, exist_ok=True)
        write_bytes_atomic(os.path.join(task_dir, RESPONSES_NAME), body)
    if reuse is None and not walk:
        reuse = {"files": []}
    if reuse is not None:
        files = [f for f in reuse["files"] if f["path"] != RESPONSES_NAME]
        files.append({"path": RESPONSES_NAME, "bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()})
        files.sort(key=lambda f: str(f["path"]))
        manifest = {"files": files, "total_bytes": sum(int(f["bytes"]) for f in files)}
    else:
        manifest = build_manifest(task_dir, known={RESPONSES_NAME: body}, known_sha256=known_sha256)
    write_json_atomic(os.path.join(task_dir, MANIFEST_NAME), manifest)
    return manifest
