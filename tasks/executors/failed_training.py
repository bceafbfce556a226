"""What a training run that failed for good leaves behind: not its checkpoints.

``checkpoints/`` exists so that a run whose worker died resumes where it stopped. Two
failures make them worse than useless, and they are removed as the task fails:

* training diverged (``TrainingDiverged``): the newest checkpoints hold the inf/NaN
  weights, and a rerun of the task would resume from them;
* the disk filled up (``ENOSPC``, however the library that wrote reports it, or a
  failure with under 1 MiB left): the checkpoints hold the space every other task on
  the worker needs.

The removal is fenced (``app.artifacts.run_record``): a late run never removes what a
later run of the task wrote. Other failures keep their checkpoints.
"""

from __future__ import annotations

import errno
import gc
import logging
import shutil
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from app.artifacts.run_record import fenced
from app.core.errors import ExecutorError, LeaseLost
from tasks.executors.divergence import TrainingDiverged

log = logging.getLogger(__name__)

# How the libraries that write checkpoints word ENOSPC when they do not raise an OSError
# (safetensors' Rust writer).
_DISK_FULL_TEXTS = ("no space left on device", "storagefull", "os error 28")
# torch's zip writer loses the errno ("unexpected pos 6522112 vs 6522000"): a write that
# failed on a filesystem left with less than this is taken as a full disk.
_FULL_BELOW_BYTES = 1024 * 1024


def is_disk_full(exc: BaseException, directory: Path) -> bool:
    """Whether ``exc`` (or an exception it was raised from) says the disk is full, or the
    filesystem of ``directory`` has (next to) nothing left."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno == errno.ENOSPC:
            return True
        if any(text in str(current).lower() for text in _DISK_FULL_TEXTS):
            return True
        current = current.__cause__ or current.__context__
    try:
        return shutil.disk_usage(directory).free < _FULL_BELOW_BYTES
    except OSError:
        return False


def discard_checkpoints(checkpoints: Path, run: int | None) -> None:
    """Remove ``checkpoints/`` of a task directory, unless a later run of the task wrote there."""
    try:
        with fenced(checkpoints.parent, run):
            shutil.rmtree(checkpoints, ignore_errors=True)
    except LeaseLost:
        pass  # the later run's checkpoints are its own


@contextmanager
def checkpoints_discarded_on_failure(task_type: str, checkpoints: Path, run: int | None) -> Iterator[None]:
    """Run a training loop; when it diverges or fills the disk, remove ``checkpoints`` and fail
    (a full disk as an ``ExecutorError`` naming the directory)."""
    try:
        yield
    except TrainingDiverged:
        discard_checkpoints(checkpoints, run)
        raise
    except Exception as exc:
        if not is_disk_full(exc, checkpoints.parent):
            raise
        what = f"{type(exc).__name__}: {exc}"
        _release_files_of(exc)
        del exc
        discard_checkpoints(checkpoints, run)
        log.warning("%s training: the disk under %s is full; its checkpoints were removed", task_type,
                    checkpoints.parent)
        raise ExecutorError(f"{task_type} training could not write to {checkpoints.parent}: No space left on "
                            f"device ({what}); the run's checkpoints were removed",
                            path=str(checkpoints.parent)) from None


def _release_files_of(exc: BaseException) -> None:
    """Free what the failed write's frames hold: torch's checkpoint writer keeps its half-written
    file open from the traceback, and a removed file that is still open keeps its space."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        current = current.__cause__ or current.__context__
    gc.collect()
