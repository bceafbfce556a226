"""Where a spec may make a worker read files, and when a model may run its own code.

Whoever can submit a spec must not be able to read the worker's files: a local
dataset (``data.path``, ``data.jsonl.path``, a local ``data.url``) or checkpoint
(``checkpoint.load.path``) is read only when, after resolving symbolic links, it lies
under the worker's ``RESULTS_DIR`` or a directory of ``MESHQ_DATA_DIRS`` (a shared-
storage mount, a datasets folder). Anything else is a ``SpecError`` that names the
field and the allowed roots, never the file's contents.

``trust_remote_code`` runs Python shipped with a model. It is refused for weights that
came from a download, an upload or the worker's own results (an artifact anyone who can
submit could have put there), and otherwise allowed only where the worker's operator
set ``MESHQ_ALLOW_REMOTE_CODE=1``.
"""

from __future__ import annotations

import os
from pathlib import Path

from app.errors import SpecError
from app.settings import Settings, get_settings

DATA_DIRS_VARIABLE = "MESHQ_DATA_DIRS"
REMOTE_CODE_VARIABLE = "MESHQ_ALLOW_REMOTE_CODE"


def allowed_roots(settings: Settings | None = None) -> list[Path]:
    """``RESULTS_DIR`` and the ``MESHQ_DATA_DIRS`` directories, symbolic links resolved."""
    settings = settings or get_settings()
    roots = [settings.results_dir, *settings.data_dirs]
    return [Path(os.path.expanduser(root)).resolve() for root in roots]


def under_allowed_roots(path: str | os.PathLike[str], settings: Settings | None = None) -> bool:
    """Does ``path`` (resolved, symbolic links followed) lie under an allowed root?"""
    resolved = Path(os.path.expanduser(os.fspath(path))).resolve()
    return any(resolved == root or resolved.is_relative_to(root) for root in allowed_roots(settings))


def allowed_path(path: str | os.PathLike[str], field: str, settings: Settings | None = None) -> Path:
    """``path`` resolved (symbolic links followed) if it lies under an allowed root, else
    a ``SpecError`` naming ``field`` and the roots (not whether the file exists)."""
    if under_allowed_roots(path, settings):
        return Path(os.path.expanduser(os.fspath(path))).resolve()
    roots = allowed_roots(settings)
    raise SpecError(field, f"{os.fspath(path)!r} is outside the directories this worker reads data from "
                           f"(RESULTS_DIR and {DATA_DIRS_VARIABLE}: {', '.join(map(str, roots))})")


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
