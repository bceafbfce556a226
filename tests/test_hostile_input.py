"""Hostile input (issue 11): one spec must never take down the fleet, run code or read files.

Real worker and server processes, real Redis; each test names the issue's case it covers.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import wait_for
from tests.test_disk_full import small_disk  # noqa: F401  (fixture)

TOKEN = "hostile-token"
GOOD_ECHO = {"taskType": "echo", "data": {"ok": True}}


def send_to_worker(spec: Any, task_type: str = "inference", **options: Any) -> Any:
    """Bypass the server: a plain ``apply_async`` of ``spec`` (what any broker client can send)."""
    from tasks.submit import task_for_type

    return task_for_type(task_type).apply_async(args=[spec], **options)


def failure_of(result: Any, timeout_s: float = 120) -> str:
    """The task's error text; fails the test if it succeeded."""
    try:
        value = result.get(timeout=timeout_s)
    except Exception as exc:  # the error the user sees
        assert result.state == "FAILURE"
        return f"{type(exc).__name__}: {exc}"
    pytest.fail(f"the task succeeded: {value!r}")


def worker_still_serves(worker: Any) -> None:
    from tasks import echo

    assert echo.apply_async(args=[GOOD_ECHO]).get(timeout=60)["worker_id"] == worker.worker_id
    assert worker.alive()


def inference_spec(model: str, **extra: Any) -> dict[str, Any]:
    return {"taskType": "inference", "model": {"source": {"identifier": model}},
            "data": {"type": "list", "items": ["hello"]}, "inference": {"max_new_tokens": 2}, **extra}


