import hashlib
import json
import math
import uuid
from pathlib import Path

import pytest

from app.artifacts.manifest import build_manifest, json_bytes, write_task_outputs
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


@pytest.mark.parametrize("value", [
    {"b": [1, 2.5, None, True, False, "text", {"z": {}, "a": []}], "a": -0.0, "c": 1.2e-05, "d": 1e300},
    {"quote": "\" \\ \n \u2028 \x00", "non_ascii": "é 日本 🙂"},
    [], {}, "plain", 7,
])
def test_json_files_are_indented_sorted_and_read_back_equal(value: object) -> None:
    data = json_bytes(value)
    assert data.endswith(b"\n")
    assert json.loads(data) == value
    if isinstance(value, dict) and value:  # keys sorted, two-space indent: a readable file
        keys = [line.split(b'"')[1] for line in data.splitlines() if line.startswith(b'  "')]
        assert keys == sorted(keys) and data.startswith(b'{\n  "')


@pytest.mark.parametrize("value", [{"loss": float("nan")}, {"loss": float("inf")}, {1: "an integer key"},
                                   {"big": 2**70}])
def test_json_files_keep_what_the_standard_library_writes(value: object) -> None:
    # NaN, infinities, integer keys, integers over 64 bits: written as json.dumps writes them
    assert json_bytes(value) == (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()
    read = json.loads(json_bytes(value))
    if isinstance(read.get("loss"), float) and math.isnan(read["loss"]):
        return
    assert read == ({"1": "an integer key"} if 1 in value else value)


def test_json_files_refuse_what_json_refuses() -> None:
    for value in ({"id": uuid.uuid4()}, {"tags": {"a"}}, {"blob": b"bytes"}):
        with pytest.raises(TypeError):
            json_bytes(value)


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
