"""Where a spec may make a worker read files, and when a model may run its own code.

Whoever can submit a spec must not be able to read the worker's files: a local
dataset (``data.path``, ``data.jsonl.path``, a local ``data.url``) or checkpoint
(``checkpoint.load.path``) is read only when, after resolving symbolic links, it lies
under the worker's ``RESULTS_DIR`` or a directory of ``MESHQ_DATA_DIRS`` (a shared-
storage mount, a datasets folder). Anything else is a ``SpecError`` that names the
field and the allowed roots, never the file's contents.

The rule holds for every file read on a spec's behalf, not only for the path the spec
names: ``open_data_file`` checks the file it actually opened (through the descriptor,
so a link swapped in after the check changes nothing), and ``check_tree`` checks every
file of a directory (a checkpoint) before a library reads it by name.

``trust_remote_code`` runs Python shipped with a model. It is refused for weights that
came from a download, an upload or the worker's own results (an artifact anyone who can
submit could have put there), and otherwise allowed only where the worker's operator
set ``MESHQ_ALLOW_REMOTE_CODE=1``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from app.core.errors import SpecError
from app.core.settings import Settings, get_settings

DATA_DIRS_VARIABLE = "MESHQ_DATA_DIRS"
REMOTE_CODE_VARIABLE = "MESHQ_ALLOW_REMOTE_CODE"


def allowed_roots(settings: Settings | None = None) -> list[Path]:
    """``RESULTS_DIR`` and the ``MESHQ_DATA_DIRS`` directories, symbolic links resolved."""
    settings = settings or get_settings()
    roots = [settings.results_dir, *settings.data_dirs]
    return [Path(os.path.expanduser(root)).resolve() for root in roots]


def under_allowed_roots(path: str | os.PathLike[str], settings: Settings | None = None) -> bool:
    """Does ``path`` (resolved, symbolic links followed) lie under an allowed root?"""
    return _inside(Path(os.path.expanduser(os.fspath(path))).resolve(), allowed_roots(settings))


def allowed_path(path: str | os.PathLike[str], field: str, settings: Settings | None = None) -> Path:
    """``path`` resolved (symbolic links followed) if it lies under an allowed root, else
    a ``SpecError`` naming ``field`` and the roots (not whether the file exists)."""
    resolved = Path(os.path.expanduser(os.fspath(path))).resolve()
    roots = allowed_roots(settings)
    if _inside(resolved, roots):
        return resolved
    raise _outside(path, field, roots)


def _inside(resolved: Path, roots: list[Path]) -> bool:
    return any(resolved == root or resolved.is_relative_to(root) for root in roots)


def _outside(path: str | os.PathLike[str], field: str, roots: list[Path]) -> SpecError:
    """The refusal names the spec's path, never where a link leads (nor whether it exists)."""
    return SpecError(field, f"{os.fspath(path)!r} is outside {_roots_named(roots)}")


def _roots_named(roots: list[Path]) -> str:
    return (f"the directories this worker reads data from "
            f"(RESULTS_DIR and {DATA_DIRS_VARIABLE}: {', '.join(map(str, roots))})")


def open_data_file(path: str | os.PathLike[str], field: str, settings: Settings | None = None) -> BinaryIO:
    """``path`` opened for reading, if the file actually opened is a regular file under an
    allowed root. The check is made on the open descriptor (``/proc/self/fd``), so a link
    that appears between the resolution and the ``open`` is caught too; a FIFO or device
    is refused without blocking on it."""
    roots = allowed_roots(settings)
    resolved = allowed_path(path, field, settings)
    try:
        fd = os.open(resolved, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SpecError(field, f"file {os.fspath(path)!r} does not exist") from None
    try:
        if not _inside(_opened_path(fd, resolved), roots):
            raise _outside(path, field, roots)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SpecError(field, f"{os.fspath(path)!r} is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _opened_path(fd: int, resolved: Path) -> Path:
    """The file behind ``fd`` as the kernel names it (Linux); elsewhere ``resolved`` again."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return resolved.resolve()


def check_tree(directory: str | os.PathLike[str], field: str, settings: Settings | None = None) -> Path:
    """``directory`` resolved, if every file and link in it (at any depth, through linked
    directories too) resolves under an allowed root: a library (transformers, peft,
    safetensors) then opens its files by name."""
    roots = allowed_roots(settings)
    top = allowed_path(directory, field, settings)
    pending, seen = [top], {top}
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                resolved = Path(entry.path).resolve()
                if not _inside(resolved, roots):
                    raise SpecError(field, f"{os.fspath(directory)!r}: {os.path.relpath(entry.path, top)!r} "
                                           f"links outside {_roots_named(roots)}")
                if resolved.is_dir() and resolved not in seen:
                    seen.add(resolved)
                    pending.append(resolved)
    return top


def under_results(path: str | os.PathLike[str], settings: Settings | None = None) -> bool:
    """Does ``path`` (resolved) lie under the worker's ``RESULTS_DIR``: downloads, uploads'
    unpacked archives and earlier tasks' outputs?"""
    settings = settings or get_settings()
    root = Path(os.path.expanduser(settings.results_dir)).resolve()
    return Path(os.path.expanduser(os.fspath(path))).resolve().is_relative_to(root)


def check_remote_code(trust_remote_code: bool, *, from_artifact: bool, field: str,
                      settings: Settings | None = None) -> None:
    """Refuse ``trust_remote_code`` for weights from an artifact, and anywhere the worker
    does not allow it (``MESHQ_ALLOW_REMOTE_CODE``)."""
    if not trust_remote_code:
        return
    if from_artifact:
        raise SpecError(field, "trust_remote_code is never allowed for weights from a downloaded or uploaded "
                               "checkpoint or a task's results: their code would run on the worker")
    settings = settings or get_settings()
    if not settings.allow_remote_code:
        raise SpecError(field, f"trust_remote_code: this worker does not run a model's own code "
                               f"({REMOTE_CODE_VARIABLE} is off)")