@pytest.fixture
def outside_dir() -> Iterator[Path]:
    """A directory outside every data root of the tests (not under pytest's temporary root)."""
    directory = Path(tempfile.mkdtemp(prefix="meshq-outside-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


# -- case 3: data paths only from allowed roots ----------------------------------------------------
def test_datasets_and_checkpoints_only_from_data_roots(worker_factory, tiny_model_dir: Path,
                                                             outside_dir: Path, tmp_path: Path) -> None:
    creds = outside_dir / "creds.csv"
    creds.write_text("user,password\nroot,hunter2-secret\n")
    inside = tmp_path / "data"
    inside.mkdir()
    (inside / "link.csv").symlink_to(creds)  # a link inside a root to a file outside it
    (inside / "prompts.csv").write_text("question,secret_header_name\nhi,x\n")
    worker = worker_factory(worker_id="roots")

    def dataset(path: Path, column: str = "password") -> dict[str, Any]:
        return inference_spec(str(tiny_model_dir), data={"type": "dataset", "path": str(path), "column": column})

    for path in (creds, inside / "link.csv", outside_dir / "missing.csv"):
        error = failure_of(send_to_worker(dataset(path)))
        assert "spec.data.path" in error and "outside the directories" in error, error
        assert "hunter2" not in error and "user" not in error.split("outside")[0].replace(str(path), "")
    # A wrong column of an allowed file names the column, not the file's header row.
    error = failure_of(send_to_worker(dataset(inside / "prompts.csv", column="nope")))
    assert "spec.data.column" in error and "'nope'" in error and "secret_header_name" not in error, error
    # Checkpoints too: a local checkpoint directory outside the roots is refused.
    load = {"checkpoint": {"load": {"type": "local", "path": str(outside_dir)}}}
    error = failure_of(send_to_worker(inference_spec(str(tiny_model_dir), **load)))
    assert "spec.checkpoint.load.path" in error and "outside the directories" in error, error
    # MESHQ_DATA_DIRS adds a root: the same file is read by a worker that allows its directory.
    worker_still_serves(worker)
    worker.terminate()
    reader = worker_factory(worker_id="reader", env={"MESHQ_DATA_DIRS": str(outside_dir)})
    result = send_to_worker(dataset(creds)).get(timeout=120)
    assert result["worker_id"] == reader.worker_id


# -- issue 23, item 1: every file read is checked, whatever library reads it -----------------------
SECRET_ROW = '{"q": "outside-secret-row"}\n'
README_POINTING_OUTSIDE = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: {secret}
---
"""


def prompts_of(result: dict[str, Any]) -> list[str]:
    return [item["prompt"] for item in result["items"]]


def test_a_dataset_directory_reads_only_checked_files_never_its_readme_configs(worker_factory, tiny_model_dir: Path,
                                                             outside_dir: Path, tmp_path: Path) -> None:
    secret = outside_dir / "secret.jsonl"
    secret.write_text(SECRET_ROW)
    worker = worker_factory(worker_id="data-dirs")

    def dataset(url: str) -> dict[str, Any]:
        return inference_spec(str(tiny_model_dir), data={"type": "dataset", "url": url, "column": "q"})

    # The case: a zip whose README.md points datasets at an outside file, unpacked into
    # RESULTS_DIR by a checkpoint.load (which fails, naming the directory), then used as data.
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("evil/README.md", README_POINTING_OUTSIDE.format(secret=secret))
        zf.writestr("evil/train.jsonl", '{"q": "hello from the archive"}\n')
    load = {"checkpoint": {"load": {"type": "local", "path": str(archive)}}}
    error = failure_of(send_to_worker(inference_spec(str(tiny_model_dir), **load)))
    unpacked = error.split("'")[1]
    assert Path(unpacked).is_relative_to(worker.results_dir / ".cache" / "checkpoints"), error
    result = send_to_worker(dataset(unpacked)).get(timeout=120)
    assert prompts_of(result) == ["hello from the archive"]  # its own file, not the README's

    # A README.md alone names no data: nothing is read.
    only_readme = tmp_path / "only-readme"
    only_readme.mkdir()
    (only_readme / "README.md").write_text(README_POINTING_OUTSIDE.format(secret=secret))
    error = failure_of(send_to_worker(dataset(str(only_readme))))
    assert "spec.data.url" in error and "holds no data files" in error and "outside-secret" not in error, error

    # A train.jsonl inside an allowed directory that links outside is refused when it is opened.
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "train.jsonl").symlink_to(secret)
    error = failure_of(send_to_worker(dataset(str(linked))))
    assert "spec.data.url" in error and "outside the directories" in error and "outside-secret" not in error, error
    worker_still_serves(worker)


def test_checkpoint_files_linking_outside_the_roots_are_refused(worker_factory, tiny_model_dir: Path,
                                                              outside_dir: Path, tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_model_dir, checkpoint)
    outside_config = outside_dir / "config.json"
    shutil.move(checkpoint / "config.json", outside_config)
    (checkpoint / "config.json").symlink_to(outside_config)  # transformers would open it by name
    worker_factory(worker_id="ckpt-links")
    load = {"checkpoint": {"load": {"type": "local", "path": str(checkpoint)}}}
    error = failure_of(send_to_worker(inference_spec(str(tiny_model_dir), **load)))
    assert "spec.checkpoint.load.path" in error and "'config.json' links outside the directories" in error, error


# -- issue 23, item 2: a datasets file format is not a dataset ------------------------------------
def test_datasets_format_names_never_read_the_working_directory(worker_factory, tiny_model_dir: Path) -> None:
    worker = worker_factory(worker_id="builders")
    for name in ("text", "json", "csv"):
        spec = inference_spec(str(tiny_model_dir), data={"type": "dataset", "url": name, "column": "text"})
        error = failure_of(send_to_worker(spec))
        assert f"spec.data.url: '{name}' is the name of a datasets file format, not a dataset" in error, error
    worker_still_serves(worker)


# -- case 2: no code from artifacts ----------------------------------------------------------------
EVIL_CODE = """
import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import LlamaConfig


class EvilConfig(LlamaConfig):
    model_type = "llama"
"""


def evil_checkpoint(tiny_model_dir: Path, directory: Path, marker: Path) -> Path:
    """The tiny model whose ``config.json`` maps its classes to a ``.py`` file beside it."""
    shutil.copytree(tiny_model_dir, directory)
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig"}
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    return directory


def test_trust_remote_code_never_runs_code_from_artifacts(worker_factory, server_factory,
                                                                tiny_model_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    checkpoint = evil_checkpoint(tiny_model_dir, tmp_path / "evil-model", marker)
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for file in checkpoint.iterdir():
            zf.write(file, f"final_model/{file.name}")
    server = server_factory(token=TOKEN)
    with open(archive, "rb") as fh:
        reply = requests.post(f"{server.base_url}/api/v1/results/uploader/files", headers=server.headers(),
                              files={"file": ("evil.zip", fh)}, timeout=30)
    assert reply.status_code == 201, reply.text
    url = reply.json()["url"]
    spec = inference_spec(str(tiny_model_dir), checkpoint={"load": {"type": "http", "url": url}})
    spec["model"]["transformers"] = {"trust_remote_code": True}

    # Over HTTP: refused at submission, naming the field.
    refused = requests.post(f"{server.base_url}/api/v1/tasks", headers=server.headers(), json={"spec": spec},
                            timeout=30)
    assert refused.status_code == 422 and "trust_remote_code" in refused.json()["detail"], refused.text
    # Straight to a worker that even allows remote code: a downloaded checkpoint is still refused.
    worker = worker_factory(worker_id="remote-ok", env={"MESHQ_ALLOW_REMOTE_CODE": "1",
                                                        "ORCHESTRATOR_TOKEN": TOKEN})
    error = failure_of(send_to_worker(spec))
    assert "spec.model" in error and "trust_remote_code is never allowed" in error, error
    # The same archive as a local file: unpacked into the worker's cache, still never trusted.
    local_archive = inference_spec(str(tiny_model_dir), checkpoint={"load": {"type": "local", "path": str(archive)}})
    local_archive["model"]["transformers"] = {"trust_remote_code": True}
    error = failure_of(send_to_worker(local_archive))
    assert "trust_remote_code" in error and "downloaded or uploaded" in error, error
    # A local directory with code, on a worker that does not allow remote code (the default).
    local = inference_spec(str(checkpoint))
    local["model"]["transformers"] = {"trust_remote_code": True}
    worker.terminate()
    plain = worker_factory(worker_id="remote-off")
    error = failure_of(send_to_worker(local))
    assert "MESHQ_ALLOW_REMOTE_CODE" in error, error
    assert not marker.exists(), "the checkpoint's code ran on the worker"
    worker_still_serves(plain)


# -- case 4: names end at the very end -------------------------------------------------------------
def test_names_with_a_trailing_newline_are_refused(server_factory, tmp_path: Path) -> None:
    from app.core.names import check_name

    for bad in ("nl\n", "f.txt\n"):
        with pytest.raises(ValueError):
            check_name(bad)
    server = server_factory(token=TOKEN)
    reply = requests.post(f"{server.base_url}/api/v1/results/nl%0a/files", headers=server.headers(),
                          files={"file": ("f.txt", b"x")}, timeout=30)
    assert reply.status_code == 400 and reply.json()["field"] == "task_id", reply.text
    reply = requests.post(f"{server.base_url}/api/v1/results/ok/files", headers=server.headers(),
                          files={"file": ("f.txt\n", b"x")}, timeout=30)
    assert reply.status_code == 400 and reply.json()["field"] == "filename", reply.text
    assert not list(server.results_dir.glob("**/*\n*"))
    reply = requests.get(f"{server.base_url}/api/v1/tasks/nl%0a", headers=server.headers(), timeout=30)
    assert reply.status_code == 400, reply.text


# -- case 1: a poison message fails its task, never the worker ------------------------------------
def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def test_deep_spec_fails_its_task_and_the_worker_goes_on(worker_factory, server_factory,
                                                               redis_client) -> None:
    worker = worker_factory(worker_id="poison")
    server = server_factory(token=TOKEN)
    deep_spec = {"taskType": "echo", "data": nested(480)}
    # Over HTTP: refused before anything is queued, naming the limit.
    reply = requests.post(f"{server.base_url}/api/v1/tasks",
                          headers={**server.headers(), "Content-Type": "application/json"},
                          data=json.dumps({"spec": deep_spec}), timeout=30)
    assert reply.status_code == 413 and "MAX_NESTING_DEPTH" in reply.json()["detail"], reply.text
    for depth in (480, 300, 70):
        # Straight to the broker (no server): twice, so a message put back would be seen again.
        results = [send_to_worker({"taskType": "echo", "data": nested(depth)}, "echo") for _ in range(2)]
        for result in results:
            error = failure_of(result)
            assert "LimitExceeded" in error and "MAX_NESTING_DEPTH" in error, error
            view = requests.get(f"{server.base_url}/api/v1/tasks/{result.id}", headers=server.headers(), timeout=30)
            assert view.status_code == 200 and view.json()["state"] == "FAILURE", view.text
        worker_still_serves(worker)
    # Nothing was put back on the queue for another worker to die of.
    assert redis_client.llen("tasks") == 0
    # Exactly at the limit is fine.
    from tasks import echo

    assert echo.apply_async(args=[{"taskType": "echo", "data": nested(60)}]).get(timeout=60)["worker_id"] == "poison"


def unread_bytes(client: socket.socket) -> int:
    """Bytes of this loopback connection not yet read by the server process: our send queue
    plus the server socket's receive queue (``/proc/net/tcp``)."""
    local_port = client.getsockname()[1]
    server_port = client.getpeername()[1]
    total = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, queues = fields[1], fields[2], fields[4]
        tx, rx = (int(part, 16) for part in queues.split(":"))
        ports = (int(local.split(":")[1], 16), int(remote.split(":")[1], 16))
        if ports == (local_port, server_port):
            total += tx
        elif ports == (server_port, local_port):
            total += rx
    return total


# -- case 10: bounded in bytes and shape, parsed off the event loop --------------------------------
def test_documents_are_bounded_and_parsed_off_the_event_loop(worker_factory, server_factory) -> None:
    server = server_factory(token=TOKEN)
    yaml_headers = {**server.headers(), "Content-Type": "application/yaml"}

    def post(body: bytes | str, headers: dict[str, str] = yaml_headers) -> requests.Response:
        return requests.post(f"{server.base_url}/api/v1/tasks", headers=headers, data=body, timeout=120)

    # An anchor on a 1 MB string referenced 600 times: 600 MB once expanded.
    bomb = "spec:\n  taskType: echo\n  data:\n    s: &s " + "x" * 1_000_000 + "\n    refs: [" + \
           ", ".join(["*s"] * 600) + "]\n"
    reply = post(bomb)
    assert reply.status_code == 413 and "MAX_EXPANDED_BYTES" in reply.json()["detail"], reply.text
    # Nested aliases (a "billion laughs"): many values from a few lines.
    laughs = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(6))
    reply = post("spec:\n  taskType: echo\n  data:\n" + "".join("    " + line + "\n" for line in laughs.splitlines()))
    assert reply.status_code == 413 and "MAX_VALUES" in reply.json()["detail"], reply.text
    # A body past the document size.
    reply = post(b"spec: {taskType: echo}\n#" + b"x" * (9 * 1024 * 1024))
    assert reply.status_code == 413 and "MAX_DOCUMENT_BYTES" in reply.json()["detail"], reply.text
    # One string past its limit, and too many stages.
    reply = post(json.dumps({"spec": {"taskType": "echo", "data": {"s": "y" * (5 * 1024 * 1024)}}}),
                 {**server.headers(), "Content-Type": "application/json"})
    assert reply.status_code == 413 and "MAX_STRING_BYTES" in reply.json()["detail"], reply.text
    stages = [{"name": f"s{i}", "spec": {}} for i in range(800)]
    reply = post(json.dumps({"spec": {"taskType": "echo", "stages": stages}}),
                 {**server.headers(), "Content-Type": "application/json"})
    assert reply.status_code == 413 and "MAX_STAGES" in reply.json()["detail"], reply.text

    # A large YAML document (just under the limits) is parsed in a thread: /healthz answers meanwhile.
    big = ("spec:\n  taskType: not-a-type\n  data:\n    items:\n" +
           "".join(f"    - prompt number {i} {'z' * 40}\n" for i in range(100_000)) +
           "---\nsecond: document\n").encode()  # refused by the parser itself, once it has read it all
    with socket.create_connection(("127.0.0.1", server.port), timeout=120) as raw:
        raw.sendall(b"POST /api/v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/yaml\r\n"
                    b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: " +
                    str(len(big)).encode() + b"\r\n\r\n" + big)
        wait_for(lambda: unread_bytes(raw) == 0, 60, message="the server reading the whole body")
        health = requests.get(f"{server.base_url}/healthz", timeout=30)
        still_parsing = not select.select([raw], [], [], 0)[0]
        answer = raw.makefile("rb").readline()
    assert health.status_code == 200 and b" 400 " in answer, answer
    assert still_parsing, "the document was answered before /healthz could be asked"

    # The same limits on the worker, for a message that never passed the server.
    worker = worker_factory(worker_id="bounded")
    huge = {"taskType": "echo", "data": {"parts": ["w" * (3 * 1024 * 1024)] * 6}}
    error = failure_of(send_to_worker(huge, "echo"))
    assert "MAX_MESSAGE_BYTES" in error, error
    worker_still_serves(worker)


# -- case 9: the HTTP front door bounds headers and slow clients ------------------------------------
def read_reply(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    sock.settimeout(60)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def test_header_limits_and_slow_connections_closed(server_factory) -> None:
    server = server_factory(token=TOKEN)
    address = ("127.0.0.1", server.port)
    # Slow and silent clients, all at once: nothing, headers a byte every second, a stalled body.
    silent = socket.create_connection(address)
    dripping = socket.create_connection(address)
    stalled = socket.create_connection(address)
    stalled.sendall(b"POST /api/v1/tasks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() +
                    b"\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"spec\":")
    stalled_upload = socket.create_connection(address)  # an upload that stops: its partial file goes at once
    stalled_upload.sendall(b"POST /api/v1/results/stalled/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " +
                           TOKEN.encode() + b"\r\nContent-Type: multipart/form-data; boundary=b0\r\n"
                           b"Content-Length: 10000000\r\n\r\n--b0\r\nContent-Disposition: form-data; name=\"file\"; "
                           b"filename=\"s.bin\"\r\n\r\n" + b"s" * 5_000_000)
    wait_for(lambda: list(server.results_dir.rglob("*.partial~")), 30, message="the stalled upload's partial file")

    # No token needed to try: a header over the limit is refused at once, the connection closed.
    with socket.create_connection(address) as big:
        big.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
        reply = read_reply(big)
    assert reply.startswith(b"HTTP/1.1 431") and b"MAX_HEADER_BYTES" in reply, reply[:200]
    # A 50 MB header is not read to its end: the server stops reading and closes.
    with socket.create_connection(address) as flood:
        flood.settimeout(60)
        with pytest.raises(OSError):  # BrokenPipe / ConnectionReset once the server has closed
            flood.sendall(b"GET /healthz HTTP/1.1\r\nX-Flood: " + b"b" * 50_000_000)
    assert requests.get(f"{server.base_url}/healthz", timeout=10).status_code == 200

    dripping.sendall(b"GET /healthz HTTP/1.1\r\n")
    dripping.setblocking(False)
    drip_reply = b""
    deadline_s = 60  # well past HEADER_TIMEOUT_S (app.core.limits: 10 s)
    import time

    started = time.monotonic()
    while time.monotonic() - started < deadline_s:
        try:
            dripping.sendall(b"X")
        except OSError:
            pass
        if select.select([dripping], [], [], 1)[0]:
            drip_reply = read_reply(dripping)
            break
    assert drip_reply.startswith(b"HTTP/1.1 408") and b"HEADER_TIMEOUT_S" in drip_reply, drip_reply[:300]
    assert read_reply(silent) == b""  # closed without a word
    stall_reply = read_reply(stalled)
    assert stall_reply.startswith(b"HTTP/1.1 408") and b"connection: close" in stall_reply.lower(), stall_reply
    assert b"BODY_IDLE_TIMEOUT_S" in stall_reply, stall_reply
    upload_reply = read_reply(stalled_upload)
    assert upload_reply.startswith(b"HTTP/1.1 408"), upload_reply[:300]
    assert not list(server.results_dir.rglob("*.partial~")) and not (server.results_dir / "stalled").exists()
    for sock in (silent, dripping, stalled, stalled_upload):
        sock.close()
    assert requests.get(f"{server.base_url}/healthz", timeout=10).status_code == 200


# -- case 7: uploads of one name are atomic as a pair ----------------------------------------------
def check_served(server: Any, task_id: str, name: str) -> tuple[str, str]:
    """(sha256 of the bytes served, the checksum the server claims) for one artifact."""
    import hashlib

    reply = requests.get(f"{server.base_url}/api/v1/results/{task_id}/files/{name}", headers=server.headers(),
                         timeout=30)
    assert reply.status_code == 200, reply.text
    assert reply.headers["ETag"] == f'"{reply.headers["X-Checksum-Sha256"]}"'
    return hashlib.sha256(reply.content).hexdigest(), reply.headers["X-Checksum-Sha256"]


def test_same_name_uploads_keep_file_and_checksum_together(server_factory) -> None:
    from concurrent.futures import ThreadPoolExecutor

    server = server_factory(token=TOKEN)
    rounds, uploaders = 40, 8
    with ThreadPoolExecutor(uploaders) as pool:
        for round_no in range(rounds):
            bodies = [os.urandom(64 * 1024) for _ in range(uploaders)]  # one size: only the bytes differ
            url = f"{server.base_url}/api/v1/results/round-{round_no}/files"
            replies = list(pool.map(lambda body, url=url: requests.post(
                url, headers=server.headers(), files={"file": ("same.bin", body)}, timeout=60), bodies))
            assert all(r.status_code == 201 for r in replies), [r.text for r in replies]
            served, claimed = check_served(server, f"round-{round_no}", "same.bin")
            assert served == claimed, f"round {round_no}: bytes of one upload, checksum of another"
            assert claimed in {r.json()["sha256"] for r in replies}
    server.stop()
    server.start()
    for round_no in range(rounds):
        served, claimed = check_served(server, f"round-{round_no}", "same.bin")
        assert served == claimed, f"after the restart, round {round_no}: wrong checksum"
    # Only the current upload of each name is kept.
    kept = [p for p in server.results_dir.rglob("*")
            if p.is_file() and not p.is_symlink() and not p.name.endswith("~")]
    assert len(kept) == rounds, kept


# -- case 11: nothing of a dead upload stays, and a full disk is 507 -------------------------------
def test_dead_uploads_are_swept_at_start_and_a_full_disk_is_507(
        server_factory, small_disk: Path, redis_client) -> None:  # noqa: F811  (the fixture imported above)
    import signal

    server = server_factory(token=TOKEN)
    # A server killed in the middle of an upload leaves a partial file ...
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        boundary = b"xyzzy"
        head = (b"--" + boundary + b"\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.bin\"\r\n\r\n")
        raw.sendall(b"POST /api/v1/results/dying/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " +
                    TOKEN.encode() + b"\r\nContent-Type: multipart/form-data; boundary=" + boundary +
                    b"\r\nContent-Length: 100000000\r\n\r\n" + head + b"z" * 8 * 1024 * 1024)
        wait_for(lambda: list(server.results_dir.rglob("*.partial~")), 30, message="a partial file")
        assert server.process is not None
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait()
    assert list(server.results_dir.rglob("*.partial~"))
    # ... removed when the server starts again, not a day later.
    server.start()
    assert not list(server.results_dir.rglob("*.partial~"))
    assert not [p for p in (server.results_dir / "dying" / "artifacts").iterdir()] \
        if (server.results_dir / "dying" / "artifacts").exists() else True
    server.stop()

    # A full disk: 507 on every write, with nothing left behind.
    disk = small_disk / "results"
    full = server_factory(token=TOKEN, results_dir=disk)
    filler = small_disk / "filler"
    with open(filler, "wb") as fh:
        try:
            fh.write(b"\0" * (512 * 1024))
        except OSError:
            pass
    before = sorted(str(p) for p in disk.rglob("*"))
    envelope = {"task_id": "full-1", "worker_id": "w", "result": {"blob": "x" * 300_000}}
    reply = requests.post(f"{full.base_url}/api/v1/results", headers=full.headers(), json=envelope, timeout=30)
    assert reply.status_code == 507 and reply.json()["field"] == "result", reply.text
    reply = requests.post(f"{full.base_url}/api/v1/results/full-2/files", headers=full.headers(),
                          files={"file": ("big.bin", b"y" * 300_000)}, timeout=30)
    assert reply.status_code == 507 and reply.json()["field"] == "file", reply.text
    # The same from a worker's run (keyed by run: the task's run record is not left behind either).
    redis_client.set("meshq:task:full-3:runs", 2)  # runs the system issued
    redis_client.set("meshq:task:full-4:runs", 2)
    reply = requests.post(f"{full.base_url}/api/v1/results", headers=full.headers(),
                          json={**envelope, "task_id": "full-3", "run": 2}, timeout=30)
    assert reply.status_code == 507 and reply.json()["field"] == "result", reply.text
    reply = requests.post(f"{full.base_url}/api/v1/results/full-4/files", headers={**full.headers(), "X-Meshq-Run": "2"},
                          files={"file": ("big.bin", b"y" * 300_000)}, timeout=30)
    assert reply.status_code == 507 and reply.json()["field"] == "file", reply.text
    assert sorted(str(p) for p in disk.rglob("*")) == before
    os.remove(filler)
    reply = requests.post(f"{full.base_url}/api/v1/results", headers=full.headers(), json=envelope, timeout=30)
    assert reply.status_code == 201, reply.text


def test_anything_failing_on_the_way_to_the_pool_fails_only_its_task(worker_factory, server_factory) -> None:
    """The safety net behind the limits: a message whose own headers break ``pickle`` on the
    way to the pool (no limit looks at headers) still fails only its task."""
    from tasks import echo

    worker = worker_factory(worker_id="net")
    server = server_factory(token=TOKEN)
    results = [echo.apply_async(args=[GOOD_ECHO], headers={"poison": nested(480)}) for _ in range(2)]
    for result in results:
        error = failure_of(result)
        assert "could not be handed to the pool" in error and "RecursionError" in error, error
        view = requests.get(f"{server.base_url}/api/v1/tasks/{result.id}", headers=server.headers(), timeout=30)
        assert view.status_code == 200 and view.json()["state"] == "FAILURE", view.text
    for _ in range(3):  # the pool slot and the reservation were given back: the next tasks run
        worker_still_serves(worker)
