"""The artifacts a worker uploads to the orchestrator, on disk (DESIGN §7).

Layout under a task's folder of the server's results directory::

    artifacts/<filename>          a symbolic link to the current upload's file:
    artifacts/.<filename>.<hex>~/<filename>   an upload, in its own directory with
    artifacts/.<filename>.<hex>~/.meta~       its checksum (sha256, size)
    artifacts/.<filename>.<hex>~/<filename>.partial~   an upload in progress
    artifacts/.<filename>.lock~   serialises the commits of uploads of one name

Uploads of one name are atomic as a pair: each is written, with its checksum, into a
directory of its own that nothing else ever writes, and becomes current by one atomic
replacement of the symbolic link. A reader follows the link once and reads the file and
its checksum from that one directory, so it never sees one upload's bytes with another's
checksum — also after a restart. (Artifacts stored by earlier versions as a plain file
with a ``.<filename>.meta~`` sidecar are still served.)

An upload in progress holds a lock on its partial file: an upload whose server died is
recognised by its free lock and removed at start-up (``sweep_dead_uploads``); one that
fails or is abandoned is removed at once. An upload from a worker's run commits under
the task's run record (``app.artifacts.run_record``): one from an earlier run than the
recorded one raises ``StaleRun`` and becomes nothing.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.artifacts.manifest import CHUNK_BYTES, write_json_atomic
from app.artifacts.run_record import fenced
from app.core.names import check_name

log = logging.getLogger(__name__)

ARTIFACTS_DIR_NAME = "artifacts"
PARTIAL_SUFFIX = ".partial~"
META_SUFFIX = ".meta~"
VERSION_META_NAME = ".meta~"
LOCK_SUFFIX = ".lock~"
LINK_SUFFIX = ".link~"
VERSION_RE = re.compile(r"^\.(?P<name>.+)\.(?P<hex>[0-9a-f]{12})~\Z")
OPEN_RETRIES = 5  # a commit may remove the version a reader's link pointed to: read the link again
IOV_MAX = 1024  # buffers per writev call (Linux's limit)
SHA_CACHE_ENTRIES = 4096


@dataclass(frozen=True)
class OpenFile:
    """A regular file opened for reading, with what the download headers need."""

    fd: int
    path: Path
    size: int
    mtime: float
    mtime_ns: int
    ino: int
    sha256: str | None = None  # from the upload's own checksum record, when it has one


class UploadSink:
    """One upload: a directory of its own beside the final name; ``commit`` makes it current.

    ``hash`` and ``write`` take the same batch in two worker threads at once (both
    release the GIL), so an upload runs at the slower of the two, not their sum.
    ``abort`` removes the upload's directory and the directories this upload created,
    so a failed upload leaves nothing behind.
    """

    def __init__(self, files: ArtifactFiles, task_dir: Path, filename: str, run: int | None = None) -> None:
        self.files = files
        self.task_dir = task_dir
        self.filename = filename
        self.run = run  # the uploading worker's run: an earlier run than the stored one is refused
        self.final_path = task_dir / ARTIFACTS_DIR_NAME / filename
        self.digest = hashlib.sha256()
        self.bytes = 0
        self.created_dirs: list[Path] = []
        self.version_dir = self.final_path.parent / f".{filename}.{secrets.token_hex(6)}~"
        self.done = False
        self.fd = -1
        try:
            self.temp_path = self._open_temp()
        except BaseException:  # a full disk already: leave no empty directories either
            self.abort()
            raise

    def _open_temp(self) -> Path:
        directory = self.final_path.parent
        for _attempt in range(5):
            for parent in (directory.parent, directory):
                try:
                    parent.mkdir()
                    self.created_dirs.append(parent)
                except FileExistsError:
                    pass
            try:
                self.version_dir.mkdir()
            except FileNotFoundError:  # a failed upload removed the empty directory meanwhile
                continue
            temp = self.version_dir / f"{self.filename}{PARTIAL_SUFFIX}"
            try:
                self.fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            except BaseException:
                shutil.rmtree(self.version_dir, ignore_errors=True)
                raise
            fcntl.flock(self.fd, fcntl.LOCK_EX)  # alive: held until the upload ends (or its process dies)
            return temp
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
        """Record the checksum beside the file, then point the name at this upload (one
        atomic replacement of the link); returns (bytes, sha256).

        Commits of one name take turns (a lock file), so removing the versions they
        replace never removes one that another commit is about to make current. An upload
        from a run (``run``) commits under the task's run record: one from an earlier run than
        the task's recorded one raises ``StaleRun`` and becomes nothing.
        """
        sha256 = self.digest.hexdigest()
        data_path = self.version_dir / self.filename
        with fenced(self.task_dir, self.run), self.files.name_lock(self.final_path):
            os.rename(self.temp_path, data_path)
            self.temp_path = data_path
            st = os.fstat(self.fd)
            self.files.write_meta(self.version_dir / VERSION_META_NAME, sha256, st)
            link = self.final_path.parent / f".{self.filename}.{secrets.token_hex(6)}{LINK_SUFFIX}"
            os.symlink(f"{self.version_dir.name}/{self.filename}", link)
            try:
                os.replace(link, self.final_path)  # readers now get this upload, with its checksum
            except BaseException:
                _unlink(link)
                raise
            self.done = True
            os.close(self.fd)
            self.fd = -1
            self.files.remove_replaced(self.final_path, keep=self.version_dir.name)
        self.files.remember_sha(data_path, st, sha256)
        return self.bytes, sha256

    def abort(self) -> None:
        if self.done:
            return
        self.done = True
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        shutil.rmtree(self.version_dir, ignore_errors=True)
        for directory in reversed(self.created_dirs):
            try:
                directory.rmdir()  # only if still empty: another upload may be using it
            except OSError:
                break


class _NameLock:
    """An exclusive ``flock`` on ``.<filename>.lock~`` while a commit or the sweep runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> _NameLock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # releases the lock
        self.fd = -1


