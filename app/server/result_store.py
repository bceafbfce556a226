"""The orchestrator's results directory on disk (DESIGN §7).

Layout under the server's results directory::

    <task_id>/artifacts/<filename>          uploaded artifacts (atomic rename when complete)
    <task_id>/artifacts/.<filename>.meta~   sidecar: sha256, size and mtime of the artifact
    <task_id>/artifacts/.<filename>.<hex>.partial~   an upload in progress
    <task_id>/result.json                   the result envelope a worker posted
    <task_id>/<filename>                    other files (``responses.json``, ``manifest.json``)

Every name that becomes a path goes through ``check_name``; the store's own
bookkeeping files carry a ``~``, which ``check_name`` refuses, so no client can
read, overwrite or collide with them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import stat
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.artifacts.manifest import CHUNK_BYTES, RESPONSES_NAME
from app.names import check_name

log = logging.getLogger(__name__)

ARTIFACTS_DIR_NAME = "artifacts"
ENVELOPE_NAME = "result.json"
PARTIAL_SUFFIX = ".partial~"
META_SUFFIX = ".meta~"
IOV_MAX = 1024  # buffers per writev call (Linux's limit)
STALE_PARTIAL_AGE_S = 24 * 3600  # partial uploads untouched this long are debris of a crash
SHA_CACHE_ENTRIES = 4096


class BadName(ValueError):
    """A task id or file name that cannot be a path component (HTTP 400); ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def checked(value: object, field: str) -> str:
    """``check_name`` that raises ``BadName`` (the server turns it into 400)."""
    try:
        return check_name(value, field)
    except ValueError as exc:
        raise BadName(field, str(exc)) from None


@dataclass(frozen=True)
class OpenFile:
    """A regular file opened for reading, with what the download headers need."""

    fd: int
    path: Path
    size: int
    mtime: float
    mtime_ns: int
    ino: int


