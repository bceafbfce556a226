"""The orchestrator's results directory on disk (DESIGN §7).

Layout under the server's results directory::

    <task_id>/artifacts/<filename>          a symbolic link to the current upload's file:
    <task_id>/artifacts/.<filename>.<hex>~/<filename>   an upload, in its own directory with
    <task_id>/artifacts/.<filename>.<hex>~/.meta~       its checksum (sha256, size)
    <task_id>/artifacts/.<filename>.<hex>~/<filename>.partial~   an upload in progress
    <task_id>/artifacts/.<filename>.lock~   serialises the commits of uploads of one name
    <task_id>/result.json                   the result envelope a worker posted
    <task_id>/.run~                         the highest run of the task that stored anything here
    <task_id>/.run.lock~                    serialises the run checks and commits of one task
    <task_id>/<filename>                    other files (``responses.json``, ``manifest.json``)

Uploads of one name are atomic as a pair: each is written, with its checksum, into a
directory of its own that nothing else ever writes, and becomes current by one atomic
replacement of the symbolic link. A reader follows the link once and reads the file and
its checksum from that one directory, so it never sees one upload's bytes with another's
checksum — also after a restart. (Artifacts stored by earlier versions as a plain file
with a ``.<filename>.meta~`` sidecar are still served.)

An upload in progress holds a lock on its partial file: an upload whose server died is
recognised by its free lock and removed at start-up (``sweep_dead_uploads``); one that
fails or is abandoned is removed at once.

Uploads and envelopes from a worker are keyed by run (the worker's count of real starts
of the task): the task's highest run is recorded in ``.run~`` (written atomically, so it
survives a restart). Under the task's run lock, an upload or envelope from an earlier run
than the recorded one raises ``StaleRun`` (HTTP 409) and stores nothing; one from the same
or a later run records its run and is committed. Uploads without a run (plain users) are
not keyed.

Every name that becomes a path goes through ``check_name``; the store's own
bookkeeping files carry a ``~``, which ``check_name`` refuses, so no client can
read, overwrite or collide with them.
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
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
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
VERSION_META_NAME = ".meta~"
LOCK_SUFFIX = ".lock~"
LINK_SUFFIX = ".link~"
RUN_RECORD_NAME = ".run~"
RUN_LOCK_NAME = ".run.lock~"
VERSION_RE = re.compile(r"^\.(?P<name>.+)\.(?P<hex>[0-9a-f]{12})~\Z")
OPEN_RETRIES = 5  # a commit may remove the version a reader's link pointed to: read the link again
IOV_MAX = 1024  # buffers per writev call (Linux's limit)
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
    sha256: str | None = None  # from the upload's own checksum record, when it has one


class UploadSink:
    """One upload: a directory of its own beside the final name; ``commit`` makes it current.

    ``hash`` and ``write`` take the same batch in two worker threads at once (both
    release the GIL), so an upload runs at the slower of the two, not their sum.
    ``abort`` removes the upload's directory and the directories this upload created,
    so a failed upload leaves nothing behind.
    """

    def __init__(self, store: ResultStore, task_id: str, filename: str, run: int | None = None) -> None:
        self.store = store
        self.task_id = task_id
        self.filename = filename
        self.run = run  # the uploading worker's run: an earlier run than the stored one is refused
        self.final_path = store.artifact_path(task_id, filename)
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
        from a run (``run``) commits under the task's run lock: one from an earlier run than
        the task's recorded one raises ``StaleRun`` and becomes nothing.
        """
        sha256 = self.digest.hexdigest()
        data_path = self.version_dir / self.filename
        claim = self.store.claim_run(self.task_id, self.run) if self.run is not None else nullcontext()
        with claim, self.store.name_lock(self.final_path):
            os.rename(self.temp_path, data_path)
            self.temp_path = data_path
            st = os.fstat(self.fd)
            self.store.write_meta(self.version_dir / VERSION_META_NAME, sha256, st)
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
            self.store.remove_replaced(self.final_path, keep=self.version_dir.name)
        self.store.remember_sha(data_path, st, sha256)
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
    """An exclusive ``flock`` on a lock file (``.<filename>.lock~`` while a commit or the
    sweep runs, ``<task>/.run.lock~`` while a run is checked and committed)."""

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


