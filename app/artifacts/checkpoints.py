"""Checkpoints a task starts from (``checkpoint.load``), fetched once per worker (DESIGN §7).

``fetch_checkpoint``: a local directory is used in place; a local or downloaded
archive is verified, unpacked safely into the worker's cache
(``RESULTS_DIR/.cache/checkpoints/<sha256>/``) and reused from there, so one worker
never downloads or unpacks the same archive twice. ``download_file`` fetches a data
file the same way (streamed, retried, checksummed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from urllib.parse import quote, urlsplit

import requests

from app.artifacts import download
from app.artifacts.archive import content_root, detect_format, safe_extract
from app.artifacts.auth import auth_headers, token_for
from app.artifacts.delivery import RESULTS_PATH
from app.artifacts.manifest import sha256_file, write_json_atomic
from app.artifacts.retry import Retryable, RetryPolicy, is_retryable_status, with_retries
from app.core.data_roots import allowed_path, check_tree
from app.core.errors import ArtifactError, SpecError
from app.core.redaction import redact
from app.core.settings import get_settings
from app.core.task_spec import CheckpointLoad

log = logging.getLogger(__name__)

LOCAL_FIELD = "spec.checkpoint.load.path"
CACHE_DIRNAME = ".cache"
MODEL_MARKERS = ("config.json", "adapter_config.json")


# -- checkpoint load ----------------------------------------------------------------
def checkpoint_url(load: CheckpointLoad, policy: RetryPolicy | None = None) -> str:
    """``load.url``, or ``ORCHESTRATOR_BASE_URL/api/v1/results/{task_id}/files/{filename}``;
    without a ``filename``, the task's one ``final_lora``/``final_model`` archive on the
    orchestrator (``task_archive``)."""
    if load.url:
        if not load.url.startswith(("http://", "https://")):
            raise SpecError("spec.checkpoint.load.url", f"{redact(load.url)!r} is not an http(s) URL")
        return load.url
    base = get_settings().orchestrator_base_url
    if not base:
        raise SpecError("spec.checkpoint.load.url",
                        "required when ORCHESTRATOR_BASE_URL is not set (task_id + filename need it)")
    files_url = f"{base}{RESULTS_PATH}/{quote(str(load.task_id), safe='')}/files"
    filename = load.filename or task_archive(files_url, str(load.task_id), policy)
    return f"{files_url}/{quote(filename, safe='')}"


ARCHIVE_PREFIXES = ("final_lora.", "final_model.")
ARCHIVE_SUFFIXES = (".zip", ".tar.gz")


def task_archive(files_url: str, task_id: str, policy: RetryPolicy | None = None) -> str:
    """The name of ``task_id``'s model archive among its files on the orchestrator
    (``GET .../files``): its one ``final_lora.*`` or ``final_model.*`` archive."""

    def attempt(_: int) -> list[str]:
        try:
            reply = requests.get(files_url, headers=auth_headers(token_for(files_url)), timeout=(10, 60))
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise Retryable(type(exc).__name__) from None
        with reply:
            if is_retryable_status(reply.status_code):
                raise Retryable(f"HTTP {reply.status_code}", reply.status_code)
            if not reply.ok:
                raise ArtifactError(f"listing the files of task {task_id} at {redact(files_url)} failed: "
                                    f"HTTP {reply.status_code}", url=redact(files_url), status=reply.status_code)
            try:
                return [str(f["filename"]) for f in reply.json()["files"]]
            except (ValueError, KeyError, TypeError):
                raise ArtifactError(f"{redact(files_url)}: not a file listing", url=redact(files_url)) from None

    names = with_retries("listing the files of", files_url, attempt, policy)
    archives = sorted(n for n in names if n.startswith(ARCHIVE_PREFIXES) and n.endswith(ARCHIVE_SUFFIXES))
    if len(archives) != 1:
        found = ", ".join(names) or "none"
        raise ArtifactError(f"task {task_id} has {'no' if not archives else 'more than one'} final_lora/final_model "
                            f"archive on the orchestrator (files: {found}); give its filename "
                            "(checkpoint.load.filename, model.adapters[].filename)", url=redact(files_url))
    return archives[0]


def _model_dir(directory: Path) -> Path:
    if any((directory / marker).exists() for marker in MODEL_MARKERS):
        return directory
    return content_root(directory)


class CheckpointCache:
    """Unpacked archives by sha256 (``<root>/<sha256>/``) plus a URL → sha256 index."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def unpacked(self, sha256: str) -> Path | None:
        path = self.root / sha256.lower()
        return _model_dir(path) if path.is_dir() else None

    def sha_for_url(self, url: str) -> str | None:
        index = self._url_entry(url)
        try:
            data = json.loads(index.read_text())
        except (OSError, ValueError):
            return None
        sha = data.get("sha256") if isinstance(data, dict) and data.get("url") == url else None
        return str(sha) if sha else None

    def remember_url(self, url: str, sha256: str) -> None:
        entry = self._url_entry(url)
        entry.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(entry, {"url": url, "sha256": sha256})

    def _url_entry(self, url: str) -> Path:
        return self.root / "urls" / (hashlib.sha256(url.encode()).hexdigest() + ".json")

    def add(self, archive: Path, sha256: str, fmt: str | None) -> Path:
        """Unpack ``archive`` into ``<root>/<sha256>/`` (atomic; a concurrent winner is kept)."""
        target = self.root / sha256.lower()
        if not target.is_dir():
            try:
                safe_extract(archive, target, fmt)
            except OSError:
                if not target.is_dir():  # not a lost race with another process: a real error
                    raise
        return _model_dir(target)


