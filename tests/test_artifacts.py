"""Archives, safe unpacking, checkpoint fetching and uploads (real files, real HTTP servers)."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import logging
import os
import stat
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from app.artifacts.archive import make_archive, safe_extract
from app.artifacts.checkpoints import CheckpointCache, checkpoint_kind, fetch_checkpoint
from app.artifacts.download import ChunkHasher, download_file
from app.artifacts.manifest import sha256_file
from app.artifacts.retry import RetryPolicy, with_retries
from app.artifacts.upload import post_json, upload_file
from app.core.errors import ArtifactError, ConfigError, SpecError
from app.core.settings import reset_settings
from app.core.task_spec import CheckpointLoad
from tests.conftest import http_server

FAST = RetryPolicy(retries=2, backoff_s=0.05)


def make_model_dir(root: Path, name: str = "final_lora", big_bytes: int = 0) -> Path:
    model = root / name
    (model / "sub").mkdir(parents=True)
    (model / "adapter_config.json").write_text('{"r": 8}')
    (model / "adapter_model.safetensors").write_bytes(os.urandom(2048))
    (model / "sub" / "notes.txt").write_text("hello " * 100)
    if big_bytes:
        (model / "big.bin").write_bytes(os.urandom(big_bytes))
    return model


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- archives ---------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["zip", "tar.gz"])
def test_archive_round_trip_and_checksum_while_writing(tmp_path: Path, fmt: str) -> None:
    model = make_model_dir(tmp_path / "task")
    info = make_archive(model, fmt)
    assert info.path == tmp_path / "task" / f"final_lora.{fmt}"
    assert info.sha256 == sha256_file(info.path) and info.bytes == info.path.stat().st_size
    assert not list((tmp_path / "task").glob(".*part"))
    out = safe_extract(info.path, tmp_path / "out")
    assert tree(out / "final_lora") == tree(model)


def test_zip_stores_weights_and_deflates_text(tmp_path: Path) -> None:
    info = make_archive(make_model_dir(tmp_path, big_bytes=9 * 1024 * 1024))
    with zipfile.ZipFile(info.path) as zf:
        methods = {i.filename: i.compress_type for i in zf.infolist()}
    assert methods["final_lora/adapter_model.safetensors"] == zipfile.ZIP_STORED
    assert methods["final_lora/big.bin"] == zipfile.ZIP_STORED
    assert methods["final_lora/sub/notes.txt"] == zipfile.ZIP_DEFLATED


def test_archive_of_missing_directory_names_it(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="nope: not a directory"):
        make_archive(tmp_path / "nope")


# -- unsafe archives ---------------------------------------------------------------------
def _zip(path: Path, members: list[tuple[str, bytes, int | None]]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data, mode in members:
            info = zipfile.ZipInfo(name)
            if mode is not None:
                info.external_attr = mode << 16
            zf.writestr(info, data)
    return path


def _tar(path: Path, members: list[tarfile.TarInfo], data: dict[str, bytes] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for member in members:
            payload = (data or {}).get(member.name)
            if payload is not None:
                member.size = len(payload)
                tf.addfile(member, io.BytesIO(payload))
            else:
                tf.addfile(member)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o644
    return info


UNSAFE = {  # case: (archive builder, what the error must say)
    "zip-slip": (lambda d: _zip(d / "a.zip", [("ok.txt", b"x", None), ("../evil.txt", b"pwned", None)]),
                 "member '../evil.txt' contains '..'"),
    "zip-absolute": (lambda d: _zip(d / "a.zip", [("/tmp/meshq-evil.txt", b"pwned", None)]),
                     "has an absolute path"),
    "zip-symlink-escape": (lambda d: _zip(d / "a.zip", [("link", b"../../outside", stat.S_IFLNK | 0o777)]),
                           "link 'link' points outside"),
    # Textually fine ("a/b/../../outside" is "outside"), but a/b is itself a link to a/:
    # the second link really lands in a/ and points two levels up, out of the target.
    "zip-nested-symlink-escape": (lambda d: _zip(d / "a.zip", [
        ("a/x.txt", b"x", None), ("a/b", b"../a", stat.S_IFLNK | 0o777),
        ("a/b/t", b"../../outside", stat.S_IFLNK | 0o777)]), "link 'a/b/t' resolves outside the target"),
    "tar-dotdot": (lambda d: _tar(d / "a.tar.gz", [_member("dir/../../evil.txt")], {"dir/../../evil.txt": b"p"}),
                   "contains '..'"),
    "tar-absolute": (lambda d: _tar(d / "a.tar.gz", [_member("/tmp/meshq-evil.txt")],
                                    {"/tmp/meshq-evil.txt": b"p"}), "has an absolute path"),
    "tar-symlink-escape": (lambda d: _tar(d / "a.tar.gz", [
        _member("model/link", tarfile.SYMTYPE, "../../outside"), _member("model/link/evil.txt")],
        {"model/link/evil.txt": b"p"}), "link 'model/link' points outside"),
    "tar-symlink-absolute": (lambda d: _tar(d / "a.tar.gz", [_member("link", tarfile.SYMTYPE, "/etc")]),
                             "points to absolute path '/etc'"),
    "tar-hardlink-escape": (lambda d: _tar(d / "a.tar.gz", [_member("hard", tarfile.LNKTYPE, "../../etc/passwd")]),
                            "link 'hard' points outside"),
    "tar-device": (lambda d: _tar(d / "a.tar.gz", [_member("dev", tarfile.CHRTYPE)]), "device, fifo"),
    "tar-fifo": (lambda d: _tar(d / "a.tar.gz", [_member("fifo", tarfile.FIFOTYPE)]), "device, fifo"),
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_unsafe_archives_are_rejected_and_nothing_is_written(tmp_path: Path, case: str) -> None:
    build, reason = UNSAFE[case]
    source = tmp_path / "src"
    source.mkdir()
    archive = build(source)
    sandbox = tmp_path / "sandbox"
    (sandbox / "cache").mkdir(parents=True)
    before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    with pytest.raises(ArtifactError) as err:
        safe_extract(archive, sandbox / "cache" / "target")
    assert str(err.value).startswith(str(archive)) and reason in str(err.value)
    after = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    assert after == before  # no target, no temporary directory, nothing outside
    assert not Path("/tmp/meshq-evil.txt").exists()


def test_unsafe_archive_through_fetch_checkpoint_leaves_the_cache_clean(tmp_path: Path) -> None:
    archive, _ = UNSAFE["zip-slip"]
    (tmp_path / "src").mkdir()
    path = archive(tmp_path / "src")
    with pytest.raises(ArtifactError, match="contains '..'"):
        fetch_checkpoint(CheckpointLoad(type="local", path=str(path)), tmp_path / "results" / "t1")
    cache = tmp_path / "results" / ".cache" / "checkpoints"
    assert not cache.exists() or not any(p for p in cache.iterdir() if p.name != "downloads")
    assert not (tmp_path / "results" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()


def test_links_inside_the_archive_are_kept(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "ok.tar.gz", [
        _member("m/config.json"), _member("m/alias.json", tarfile.SYMTYPE, "config.json"),
        _member("m/hard.json", tarfile.LNKTYPE, "m/config.json")], {"m/config.json": b"{}"})
    out = safe_extract(archive, tmp_path / "out")
    assert (out / "m" / "alias.json").is_symlink() and (out / "m" / "alias.json").read_bytes() == b"{}"
    assert (out / "m" / "hard.json").read_bytes() == b"{}"


def test_corrupt_archive_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ArtifactError, match="bad.zip"):
        safe_extract(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _zeros_zip(path: Path, mib: int) -> Path:
    """A deflated zip of ``mib`` MiB of zeros: a few hundred KiB on disk (a small zip bomb)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("m/model.safetensors", "w", force_zip64=True) as out:
            for _ in range(mib):
                out.write(bytes(1024 * 1024))
    return path