class StaleRun(Exception):
    """An upload or result envelope from an earlier run than the one already stored."""

    def __init__(self, task_id: str, run: int, stored_run: int) -> None:
        super().__init__(task_id, run, stored_run)
        self.task_id, self.run, self.stored_run = task_id, run, stored_run

    def __str__(self) -> str:
        return (f"run {self.run} of task {self.task_id} is older than the stored result's run "
                f"{self.stored_run}; not stored")


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
    def new_upload(self, task_id: str, filename: str, run: int | None = None) -> UploadSink:
        self.root.mkdir(parents=True, exist_ok=True)
        return UploadSink(self, task_id, filename, run)

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

    def sweep_dead_uploads(self) -> int:
        """Remove what uploads left behind when their server died: partial files whose lock is
        free, upload directories no name links to, stray links; returns how many."""
        removed = 0
        if not self.root.is_dir():
            return 0
        for task in os.scandir(self.root):
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
            log.info("removed %d partial or replaced upload(s) under %s", removed, self.root)
        return removed

    # -- downloads ------------------------------------------------------------
    def open_file(self, task_id: str, filename: str) -> OpenFile | None:
        """Open ``<task>/artifacts/<filename>``, else ``<task>/<filename>``; None if neither.

        An artifact is read through its link, file and checksum from the one upload
        directory it names. Only regular files are served: other symbolic links,
        directories and FIFOs are not.
        """
        artifact = self.artifact_path(task_id, filename)
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

    # -- runs -------------------------------------------------------------------
    def stored_run(self, task_id: str) -> int | None:
        """The highest run that stored an upload or envelope of the task (``.run~``; for a
        task stored before runs were recorded there, the envelope's ``run``)."""
        directory = self.task_dir(task_id)
        try:
            run = json.loads((directory / RUN_RECORD_NAME).read_text(encoding="utf-8")).get("run")
        except (FileNotFoundError, NotADirectoryError):
            run = (self.load_envelope(task_id) or {}).get("run")
        except (OSError, ValueError, AttributeError):
            run = None
        return run if isinstance(run, int) and not isinstance(run, bool) else None

    def check_run(self, task_id: str, run: int) -> None:
        """Raise ``StaleRun`` if ``run`` is earlier than the task's stored run (a quick
        check before an upload is received; ``claim_run`` decides at the commit)."""
        stored = self.stored_run(task_id)
        if stored is not None and run < stored:
            raise StaleRun(task_id, run, stored)

    @contextmanager
    def claim_run(self, task_id: str, run: int) -> Iterator[None]:
        """Hold the task's run lock; raise ``StaleRun`` if ``run`` is earlier than the stored
        run, else record ``run`` (when later) and let the caller commit under the lock."""
        directory = self.task_dir(task_id)
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            directory.mkdir()
            created = True
        except FileExistsError:
            created = False
        try:
            with _NameLock(directory / RUN_LOCK_NAME):
                stored = self.stored_run(task_id)
                if stored is not None and run < stored:
                    raise StaleRun(task_id, run, stored)
                if stored is None or run > stored:
                    self._write_atomic(directory / RUN_RECORD_NAME, {"run": run})
                yield
        except BaseException:
            if created:  # the task's first write failed (a full disk): leave nothing behind
                for name in (RUN_RECORD_NAME, RUN_LOCK_NAME):
                    _unlink(directory / name)
                try:
                    directory.rmdir()
                except OSError:
                    pass
            raise

    @staticmethod
    def _write_atomic(path: Path, data: dict[str, Any]) -> None:
        temp = path.with_name(f"{path.name}.{secrets.token_hex(6)}~")
        try:
            with open(temp, "w", encoding="utf-8") as fh:
                json.dump(data, fh, sort_keys=True)
            os.replace(temp, path)
        except BaseException:  # a full disk: no half-written temporary file stays behind
            _unlink(temp)
            raise

    # -- result envelopes -----------------------------------------------------
    def save_envelope(self, task_id: str, envelope: dict[str, Any]) -> Path:
        """Store a task's result envelope. Envelopes are keyed by run (``run``: the worker's
        count of real starts of the task), like uploads: one from an earlier run than the
        task's stored run (a late run of a paused worker) raises ``StaleRun`` and changes
        nothing."""
        run = envelope.get("run")
        if isinstance(run, int) and not isinstance(run, bool):
            with self.claim_run(task_id, run):
                return self._write_envelope(task_id, envelope)
        return self._write_envelope(task_id, envelope)

    def _write_envelope(self, task_id: str, envelope: dict[str, Any]) -> Path:
        directory = self.task_dir(task_id)
        created = not directory.exists()
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / ENVELOPE_NAME
        try:
            self._write_atomic(path, envelope)
        except BaseException:  # a full disk: nor an empty task directory
            if created:
                try:
                    directory.rmdir()
                except OSError:
                    pass
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
