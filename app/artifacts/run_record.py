"""The run record of a task folder: a late run never overwrites a later run's outputs.

A task can run more than once (a paused worker's late run and the run that took the task
over), and its runs commit into one folder: a worker's ``RESULTS_DIR/<task_id>/`` (two
workers on one host or on shared storage) and the server's ``<results>/<task_id>/`` for
the uploads and the result envelope a worker sends — the same folder where the server's
results directory is the workers' ``RESULTS_DIR``. Every commit of a run's outputs, on
either side, happens inside ``fenced(task_dir, run)``, which locks, compares, records and
lets the caller commit:

- lock: an exclusive ``flock`` on the task folder itself (``<task_dir>/.meshq/lock`` where
  the filesystem cannot lock a directory: NFS); the commits of one task take turns, a
  worker's and the server's alike;
- compare: the task's highest run so far is read from ``<task_dir>/.meshq/run``; a run
  earlier than that raises ``StaleRun`` (HTTP 409 on the server, the run stops on a
  worker) and writes nothing;
- record: a run after the first is recorded (atomically). Run 1 records nothing: no run
  is earlier than it, so no record means "no run after the first committed", and a
  task's common case costs no file write;
- commit: the caller writes its outputs, still under the lock. A worker never sends
  anything to the server from inside: in a shared folder the server's commit would wait
  for the worker's lock, and the worker for the server's answer.

A run paused before the lock is refused when it wakes; a run paused inside it only delays
the later run, which then overwrites what it wrote. What a worker prepares before its
commit goes to a directory of its own (``staging_dir``), never to a path another run uses.
``run=None`` (an executor run without a worker, an upload without a run) commits without
the fence. ``.meshq/`` is bookkeeping: not an output, not in the manifest, not served.

Task folders written by earlier versions: the worker's record was already ``.meshq/run``;
the server's was ``<task_dir>/.run~`` (under ``.run.lock~``), still read, so a run recorded
there keeps its place. (The server before that read a missing record from ``result.json``'s
``run``: that version lived two hours of one day's development and is not read, or every
first run's commit would parse the task's whole envelope.)
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from app.artifacts.manifest import write_json_atomic
from app.core.errors import StaleRun

RECORD_DIR = ".meshq"  # the task folder's bookkeeping
RECORD_FILE = "run"
LOCK_FILE = "lock"
STAGING_DIR = "staging"
OLD_SERVER_RECORD = ".run~"  # the server's record before this module


def recorded_run(task_dir: str | os.PathLike[str]) -> int | None:
    """The highest run that committed outputs into ``task_dir`` (None: none recorded)."""
    task_dir = os.fspath(task_dir)  # plain strings: this runs at every commit of every task
    runs = [run for run in (_read_run(os.path.join(task_dir, RECORD_DIR, RECORD_FILE)),
                            _read_run(os.path.join(task_dir, OLD_SERVER_RECORD))) if run is not None]
    return max(runs, default=None)


def _read_run(path: str) -> int | None:
    try:
        with open(path, encoding="utf-8") as fh:
            run = json.load(fh).get("run")
    except (OSError, ValueError, AttributeError):
        return None
    return run if isinstance(run, int) and not isinstance(run, bool) else None


def check_run(task_dir: str | os.PathLike[str], run: int) -> int | None:
    """Raise ``StaleRun`` if ``run`` is earlier than the recorded run, else return that (a
    quick check without the lock before a long upload is received; ``fenced`` decides)."""
    stored = recorded_run(task_dir)
    if stored is not None and run < stored:
        raise StaleRun(Path(task_dir).name, run, stored)
    return stored


@contextmanager
def fenced(task_dir: str | os.PathLike[str], run: int | None) -> Iterator[None]:
    """Commit a run's outputs into ``task_dir`` under its run record (see the module doc);
    raises ``StaleRun`` when a later run committed there already. A commit that fails in a
    task folder this call made (a full disk) leaves no folder and no record behind."""
    if run is None:
        yield
        return
    task_dir = Path(task_dir)
    created = not task_dir.is_dir()  # made by this commit (or one beside it: see _remove_if_bare)
    fd = -1
    try:
        fd = _lock(task_dir)
        if run > (check_run(task_dir, run) or 1):
            (task_dir / RECORD_DIR).mkdir(exist_ok=True)
            write_json_atomic(task_dir / RECORD_DIR / RECORD_FILE, {"run": run})
        yield
    except BaseException:
        if created:
            _remove_if_bare(task_dir)  # still under the lock: nobody else committed meanwhile
        raise
    finally:
        if fd >= 0:
            os.close(fd)  # releases the lock


def _lock(task_dir: Path) -> int:
    """A file descriptor holding the exclusive ``flock`` of the task's commits. A lock taken
    on a folder or file that a failed first commit removed meanwhile is taken again on the
    one the path names now."""
    while True:
        try:
            fd, path = _flock(task_dir)
        except FileNotFoundError:  # removed between its making and its opening
            continue
        try:
            named, held = os.stat(path, follow_symlinks=False), os.fstat(fd)
            if (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino):
                return fd
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _flock(task_dir: Path) -> tuple[int, Path]:
    """Lock the task folder itself where the filesystem allows it (local disks: nothing to
    create, which keeps a short task's commit cheap), else ``.meshq/lock`` (NFS emulates
    ``flock`` with write locks, which need a file opened for writing). Every process sharing
    a folder sees the same filesystem, so all of them lock the same way; returns the
    descriptor and the path it locks."""
    try:
        fd = os.open(task_dir, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        task_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(task_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd, task_dir
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EBADF, errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    (task_dir / RECORD_DIR).mkdir(exist_ok=True)
    path = task_dir / RECORD_DIR / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd, path


def _remove_if_bare(task_dir: Path) -> None:
    """Remove a task folder that holds nothing but this module's record and lock: no commit
    made it its own (one waiting for the lock finds it gone and makes it again)."""
    record_dir = task_dir / RECORD_DIR
    with suppress(OSError):
        if set(os.listdir(task_dir)) - {RECORD_DIR}:
            return
        if record_dir.is_dir():
            if set(os.listdir(record_dir)) - {RECORD_FILE, LOCK_FILE}:
                return
            for name in (RECORD_FILE, LOCK_FILE):
                (record_dir / name).unlink(missing_ok=True)
            record_dir.rmdir()
        task_dir.rmdir()


def staging_dir(task_dir: str | os.PathLike[str]) -> Path:
    """A new directory of this run's own under ``<task_dir>/.meshq/staging/``, for outputs
    prepared before their fenced commit (renamed into place from there)."""
    path = Path(task_dir) / RECORD_DIR / STAGING_DIR / secrets.token_hex(8)
    path.mkdir(parents=True)
    return path
