"""The run fence of a task directory: a late run never overwrites a later run's outputs.

Two workers on one host, or on shared storage, share ``RESULTS_DIR``, so two runs of a
task (a paused worker's late run and the run that took the task over) write into the
same ``RESULTS_DIR/<task_id>/``. Every commit of a run's final outputs
(``responses.json`` + ``manifest.json``, ``final_<kind>/`` and its archive, the
``jsonl_export`` file) happens inside ``fenced(task_dir, run)``:

- an exclusive ``flock`` on the task directory (``<task_dir>/.meshq/lock`` where the
  filesystem cannot lock a directory: NFS) — commits of one task take turns,
- under it, the task's highest run so far is read from ``<task_dir>/.meshq/run``: a run
  earlier than that raises ``LeaseLost`` and writes nothing; otherwise a run after the
  first is recorded (atomically) and it commits.

A run paused before the lock is refused when it wakes; a run paused inside it only
delays the later run, which then overwrites what it wrote. What a run prepares before
its commit goes to a directory of its own (``staging_dir``), never to a path another run
uses. ``checkpoints/`` is shared between runs on purpose (a later run resumes from
them) and is not fenced. ``run=None`` (an executor run without a worker: tests,
scripts) commits without the fence. The manifest leaves ``.meshq/`` out.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from app.errors import LeaseLost

FENCE_DIR = ".meshq"  # the task directory's bookkeeping: not an output, not in the manifest
RUN_FILE = "run"
LOCK_FILE = "lock"
STAGING_DIR = "staging"


def recorded_run(task_dir: str | os.PathLike[str]) -> int | None:
    """The highest run that committed outputs into ``task_dir`` (None: none recorded)."""
    try:
        run = json.loads((Path(task_dir) / FENCE_DIR / RUN_FILE).read_text(encoding="utf-8")).get("run")
    except (OSError, ValueError, AttributeError):
        return None
    return run if isinstance(run, int) and not isinstance(run, bool) else None


@contextmanager
def fenced(task_dir: str | os.PathLike[str], run: int | None) -> Iterator[None]:
    """Commit a run's outputs into ``task_dir`` under the fence (see the module doc);
    raises ``LeaseLost`` when a later run committed there already."""
    if run is None:
        yield
        return
    fd = _lock(Path(task_dir))
    try:
        stored = recorded_run(task_dir)
        if stored is not None and run < stored:
            raise LeaseLost(Path(task_dir).name, f"of run {stored} (this is run {run}; {task_dir} holds "
                                                 "the later run's outputs)")
        # Run 1 records nothing: no run is earlier than it, so no record means "no run
        # after the first committed" — and a task's common case costs no file write.
        if run > (stored or 1):
            directory = Path(task_dir) / FENCE_DIR
            directory.mkdir(exist_ok=True)
            temp = directory / f".{RUN_FILE}.{secrets.token_hex(6)}"
            try:
                temp.write_text(json.dumps({"run": run}), encoding="utf-8")
                os.replace(temp, directory / RUN_FILE)
            except BaseException:
                temp.unlink(missing_ok=True)
                raise
        yield
    finally:
        os.close(fd)  # releases the lock


def _lock(task_dir: Path) -> int:
    """A file descriptor holding an exclusive ``flock`` for the task's commits: on the task
    directory itself where the filesystem allows it (local disks; nothing to create, which
    keeps a short task's commit cheap), else on ``.meshq/lock`` (NFS emulates ``flock``
    with write locks, which need a file opened for writing). Every process sharing a
    directory sees the same filesystem, so all of them lock the same way."""
    try:
        fd = os.open(task_dir, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:  # a commit into a task directory not made yet
        task_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(task_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EBADF, errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    directory = task_dir / FENCE_DIR
    directory.mkdir(exist_ok=True)
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd


def staging_dir(task_dir: str | os.PathLike[str]) -> Path:
    """A new directory of this run's own under ``<task_dir>/.meshq/staging/``, for outputs
    prepared before their fenced commit (renamed into place from there)."""
    path = Path(task_dir) / FENCE_DIR / STAGING_DIR / secrets.token_hex(8)
    path.mkdir(parents=True)
    return path