class UploadSink:
    """A temporary file beside the final name; ``commit`` renames it into place.

    ``hash`` and ``write`` take the same batch in two worker threads at once (both
    release the GIL), so an upload runs at the slower of the two, not their sum.
    ``abort`` removes the temporary file and the directories this upload created,
    so a failed upload leaves nothing behind.
    """

    def __init__(self, store: ResultStore, task_id: str, filename: str) -> None:
        self.store = store
        self.task_id = task_id
        self.filename = filename
        self.final_path = store.artifact_path(task_id, filename)
        self.digest = hashlib.sha256()
        self.bytes = 0
        self.created_dirs: list[Path] = []
        self.temp_path = self._open_temp()
        self.done = False

    def _open_temp(self) -> Path:
        directory = self.final_path.parent
        for _attempt in range(5):
            for parent in (directory.parent, directory):
                try:
                    parent.mkdir()
                    self.created_dirs.append(parent)
                except FileExistsError:
                    pass
            temp = directory / f".{self.filename}.{secrets.token_hex(6)}{PARTIAL_SUFFIX}"
            try:
                self.fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
                return temp
            except FileNotFoundError:  # a failed upload removed the empty directory meanwhile
                continue
        raise OSError(f"could not create a temporary file in {directory}")

    def hash(self, pieces: list[memoryview]) -> None:
        """Add one batch to the checksum (run in a thread: hashlib releases the GIL)."""
        for piece in pieces:
            self.digest.update(piece)

    def write(self, pieces: list[memoryview]) -> None:
        """Append one batch with as few ``writev`` calls as the kernel allows.

        One syscall per batch rather than one per received chunk: on ext4 the
        per-call cost of small writes, not the copy, limited upload throughput.
        """
        pending = [p for p in pieces if len(p)]
        while pending:
            written = os.writev(self.fd, pending[:IOV_MAX])
            if written <= 0:
                raise OSError(f"writev wrote nothing to {self.temp_path}")
            self.bytes += written
            while pending and written >= len(pending[0]):
                written -= len(pending.pop(0))
            if written:
                pending[0] = pending[0][written:]

    def commit(self) -> tuple[int, str]:
        """Close, record the checksum sidecar, rename into place; returns (bytes, sha256)."""
        os.close(self.fd)
        self.fd = -1
        sha256 = self.digest.hexdigest()
        st = os.stat(self.temp_path)
        meta_path = self.store.meta_path(self.final_path)
        self.store.write_meta(meta_path, sha256, st)
        try:
            os.replace(self.temp_path, self.final_path)
        except OSError:
            _unlink(meta_path)
            raise
        self.done = True
        self.store.remember_sha(self.final_path, st, sha256)
        return self.bytes, sha256

    def abort(self) -> None:
        if self.done:
            return
        self.done = True
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        _unlink(self.temp_path)
        for directory in reversed(self.created_dirs):
            try:
                directory.rmdir()  # only if still empty: another upload may be using it
            except OSError:
                break


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class ResultStore:
    """Paths, artifacts, checksums and result envelopes under one results directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        self._sha_cache: OrderedDict[tuple[str, int, int, int], str] = OrderedDict()
        self._sha_lock = threading.Lock()

    # -- paths ----------------------------------------------------------------
    def task_dir(self, task_id: str) -> Path:
        return self.root / checked(task_id, "task_id")

    def artifact_path(self, task_id: str, filename: str) -> Path:
        return self.task_dir(task_id) / ARTIFACTS_DIR_NAME / checked(filename, "filename")

    @staticmethod
    def meta_path(path: Path) -> Path:
        return path.with_name(f".{path.name}{META_SUFFIX}")

    # -- uploads --------------------------------------------------------------
    def new_upload(self, task_id: str, filename: str) -> UploadSink:
        self.root.mkdir(parents=True, exist_ok=True)
        return UploadSink(self, task_id, filename)

    def sweep_partials(self, older_than_s: float = STALE_PARTIAL_AGE_S) -> int:
        """Remove temporary files of uploads that died with a killed server; returns the count."""
        removed = 0
        cutoff = time.time() - older_than_s
        if not self.root.is_dir():
            return 0
        for task in os.scandir(self.root):
            artifacts = Path(task.path) / ARTIFACTS_DIR_NAME
            if not task.is_dir(follow_symlinks=False) or not artifacts.is_dir():
                continue
            for entry in os.scandir(artifacts):
                if entry.name.endswith(PARTIAL_SUFFIX) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    _unlink(Path(entry.path))
                    removed += 1
        if removed:
            log.info("removed %d stale partial upload(s) under %s", removed, self.root)
        return removed

    # -- downloads ------------------------------------------------------------
    def open_file(self, task_id: str, filename: str) -> OpenFile | None:
        """Open ``<task>/artifacts/<filename>``, else ``<task>/<filename>``; None if neither.

        Only regular files are served: symbolic links, directories and FIFOs are not.
        """
        artifact = self.artifact_path(task_id, filename)
        for path in (artifact, artifact.parent.parent / artifact.name):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                continue
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode):
                return OpenFile(fd, path, st.st_size, st.st_mtime, st.st_mtime_ns, st.st_ino)
            os.close(fd)
        return None

    def list_artifacts(self, task_id: str) -> list[dict[str, Any]]:
        directory = self.task_dir(task_id) / ARTIFACTS_DIR_NAME
        files = []
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            return []
        for entry in entries:
            try:
                check_name(entry.name)
            except ValueError:
                continue  # our own bookkeeping files
            if entry.is_file(follow_symlinks=False):
                files.append({"filename": entry.name, "bytes": entry.stat(follow_symlinks=False).st_size})
        return files

    # -- checksums ------------------------------------------------------------
    @staticmethod
    def write_meta(meta_path: Path, sha256: str, st: os.stat_result) -> None:
        temp = meta_path.with_name(f"{meta_path.name}.{secrets.token_hex(4)}~")
        temp.write_text(json.dumps({"sha256": sha256, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}))
        os.replace(temp, meta_path)

    def remember_sha(self, path: Path, st: os.stat_result | OpenFile, sha256: str) -> None:
        size = st.size if isinstance(st, OpenFile) else st.st_size
        mtime_ns = st.mtime_ns if isinstance(st, OpenFile) else st.st_mtime_ns
        ino = st.ino if isinstance(st, OpenFile) else st.st_ino
        with self._sha_lock:
            self._sha_cache[(str(path), ino, size, mtime_ns)] = sha256
            while len(self._sha_cache) > SHA_CACHE_ENTRIES:
                self._sha_cache.popitem(last=False)

    def sha256_of(self, opened: OpenFile) -> str:
        """The file's sha256: from memory, from its sidecar, or hashed once (blocking)."""
        key = (str(opened.path), opened.ino, opened.size, opened.mtime_ns)
        with self._sha_lock:
            cached = self._sha_cache.get(key)
        if cached:
            return cached
        meta_path = self.meta_path(opened.path)
        is_artifact = opened.path.parent.name == ARTIFACTS_DIR_NAME
        if is_artifact:
            try:
                meta = json.loads(meta_path.read_text())
                if meta.get("bytes") == opened.size and meta.get("mtime_ns") == opened.mtime_ns:
                    sha256 = str(meta["sha256"])
                    self.remember_sha(opened.path, opened, sha256)
                    return sha256
            except (OSError, ValueError, KeyError, TypeError):
                pass
        digest = hashlib.sha256()
        offset = 0
        while chunk := os.pread(opened.fd, CHUNK_BYTES, offset):
            digest.update(chunk)
            offset += len(chunk)
        sha256 = digest.hexdigest()
        self.remember_sha(opened.path, opened, sha256)
        if is_artifact:
            try:
                self.write_meta(meta_path, sha256, os.fstat(opened.fd))
            except OSError as exc:
                log.warning("could not write checksum sidecar %s: %s", meta_path, exc)
        return sha256

    # -- result envelopes -----------------------------------------------------
    def save_envelope(self, task_id: str, envelope: dict[str, Any]) -> Path:
        directory = self.task_dir(task_id)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / ENVELOPE_NAME
        temp = directory / f".{ENVELOPE_NAME}.{secrets.token_hex(6)}~"
        try:
            with open(temp, "w", encoding="utf-8") as fh:
                json.dump(envelope, fh, sort_keys=True)
            os.replace(temp, path)
        except BaseException:  # a full disk: no half-written temporary file stays behind
            _unlink(temp)
            raise
        return path

    def load_envelope(self, task_id: str) -> dict[str, Any] | None:
        try:
            data = json.loads((self.task_dir(task_id) / ENVELOPE_NAME).read_text(encoding="utf-8"))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return data if isinstance(data, dict) else None

    def load_responses(self, task_id: str) -> Any | None:
        """``<task>/responses.json`` if a worker wrote it here (shared results directory)."""
        try:
            return json.loads((self.task_dir(task_id) / RESPONSES_NAME).read_text(encoding="utf-8"))
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return None