def _lock_is_held(path: Path) -> bool:
    """Does a live process hold the lock of an upload's partial file?"""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
    finally:
        os.close(fd)
    return False


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class ArtifactFiles:
    """The uploads, reads and checksums of artifacts under one results directory, by path
    (``ResultStore`` turns task ids and file names into the paths)."""

    def __init__(self) -> None:
        self._sha_cache: OrderedDict[tuple[str, int, int, int], str] = OrderedDict()
        self._sha_lock = threading.Lock()

    @staticmethod
    def meta_path(path: Path) -> Path:
        return path.with_name(f".{path.name}{META_SUFFIX}")

    # -- uploads --------------------------------------------------------------
    def name_lock(self, final_path: Path) -> _NameLock:
        return _NameLock(final_path.with_name(f".{final_path.name}{LOCK_SUFFIX}"))

    @staticmethod
    def current_version(final_path: Path) -> str | None:
        """The name of the upload directory ``final_path`` links to, if it is such a link."""
        try:
            target = os.readlink(final_path)
        except OSError:
            return None
        version, sep, name = target.partition("/")
        match = VERSION_RE.match(version)
        if not sep or name != final_path.name or match is None or match.group("name") != name:
            return None
        return version

    def remove_replaced(self, final_path: Path, keep: str) -> None:
        """Remove the committed uploads of ``final_path``'s name other than ``keep`` (call
        under the name's lock); uploads still in progress stay."""
        name = final_path.name
        try:
            entries = list(os.scandir(final_path.parent))
        except OSError:
            return
        for entry in entries:
            match = VERSION_RE.match(entry.name)
            if (match is None or match.group("name") != name or entry.name == keep
                    or not entry.is_dir(follow_symlinks=False)):
                continue
            # Only committed ones (they have their checksum record, never a partial file): a
            # directory just made by an upload that has not opened its file yet is empty.
            if not os.path.lexists(os.path.join(entry.path, VERSION_META_NAME)) \
                    or os.path.lexists(os.path.join(entry.path, f"{name}{PARTIAL_SUFFIX}")):
                continue
            shutil.rmtree(entry.path, ignore_errors=True)
        legacy_meta = self.meta_path(final_path)
        _unlink(legacy_meta)  # the sidecar of a plain file this upload replaced

    def sweep_dead_uploads(self, root: Path) -> int:
        """Remove what uploads left behind when their server died: partial files whose lock is
        free, upload directories no name links to, stray links; returns how many."""
        removed = 0
        if not root.is_dir():
            return 0
        for task in os.scandir(root):
            artifacts = Path(task.path) / ARTIFACTS_DIR_NAME
            if not task.is_dir(follow_symlinks=False) or not artifacts.is_dir():
                continue
            for entry in list(os.scandir(artifacts)):
                path = Path(entry.path)
                if entry.name.endswith((PARTIAL_SUFFIX, LINK_SUFFIX)) and not entry.is_dir(follow_symlinks=False):
                    _unlink(path)  # an older version's partial file, or a link never put in place
                    removed += 1
                    continue
                match = VERSION_RE.match(entry.name)
                if match is None or not entry.is_dir(follow_symlinks=False):
                    continue
                name = match.group("name")
                partial = path / f"{name}{PARTIAL_SUFFIX}"
                if partial.exists() or not (path / VERSION_META_NAME).exists():
                    if _lock_is_held(partial):
                        continue  # another live server's upload
                    shutil.rmtree(path, ignore_errors=True)  # an upload that died
                    removed += 1
                    continue
                with self.name_lock(artifacts / name):  # committed: is it the current one?
                    if self.current_version(artifacts / name) != entry.name:
                        shutil.rmtree(path, ignore_errors=True)
                        removed += 1
        if removed:
            log.info("removed %d partial or replaced upload(s) under %s", removed, root)
        return removed

    # -- downloads ------------------------------------------------------------
    def open_file(self, artifact: Path) -> OpenFile | None:
        """Open ``<task>/artifacts/<filename>`` (``artifact``), else ``<task>/<filename>``; None
        if neither.

        An artifact is read through its link, file and checksum from the one upload
        directory it names. Only regular files are served: other symbolic links,
        directories and FIFOs are not.
        """
        filename = artifact.name
        for _attempt in range(OPEN_RETRIES):
            version = self.current_version(artifact)
            if version is None:
                break
            opened = self._open_version(artifact.parent / version, filename)
            if opened is not None:
                return opened
            # replaced and removed between reading the link and opening: read it again
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

    @staticmethod
    def _open_version(directory: Path, filename: str) -> OpenFile | None:
        try:
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        try:
            try:
                fd = os.open(filename, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
            except FileNotFoundError:
                return None
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                os.close(fd)
                return None
            sha256 = None
            try:
                meta_fd = os.open(VERSION_META_NAME, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)
                with os.fdopen(meta_fd, encoding="utf-8") as fh:
                    meta = json.load(fh)
                if meta.get("bytes") == st.st_size:
                    sha256 = str(meta["sha256"])
            except (OSError, ValueError, KeyError, TypeError):
                pass  # hashed from the open file instead
            return OpenFile(fd, directory / filename, st.st_size, st.st_mtime, st.st_mtime_ns, st.st_ino, sha256)
        finally:
            os.close(dir_fd)

    def list_artifacts(self, directory: Path) -> list[dict[str, Any]]:
        """The current artifacts in ``<task>/artifacts`` (``directory``) with their sizes."""
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
            if entry.is_symlink() and self.current_version(Path(entry.path)) is not None:
                try:
                    files.append({"filename": entry.name, "bytes": entry.stat().st_size})
                except FileNotFoundError:
                    continue  # replaced meanwhile
            elif entry.is_file(follow_symlinks=False):
                files.append({"filename": entry.name, "bytes": entry.stat(follow_symlinks=False).st_size})
        return files

    # -- checksums ------------------------------------------------------------
    @staticmethod
    def write_meta(meta_path: Path, sha256: str, st: os.stat_result) -> None:
        write_json_atomic(meta_path, {"sha256": sha256, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})

    def remember_sha(self, path: Path, st: os.stat_result | OpenFile, sha256: str) -> None:
        size = st.size if isinstance(st, OpenFile) else st.st_size
        mtime_ns = st.mtime_ns if isinstance(st, OpenFile) else st.st_mtime_ns
        ino = st.ino if isinstance(st, OpenFile) else st.st_ino
        with self._sha_lock:
            self._sha_cache[(str(path), ino, size, mtime_ns)] = sha256
            while len(self._sha_cache) > SHA_CACHE_ENTRIES:
                self._sha_cache.popitem(last=False)

    def sha256_of(self, opened: OpenFile) -> str:
        """The file's sha256: its upload's record, from memory, from its sidecar, or hashed
        once (blocking)."""
        if opened.sha256:
            return opened.sha256
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