def default_cache_dir(dest_dir: Path) -> Path:
    """``RESULTS_DIR/.cache/checkpoints`` for a task directory ``RESULTS_DIR/<task_id>``."""
    return dest_dir.resolve().parent / CACHE_DIRNAME / "checkpoints"


def fetch_checkpoint(load: CheckpointLoad, dest_dir: Path, *, cache_dir: Path | None = None,
                     policy: RetryPolicy | None = None) -> Path:
    """Make ``checkpoint.load`` available locally; return the directory holding the model/adapter.

    ``dest_dir`` is the task directory asking for it; the cache lives beside it in
    ``RESULTS_DIR/.cache/checkpoints`` unless ``cache_dir`` says otherwise. A
    directory given as ``local`` path is used in place (or its single top-level
    folder); an archive (local or http) is verified against ``load.sha256`` when
    given, unpacked safely once per sha256, and the unpacked folder returned. Every file in
    that folder must resolve under the data roots (``app.core.data_roots.check_tree``):
    transformers and peft then open them by name.
    """
    cache = CheckpointCache(Path(cache_dir) if cache_dir is not None else default_cache_dir(Path(dest_dir)))
    if load.type == "local":
        return check_tree(_fetch_local(load, cache), LOCAL_FIELD)
    return check_tree(_fetch_http(load, cache, policy), "spec.checkpoint.load")


def _fetch_local(load: CheckpointLoad, cache: CheckpointCache) -> Path:
    path = allowed_path(str(load.path), LOCAL_FIELD)  # RESULTS_DIR or MESHQ_DATA_DIRS
    if path.is_dir():
        return _model_dir(path.resolve())
    if not path.is_file():
        raise SpecError(LOCAL_FIELD, f"{path} does not exist")
    detect_format(path, load.archive_format)  # fail early on something that is not an archive
    sha = sha256_file(path)
    if load.sha256 and sha != load.sha256.lower():
        raise ArtifactError(f"{path}: sha256 mismatch: expected {load.sha256.lower()}, got {sha}", path=str(path))
    cached = cache.unpacked(sha)
    if cached is not None:
        log.info("checkpoint %s: using the unpacked copy in the cache (%s)", path, sha[:12])
        return cached
    return cache.add(path, sha, load.archive_format)


def _fetch_http(load: CheckpointLoad, cache: CheckpointCache, policy: RetryPolicy | None) -> Path:
    url = checkpoint_url(load, policy)
    known_sha = (load.sha256 or "").lower() or cache.sha_for_url(url)
    if known_sha:
        cached = cache.unpacked(known_sha)
        if cached is not None:
            log.info("checkpoint %s: already in the cache (%s), not downloading", redact(url), known_sha[:12])
            return cached
    downloads = cache.root / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    name = Path(urlsplit(url).path).name or "checkpoint"
    scratch = Path(tempfile.mkdtemp(prefix="dl-", dir=downloads))
    try:
        info = download.download_file(url, scratch / name, expected_sha256=load.sha256 or None, token=token_for(url),
                             policy=policy)
        log.info("checkpoint %s: downloaded %d bytes (sha256 %s)", redact(url), info.bytes, info.sha256[:12])
        fmt = load.archive_format or detect_format(info.path)
        directory = cache.add(info.path, info.sha256, fmt)
        cache.remember_url(url, info.sha256)
        return directory
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def download_file(url: str, dest_dir: str | Path, *, expected_sha256: str | None = None,
                  policy: RetryPolicy | None = None) -> Path:
    """Download ``url`` (a data file, say) into ``dest_dir`` under its own name; return the file.

    Streamed, retried, checked against ``expected_sha256`` or the server's checksum
    header; the orchestrator token is sent only to the orchestrator.
    """
    if not url.startswith(("http://", "https://")):
        raise ArtifactError(f"{redact(url)!r} is not an http(s) URL", url=redact(url))
    name = Path(urlsplit(url).path).name or "download"
    info = download.download_file(url, Path(dest_dir) / name, expected_sha256=expected_sha256,
                                  token=token_for(url), policy=policy)
    return info.path


def checkpoint_kind(directory: Path) -> str:
    """``"lora"`` for a peft adapter directory, ``"model"`` for a full model directory."""
    if (directory / "adapter_config.json").is_file():
        return "lora"
    if (directory / "config.json").is_file():
        return "model"
    raise ArtifactError(f"{directory}: neither a model (config.json) nor a LoRA adapter "
                        "(adapter_config.json)", path=str(directory))