def test_zip_bomb_is_refused_by_the_default_ratio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESHQ_MAX_UNPACK_BYTES", raising=False)
    bomb = _zeros_zip(tmp_path / "bomb.zip", 160)  # ~160 KiB → 160 MiB: over 100x + 64 MiB
    assert bomb.stat().st_size < 1024 * 1024
    with pytest.raises(ArtifactError, match="MESHQ_MAX_UNPACK_BYTES"):
        safe_extract(bomb, tmp_path / "cache" / "out")
    assert list((tmp_path / "cache").iterdir()) == []  # no target, no half-unpacked temp dir


def test_unpack_budget_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = _zeros_zip(tmp_path / "small.zip", 3)
    monkeypatch.setenv("MESHQ_MAX_UNPACK_BYTES", str(2 * 1024 * 1024))
    with pytest.raises(ArtifactError, match="m/model.safetensors"):
        safe_extract(archive, tmp_path / "out")
    tarball = _tar(tmp_path / "small.tar.gz", [_member("m/w.bin")], {"m/w.bin": bytes(3 * 1024 * 1024)})
    with pytest.raises(ArtifactError, match="exceed 2097152 bytes"):
        safe_extract(tarball, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv("MESHQ_MAX_UNPACK_BYTES", str(4 * 1024 * 1024))
    assert (safe_extract(archive, tmp_path / "out") / "m" / "model.safetensors").stat().st_size == 3 * 1024 * 1024
    monkeypatch.setenv("MESHQ_MAX_UNPACK_BYTES", "lots")
    with pytest.raises(ConfigError, match="MESHQ_MAX_UNPACK_BYTES"):
        safe_extract(tarball, tmp_path / "out2")


def test_unpack_budget_counts_members_links_and_refuses_sparse(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHQ_MAX_UNPACK_BYTES", str(3 * 1024 * 1024))
    weights = {"m/w.bin": bytes(2 * 1024 * 1024)}
    assert safe_extract(_tar(tmp_path / "one.tar.gz", [_member("m/w.bin")], weights), tmp_path / "ok").is_dir()
    # A hard link costs its target's size: tarfile copies the data where it cannot link.
    linked = _tar(tmp_path / "linked.tar.gz",
                  [_member("m/w.bin"), _member("m/again.bin", tarfile.LNKTYPE, "m/w.bin")], weights)
    with pytest.raises(ArtifactError, match="m/again.bin"):
        safe_extract(linked, tmp_path / "out")
    # Every member costs something, empty or not: thousands of empty files are refused.
    empties = _tar(tmp_path / "empties.tar.gz", [_member(f"m/e{i}") for i in range(1000)],
                   {f"m/e{i}": b"" for i in range(1000)})
    with pytest.raises(ArtifactError, match="exceed"):
        safe_extract(empties, tmp_path / "out")
    sparse = _member("m/s.bin", tarfile.GNUTYPE_SPARSE)
    with pytest.raises(ArtifactError, match="is a sparse file"):
        safe_extract(_tar(tmp_path / "sparse.tar.gz", [sparse], {"m/s.bin": b"x"}), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_chunk_hasher_reports_a_failing_digest_instead_of_hanging() -> None:
    class Broken:
        def update(self, data: bytes) -> None:
            raise ValueError("digest broke")

    outcome: list[BaseException] = []

    def feed() -> None:
        try:
            with ChunkHasher(Broken(), depth=1) as hasher:
                for _ in range(20):
                    hasher.update(b"chunk")
        except ValueError as exc:
            outcome.append(exc)

    runner = threading.Thread(target=feed, daemon=True)
    runner.start()
    runner.join(10)
    assert not runner.is_alive(), "the download loop blocked on a dead hashing thread"
    assert [str(e) for e in outcome] == ["digest broke"]


# -- checkpoint fetch (local) ----------------------------------------------------------------
def test_local_directory_is_used_in_place(tmp_path: Path) -> None:
    model = make_model_dir(tmp_path)
    got = fetch_checkpoint(CheckpointLoad(type="local", path=str(model)), tmp_path / "results" / "t1")
    assert got == model.resolve() and checkpoint_kind(got) == "lora"


def test_local_archive_is_unpacked_once_into_the_cache(tmp_path: Path) -> None:
    info = make_archive(make_model_dir(tmp_path / "stage1"), "tar.gz")
    load = CheckpointLoad(type="local", path=str(info.path), sha256=info.sha256)
    first = fetch_checkpoint(load, tmp_path / "results" / "t1")
    assert first == tmp_path / "results" / ".cache" / "checkpoints" / info.sha256 / "final_lora"
    marker = first / "adapter_config.json"
    mtime = marker.stat().st_mtime_ns
    second = fetch_checkpoint(load, tmp_path / "results" / "t2")
    assert second == first and marker.stat().st_mtime_ns == mtime
    wrong = CheckpointLoad(type="local", path=str(info.path), sha256="0" * 64)
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        fetch_checkpoint(wrong, tmp_path / "results" / "t3")


def test_local_path_that_does_not_exist_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"spec\.checkpoint\.load\.path: .*missing does not exist"):
        fetch_checkpoint(CheckpointLoad(type="local", path=str(tmp_path / "missing")), tmp_path / "t")


# -- retries (pure) ------------------------------------------------------------------------
def test_backoff_doubles_and_is_capped() -> None:
    policy = RetryPolicy(retries=8, backoff_s=0.5, max_backoff_s=10)
    assert [policy.delay_s(i) for i in range(1, 7)] == [0.5, 1, 2, 4, 8, 10]
    assert RetryPolicy(retries=3, backoff_s=1).window_s() == 7


def test_retries_log_info_and_final_failure_names_url(caplog: pytest.LogCaptureFixture) -> None:
    from app.artifacts.retry import Retryable

    slept: list[float] = []

    def attempt(n: int) -> None:
        raise Retryable("HTTP 503", 503)

    with caplog.at_level(logging.INFO, logger="app.artifacts.retry"):
        with pytest.raises(ArtifactError, match=r"upload to http://h/x failed after 3 attempt\(s\) "
                                                r"\(last status 503\): HTTP 503") as err:
            with_retries("upload to", "http://user:secret@h/x", attempt, RetryPolicy(2, 1.0), sleep=slept.append)
    assert slept == [1.0, 2.0] and err.value.status == 503
    assert [r.levelno for r in caplog.records] == [logging.INFO, logging.INFO]
    assert "secret" not in caplog.text and "retry 1/2 in 1.0s" in caplog.text


# -- HTTP against a real server: the orchestrator --------------------------------------------
@pytest.fixture
def orchestrator(server_factory, monkeypatch: pytest.MonkeyPatch) -> Iterator:
    server = server_factory(token="s3cret-token")
    monkeypatch.setenv("ORCHESTRATOR_BASE_URL", server.base_url)
    monkeypatch.setenv("ORCHESTRATOR_TOKEN", "s3cret-token")
    reset_settings()
    yield server
    reset_settings()


def test_upload_then_fetch_checkpoint_by_task_and_filename(orchestrator, tmp_path: Path) -> None:
    info = make_archive(make_model_dir(tmp_path / "stage1"))
    reply = upload_file(f"{orchestrator.base_url}/api/v1/results/t-up/files", info.path, sha256=info.sha256,
                        token="s3cret-token", policy=FAST)
    assert reply["sha256"] == info.sha256 and reply["bytes"] == info.bytes
    assert reply["url"] == f"{orchestrator.base_url}/api/v1/results/t-up/files/final_lora.zip"
    downloaded = requests.get(reply["url"], headers=orchestrator.headers(), timeout=10).content
    assert hashlib.sha256(downloaded).hexdigest() == info.sha256

    results = tmp_path / "results"
    load = CheckpointLoad(type="http", task_id="t-up", filename="final_lora.zip")
    got = fetch_checkpoint(load, results / "t2", policy=FAST)
    assert got == results / ".cache" / "checkpoints" / info.sha256 / "final_lora"
    assert tree(got) == tree(tmp_path / "stage1" / "final_lora")
    # Same URL again, server gone: served from the cache (URL → sha256 index), no download.
    orchestrator.stop()
    assert fetch_checkpoint(load, results / "t3", policy=FAST) == got
    assert fetch_checkpoint(CheckpointLoad(type="http", url=reply["url"], sha256=info.sha256),
                            results / "t4", policy=FAST) == got
    assert not list((results / ".cache" / "checkpoints" / "downloads").iterdir())


def test_fetch_with_wrong_sha256_fails_and_caches_nothing(orchestrator, tmp_path: Path) -> None:
    info = make_archive(make_model_dir(tmp_path / "s1"))
    reply = upload_file(f"{orchestrator.base_url}/api/v1/results/t-sha/files", info.path, token="s3cret-token")
    load = CheckpointLoad(type="http", url=reply["url"], sha256="ab" * 32)
    with pytest.raises(ArtifactError, match="sha256 mismatch: expected abab"):
        fetch_checkpoint(load, tmp_path / "results" / "t", policy=FAST)
    cache = CheckpointCache(tmp_path / "results" / ".cache" / "checkpoints")
    assert cache.unpacked(info.sha256) is None and cache.sha_for_url(reply["url"]) is None


def test_wrong_token_fails_at_once_without_retries(orchestrator, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    info = make_archive(make_model_dir(tmp_path))
    url = f"{orchestrator.base_url}/api/v1/results/t-tok/files"
    with caplog.at_level(logging.INFO, logger="app.artifacts.retry"):
        with pytest.raises(ArtifactError, match=r"failed: HTTP 403") as err:
            upload_file(url, info.path, token="wrong", policy=RetryPolicy(retries=3, backoff_s=5))
    assert err.value.status == 403 and "retry" not in caplog.text
    assert "wrong" not in str(err.value)


def test_envelope_post_and_upload_to_a_dead_server_fail_clearly(tmp_path: Path) -> None:
    from cli.embedded_redis import free_port

    url = f"http://127.0.0.1:{free_port()}/api/v1/results"
    started = time.monotonic()
    with pytest.raises(ArtifactError, match=rf"POST {url} failed after 3 attempt\(s\): ConnectionError"):
        post_json(url, {"task_id": "t"}, policy=FAST)
    info = make_archive(make_model_dir(tmp_path))
    with pytest.raises(ArtifactError, match=rf"upload of final_lora.zip to {url}/t/files failed after 3"):
        upload_file(f"{url}/t/files", info.path, policy=FAST)
    assert time.monotonic() - started < 30
    assert info.path.is_file()  # the local archive stays


# -- downloads: resume with Range after a broken connection (a real, flaky HTTP server) -------
class FlakyHandler(http.server.BaseHTTPRequestHandler):
    """Serves one file; the first full GET is cut after half the body; honours ``Range``."""

    payload = b""
    requests_seen: list[str | None] = []
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        rng = self.headers.get("Range")
        type(self).requests_seen.append(rng)
        data = self.payload
        if rng:
            start = int(rng.split("=")[1].rstrip("-"))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            body = data[start:]
        else:
            self.send_response(200)
            body = data
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Checksum-Sha256", hashlib.sha256(data).hexdigest())
        self.end_headers()
        if not rng and len(type(self).requests_seen) == 1:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_broken_download_resumes_with_range(tmp_path: Path) -> None:
    FlakyHandler.payload = os.urandom(3 * 1024 * 1024 + 17)
    FlakyHandler.requests_seen = []
    with http_server(FlakyHandler) as base:
        info = download_file(f"{base}/weights.bin", tmp_path / "weights.bin", policy=FAST)
    assert info.resumed and info.bytes == len(FlakyHandler.payload)
    assert info.sha256 == hashlib.sha256(FlakyHandler.payload).hexdigest()
    assert FlakyHandler.requests_seen[0] is None and FlakyHandler.requests_seen[1].startswith("bytes=")
    assert (tmp_path / "weights.bin").read_bytes() == FlakyHandler.payload
    assert not (tmp_path / "weights.bin.part").exists()


class ChangingHandler(http.server.BaseHTTPRequestHandler):
    """The file changes between the broken first GET and the resume; ``If-Range`` honoured,
    no checksum header: only If-Range can stop a spliced v1+v2 file."""

    versions = {"v1": b"", "v2": b""}
    current = "v1"
    requests_seen: list[tuple[str | None, str | None]] = []
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        rng, if_range = self.headers.get("Range"), self.headers.get("If-Range")
        type(self).requests_seen.append((rng, if_range))
        etag = f'"{self.current}"'
        data = self.versions[self.current]
        partial = bool(rng) and (if_range is None or if_range == etag)
        start = int(rng.split("=")[1].rstrip("-")) if partial and rng else 0
        self.send_response(206 if partial else 200)
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("ETag", etag)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if len(type(self).requests_seen) == 1:  # break the first reply half-way, then change the file
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            type(self).current = "v2"
            self.close_connection = True
            return
        self.wfile.write(data[start:])

    def log_message(self, *args: object) -> None:
        pass


def test_resume_of_a_file_that_changed_downloads_it_whole(tmp_path: Path) -> None:
    ChangingHandler.versions = {"v1": os.urandom(3 * 1024 * 1024 + 17), "v2": os.urandom(3 * 1024 * 1024 + 17)}
    ChangingHandler.current, ChangingHandler.requests_seen = "v1", []
    with http_server(ChangingHandler) as base:
        info = download_file(f"{base}/weights.bin", tmp_path / "weights.bin", policy=FAST)
    first, second = ChangingHandler.requests_seen[:2]
    assert first == (None, None) and second[0] and second[0].startswith("bytes=") and second[1] == '"v1"'

    assert (tmp_path / "weights.bin").read_bytes() == ChangingHandler.versions["v2"]
    assert not info.resumed and info.sha256 == hashlib.sha256(ChangingHandler.versions["v2"]).hexdigest()


def test_token_goes_only_to_the_orchestrator(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.artifacts.auth import auth_headers, token_for
    from app.core.redaction import redact

    monkeypatch.setenv("ORCHESTRATOR_TOKEN", "tok")
    monkeypatch.delenv("ORCHESTRATOR_BASE_URL", raising=False)
    reset_settings()
    try:
        assert token_for("http://evil.example/steal") == ""  # no orchestrator configured: nobody
        monkeypatch.setenv("ORCHESTRATOR_BASE_URL", "http://127.0.0.1:8080")
        reset_settings()
        assert token_for("http://127.0.0.1:8080/api/v1/results/t/files/a.zip") == "tok"
        assert token_for("http://127.0.0.1:9999/api/v1/results") == ""
        assert token_for("https://127.0.0.1:8080/api/v1/results") == ""
        assert token_for("http://evil.example/api/v1/results") == ""
    finally:
        reset_settings()
    # A spec's own Authorization header (a third-party store) is never replaced.
    assert auth_headers("tok", {"authorization": "Basic abc"}) == {"authorization": "Basic abc"}
    assert auth_headers("tok") == {"Authorization": "Bearer tok"}
    assert redact("https://u:p@store.example/a.zip?X-Amz-Signature=secret") == "https://store.example/a.zip?…"


# -- the run fence of a task directory (app.artifacts.run_record) ---------------------------
FENCE_SCRIPT = """
import pathlib, sys, time
from app.artifacts.run_record import fenced
from app.core.errors import LeaseLost
task_dir, run, hold = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
try:
    with fenced(task_dir, run):
        print("inside", flush=True)
        while hold != "-" and not pathlib.Path(hold).exists():
            time.sleep(0.05)
        (task_dir / "out.txt").write_text(f"run {run}")
except LeaseLost as exc:
    print(f"lost: {exc}", flush=True)
    sys.exit(3)
"""


def _fence_process(task_dir: Path, run: int, hold: Path | None = None):  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    from tests.conftest import ROOT

    return subprocess.Popen([sys.executable, "-c", FENCE_SCRIPT, str(task_dir), str(run), str(hold or "-")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_the_run_fence_lets_a_later_run_win_between_processes(tmp_path: Path) -> None:
    """Two processes share a task directory (a shared RESULTS_DIR). Run 1 is inside the fence
    (paused there): run 2 waits for it, then commits over it. Run 1 coming back afterwards
    (a late run paused before the fence) gets LeaseLost and writes nothing; run 2 again (a
    retry of the same run) is let in."""
    task_dir = tmp_path / "task"
    go = tmp_path / "go"
    first = _fence_process(task_dir, 1, hold=go)
    assert first.stdout is not None and first.stdout.readline().strip() == "inside"
    second = _fence_process(task_dir, 2)
    time.sleep(1.5)
    assert second.poll() is None and not (task_dir / "out.txt").exists()  # waits on run 1's lock
    go.touch()
    assert first.wait(timeout=30) == 0
    assert second.wait(timeout=30) == 0, second.communicate()[0]
    assert (task_dir / "out.txt").read_text() == "run 2"
    late = _fence_process(task_dir, 1)
    output = late.communicate(timeout=30)[0]
    assert late.returncode == 3 and "lost:" in output and "this run stops" in output, output
    assert (task_dir / "out.txt").read_text() == "run 2"
    retry = _fence_process(task_dir, 2)
    assert retry.wait(timeout=30) == 0
    from app.artifacts.run_record import recorded_run

    assert recorded_run(task_dir) == 2


def test_a_late_runs_final_outputs_never_replace_a_later_runs(tmp_path: Path) -> None:
    """The commits that use the fence: ``finish_result`` (responses.json + manifest.json), a
    training run's final_<kind>/ + archive, and the jsonl export. After run 2 committed, run 1
    raises LeaseLost at each and the files stay run 2's; the manifest leaves the fence's
    bookkeeping out; a run without a number (tests, scripts) is not fenced."""
    from app.artifacts.run_record import RECORD_DIR, staging_dir
    from app.core.errors import LeaseLost
    from app.core.task_spec import parse_task_spec
    from app.core.task_spec.schema import JsonlExport
    from tasks.base import finish_result
    from tasks.executors.jsonl_export import write_export
    from tasks.executors.training import final_weights_fields

    out = tmp_path / "task-1"
    out.mkdir()
    spec = parse_task_spec({"taskType": "echo", "data": {"n": 1}})

    def staged_weights(text: str) -> Path:
        staged = staging_dir(out) / "final_model"
        staged.mkdir()
        (staged / "weights.bin").write_text(text)
        return staged

    fields = final_weights_fields(staged_weights("two"), "model", "zip", [], out, 2)
    assert (out / "final_model" / "weights.bin").read_text() == "two"
    assert fields["final_model_archive"] == str(out / "final_model.zip")
    with zipfile.ZipFile(out / "final_model.zip") as zf:
        assert zf.read("final_model/weights.bin") == b"two"
    export = JsonlExport.model_validate({"path": "rows.jsonl", "fields": {"text": {"from": "output"}}})
    write_export([{"output": "two"}], export, out, 2)
    finish_result("task-1", spec, out, {"by": "run two", **fields}, 0.1, run=2)
    manifest = json.loads((out / "manifest.json").read_text())
    assert not [f for f in manifest["files"] if f["path"].startswith(RECORD_DIR)]
    assert {"responses.json", "final_model.zip", "final_model/weights.bin", "rows.jsonl"} <= \
        {f["path"] for f in manifest["files"]}

    late = staged_weights("one")
    with pytest.raises(LeaseLost):
        final_weights_fields(late, "model", "zip", [], out, 1)
    assert not late.parent.exists()  # its staging removed
    with pytest.raises(LeaseLost):
        write_export([{"output": "one"}], export, out, 1)
    with pytest.raises(LeaseLost):
        finish_result("task-1", spec, out, {"by": "run one"}, 0.1, run=1)
    assert json.loads((out / "responses.json").read_text())["by"] == "run two"
    assert (out / "final_model" / "weights.bin").read_text() == "two"
    assert (out / "rows.jsonl").read_text() == '{"text": "two"}\n'
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert not list((out / RECORD_DIR / "staging").iterdir())
    finish_result("task-1", spec, out, {"by": "no run"}, 0.1)  # no run number: no fence
    assert json.loads((out / "responses.json").read_text())["by"] == "no run"


def test_the_run_fence_locks_a_file_where_a_directory_cannot_be_locked(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """NFS emulates flock with write locks, which a directory opened read-only cannot take
    (EBADF): the fence then locks ``.meshq/lock`` — still exclusive, still run-keyed."""
    import errno
    import fcntl
    import os
    import stat

    from app.artifacts.run_record import LOCK_FILE, RECORD_DIR, fenced, recorded_run
    from app.core.errors import LeaseLost

    real_flock = fcntl.flock

    def nfs_like_flock(fd: int, operation: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EBADF, "Bad file descriptor")
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", nfs_like_flock)
    task_dir = tmp_path / "task"
    with fenced(task_dir, 2):
        lock = task_dir / RECORD_DIR / LOCK_FILE
        assert lock.is_file()
        other = os.open(lock, os.O_RDWR)
        try:  # another open file description cannot take the lock while the run commits
            with pytest.raises(BlockingIOError):
                real_flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(other)
    assert recorded_run(task_dir) == 2
    with pytest.raises(LeaseLost), fenced(task_dir, 1):
        pass


def _waits_for_lock(path: Path) -> bool:
    """Whether a process is blocked on an ``flock`` of ``path`` (``/proc/locks`` marks a
    waiter with ``->``, and names the locked file as ``major:minor:inode``)."""
    inode = str(path.stat().st_ino)
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields and len(fields) >= 3 and fields[-3].rsplit(":", 1)[-1] == inode:
            return True
    return False


def test_the_server_and_a_worker_share_one_run_record(server_factory, redis_client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The server's results directory is the workers' RESULTS_DIR: one task folder takes the
    server's commits (an envelope, an upload) and a worker's fenced commits under one lock,
    and both sides read one record. A later run wins and an earlier one is refused on both
    sides, in either order; a folder whose run an earlier server recorded (``.run~``) keeps it."""
    from app.artifacts.run_record import recorded_run
    from tests.conftest import wait_for

    server = server_factory()
    task = "shared-task"
    task_dir = server.results_dir / task
    redis_client.set(f"meshq:task:{task}:runs", 3)  # runs 1..3 were issued
    results = f"{server.base_url}/api/v1/results"

    def envelope(run: int) -> requests.Response:
        return requests.post(results, json={"task_id": task, "result": {"run": run}, "worker_id": "w", "run": run},
                             timeout=60)

    def upload(run: int) -> requests.Response:
        return requests.post(f"{results}/{task}/files", files={"file": ("model.zip", f"run {run}".encode())},
                             headers={"X-Meshq-Run": str(run)}, timeout=60)

    # A worker's run 2 is inside its commit: the server's commit of run 3 waits for it.
    go = tmp_path / "go"
    worker = _fence_process(task_dir, 2, hold=go)
    assert worker.stdout is not None and worker.stdout.readline().strip() == "inside"
    with ThreadPoolExecutor(1) as pool:
        posted = pool.submit(envelope, 3)
        wait_for(lambda: _waits_for_lock(task_dir), 30, message="the server's commit to wait for the worker's lock")
        assert not (task_dir / "result.json").exists()
        go.touch()
        assert worker.wait(timeout=30) == 0
        assert posted.result(timeout=60).status_code == 201
    assert (task_dir / "out.txt").read_text() == "run 2"  # the worker committed first
    assert recorded_run(task_dir) == 3  # the server's run, as the worker reads it
    late = _fence_process(task_dir, 2)  # the worker's run 2 again: refused at its commit
    output = late.communicate(timeout=30)[0]
    assert late.returncode == 3 and "older than the stored result's run 3" in output, output
    assert (task_dir / "out.txt").read_text() == "run 2"
    assert upload(2).status_code == 409 and upload(3).status_code == 201

    # The other order: a worker records run 4; the server refuses run 3's upload and envelope.
    redis_client.set(f"meshq:task:{task}:runs", 4)
    assert _fence_process(task_dir, 4).wait(timeout=30) == 0
    refused = upload(3)
    assert refused.status_code == 409 and "run 4" in refused.json()["detail"], refused.text
    assert envelope(3).status_code == 409
    assert json.loads((task_dir / "result.json").read_text())["run"] == 3  # the server's own, kept
    assert envelope(4).status_code == 201

    # A task folder from the version before: the server's record was .run~.
    old = server.results_dir / "old-task"
    old.mkdir()
    (old / ".run~").write_text('{"run": 5}')
    redis_client.set("meshq:task:old-task:runs", 6)
    assert _fence_process(old, 4).wait(timeout=30) == 3
    assert requests.post(f"{results}/old-task/files", files={"file": ("f", b"x")}, headers={"X-Meshq-Run": "4"},
                         timeout=60).status_code == 409
    assert _fence_process(old, 6).wait(timeout=30) == 0 and recorded_run(old) == 6
