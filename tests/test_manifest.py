import hashlib
import json
from pathlib import Path

import pytest

from app.artifacts.manifest import build_manifest, write_task_outputs
from app.core.names import check_name


def test_manifest_sizes_and_hashes(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_bytes(b"hello")
    (tmp_path / "sub" / "b.bin").write_bytes(b"\x00" * 10)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "big").write_bytes(b"x")
    manifest = build_manifest(tmp_path)
    assert manifest["files"] == [
        {"path": "a.txt", "bytes": 5, "sha256": hashlib.sha256(b"hello").hexdigest()},
        {"path": "sub/b.bin", "bytes": 10, "sha256": hashlib.sha256(b"\x00" * 10).hexdigest()},
    ]
    assert manifest["total_bytes"] == 15


def test_write_task_outputs(tmp_path: Path) -> None:
    manifest = write_task_outputs(tmp_path / "t1", {"x": 1})
    assert json.loads((tmp_path / "t1" / "responses.json").read_text()) == {"x": 1}
    assert [f["path"] for f in manifest["files"]] == ["responses.json"]
    assert json.loads((tmp_path / "t1" / "manifest.json").read_text()) == manifest


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "a\\b", "a\x00b", "x" * 201, "%2e%2e", "a..b", "é"])
def test_unsafe_names_refused(name: str) -> None:
    with pytest.raises(ValueError):
        check_name(name)


@pytest.mark.parametrize("name", ["abc", "final_lora.zip", "3f2a-11ee", "a.b-c_d"])
def test_safe_names_accepted(name: str) -> None:
    assert check_name(name) == name


def test_known_digests_and_reuse_skip_rehashing(tmp_path: Path) -> None:
    (tmp_path / "final_lora.zip").write_bytes(b"archive bytes")
    # A digest given by the archiver is trusted (not recomputed): the file is not read again.
    manifest = write_task_outputs(tmp_path, {"v": 1}, known_sha256={"final_lora.zip": "ab" * 32})
    entry = next(f for f in manifest["files"] if f["path"] == "final_lora.zip")
    assert entry == {"path": "final_lora.zip", "bytes": 13, "sha256": "ab" * 32}
    # Rewriting responses.json reuses every other entry and updates its own.
    again = write_task_outputs(tmp_path, {"v": 2, "url": "http://x"}, reuse=manifest)
    body = (tmp_path / "responses.json").read_bytes()
    assert next(f for f in again["files"] if f["path"] == "final_lora.zip") == entry
    assert next(f for f in again["files"] if f["path"] == "responses.json")["sha256"] == hashlib.sha256(body).hexdigest()
    assert json.loads((tmp_path / "manifest.json").read_text()) == again
