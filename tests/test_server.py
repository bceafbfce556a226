"""The orchestrator HTTP server (``meshq serve``) as a real process on loopback, driven by real clients."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import socket
import threading
import time
from pathlib import Path

import pytest
import requests

from server.transfer import RangeNotSatisfiable, parse_range
from tests.conftest import ServerProcess, wait_for

TOKEN = "s3cret-token-value"


def files_under(root: Path) -> list[str]:
    """Every file (not directory) under ``root``, relative, sorted."""
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


def artifact_layout(root: Path) -> list[str]:
    """``files_under`` with each upload's random directory name written ``<upload>``."""
    return sorted(re.sub(r"\.[0-9a-f]{12}~", ".<upload>~", name) for name in files_under(root))


def artifact_files(task_id: str, name: str) -> list[str]:
    """What one stored upload is on disk (server.result_store): the name (a link), the
    upload's directory with the file and its checksum, the name's commit lock."""
    base = f"{task_id}/artifacts"
    return sorted([f"{base}/{name}", f"{base}/.{name}.<upload>~/{name}", f"{base}/.{name}.<upload>~/.meta~",
                   f"{base}/.{name}.lock~"])


def upload(server: ServerProcess, task_id: str, name: str, data: bytes, *,
           headers: dict[str, str] | None = None, fields: dict[str, str] | None = None) -> requests.Response:
    return requests.post(f"{server.base_url}/api/v1/results/{task_id}/files",
                         files={"file": (name, data, "application/octet-stream")}, data=fields or {},
                         headers={**server.headers(), **(headers or {})}, timeout=30)


def raw_request(server: ServerProcess, method: str, path: str, body: bytes = b"",
                headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """Send ``path`` exactly as given (no client-side normalisation of ``..`` or ``%2F``)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={**server.headers(), **(headers or {})})
        reply = conn.getresponse()
        data = reply.read()
        return reply.status, (json.loads(data) if data and reply.getheader("content-type") == "application/json"
                              else {})
    finally:
        conn.close()


def multipart(filename: str, data: bytes, boundary: str = "testboundary1234") -> tuple[bytes, dict[str, str]]:
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


# -- pure parts --------------------------------------------------------------------------
@pytest.mark.parametrize(("header", "expected"), [
    ("bytes=0-9", (0, 10)), ("bytes=5-", (5, 100)), ("bytes=-3", (97, 100)), ("bytes=90-200", (90, 100)),
    ("bytes=-500", (0, 100)), ("BYTES = 1-2", (1, 3)),
    # ignored (the whole file is sent): several ranges, other units, malformed, non-ASCII digits
    (None, None), ("bytes=0-1,5-6", None), ("items=0-1", None), ("bytes=9-2", None), ("bytes=-", None),
    ("bytes=\u00b2-", None), ("bytes=" + "9" * 40 + "-", None),
])
def test_parse_range(header: str | None, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, 100) == expected


@pytest.mark.parametrize(("header", "size"), [("bytes=100-", 100), ("bytes=-0", 100), ("bytes=0-", 0)])
def test_parse_range_unsatisfiable(header: str, size: int) -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, size)


# -- artifacts ----------------------------------------------------------------------
def test_upload_then_download_identical_with_range_head_and_checksums(server_factory) -> None:
    server = server_factory()
    data = os.urandom(3 * 1024 * 1024 + 123)
    sha = hashlib.sha256(data).hexdigest()

    reply = upload(server, "task-1", "model.zip", data)
    assert reply.status_code == 201, reply.text
    body = reply.json()
    assert body == {"task_id": "task-1", "filename": "model.zip", "bytes": len(data), "sha256": sha,
                    "url": f"{server.base_url}/api/v1/results/task-1/files/model.zip"}
    assert artifact_layout(server.results_dir) == artifact_files("task-1", "model.zip")
    assert (server.results_dir / "task-1" / "artifacts" / "model.zip").read_bytes() == data

    got = requests.get(body["url"], timeout=30)
    assert got.status_code == 200 and got.content == data
    assert got.headers["Content-Length"] == str(len(data))
    assert got.headers["X-Checksum-Sha256"] == sha and got.headers["ETag"] == f'"{sha}"'
    assert got.headers["Accept-Ranges"] == "bytes"

    head = requests.head(body["url"], timeout=30)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["Content-Length"] == str(len(data)) and head.headers["X-Checksum-Sha256"] == sha

    part = requests.get(body["url"], headers={"Range": "bytes=100-1099"}, timeout=30)
    assert part.status_code == 206 and part.content == data[100:1100]
    assert part.headers["Content-Range"] == f"bytes 100-1099/{len(data)}"
    assert requests.get(body["url"], headers={"Range": "bytes=-10"}, timeout=30).content == data[-10:]

    # A broken download resumes where it stopped and ends with the same bytes.
    first = data[:1_000_000]
    rest = requests.get(body["url"], headers={"Range": f"bytes={len(first)}-", "If-Range": f'"{sha}"'},
                        timeout=30)
    assert rest.status_code == 206 and hashlib.sha256(first + rest.content).hexdigest() == sha
    # If-Range with another version's ETag: the whole (new) file instead.
    stale = requests.get(body["url"], headers={"Range": "bytes=0-9", "If-Range": '"0000"'}, timeout=30)
    assert stale.status_code == 200 and stale.content == data

    unsatisfiable = requests.get(body["url"], headers={"Range": f"bytes={len(data)}-"}, timeout=30)
    assert unsatisfiable.status_code == 416
    assert unsatisfiable.headers["Content-Range"] == f"bytes */{len(data)}"
    assert requests.get(body["url"], headers={"If-None-Match": f'"{sha}"'}, timeout=30).status_code == 304

    listing = requests.get(f"{server.base_url}/api/v1/results/task-1/files", timeout=30).json()
    assert listing["files"] == [{"filename": "model.zip", "bytes": len(data), "url": body["url"]}]
    missing = requests.get(f"{server.base_url}/api/v1/results/task-1/files/nope.zip", timeout=30)
    assert missing.status_code == 404

    # Re-uploading replaces the file atomically; the checksum headers follow.
    new = os.urandom(5000)
    assert upload(server, "task-1", "model.zip", new).status_code == 201
    again = requests.get(body["url"], timeout=30)
    assert again.content == new and again.headers["X-Checksum-Sha256"] == hashlib.sha256(new).hexdigest()

    # An empty file is a file too.
    assert upload(server, "task-1", "empty.txt", b"").json()["sha256"] == hashlib.sha256(b"").hexdigest()
    empty_url = f"{server.base_url}/api/v1/results/task-1/files/empty.txt"
    assert requests.get(empty_url, timeout=30).content == b""
    assert requests.head(empty_url, timeout=30).headers["Content-Length"] == "0"
    assert requests.get(empty_url, headers={"Range": "bytes=0-"}, timeout=30).status_code == 416

    # Files survive a restart, checksums included.
    server.stop()
    server.start()
    after = requests.head(body["url"], timeout=30)
    assert after.headers["X-Checksum-Sha256"] == hashlib.sha256(new).hexdigest()

    log = server.log()
    assert "POST /api/v1/results/task-1/files 201" in log
    assert f"upload task-1/model.zip: {len(data)} bytes" in log
    assert f"download task-1/model.zip: {len(data)} of {len(data)} bytes" in log


def test_expected_checksum_from_header_or_field(server_factory) -> None:
    server = server_factory()
    data = os.urandom(70_000)
    sha = hashlib.sha256(data).hexdigest()
    assert upload(server, "t", "a.bin", data, headers={"X-Checksum-Sha256": sha}).status_code == 201
    assert upload(server, "t", "b.bin", data, fields={"sha256": sha.upper()}).status_code == 201

    wrong = "0" * 64
    for kwargs in ({"headers": {"X-Checksum-Sha256": wrong}}, {"fields": {"sha256": wrong}}):
        reply = upload(server, "t2", "c.bin", data, **kwargs)  # type: ignore[arg-type]
        assert reply.status_code == 422, reply.text
        assert reply.json()["field"] == "sha256" and sha in reply.json()["detail"]
    reply = upload(server, "t2", "c.bin", data, headers={"X-Checksum-Sha256": "not-hex"})
    assert reply.status_code == 422 and reply.json()["field"] == "X-Checksum-Sha256"
    assert files_under(server.results_dir / "t2") == []
    assert not (server.results_dir / "t2").exists()


def test_concurrent_uploads_all_land_intact(server_factory) -> None:
    server = server_factory()
    payloads = {f"t{i % 3}/f{i}.bin": os.urandom(400_000 + i * 7919) for i in range(10)}
    replies: dict[str, requests.Response] = {}

    def send(key: str) -> None:
        task_id, name = key.split("/")
        replies[key] = upload(server, task_id, name, payloads[key])

    threads = [threading.Thread(target=send, args=(key,)) for key in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for key, data in payloads.items():
        assert replies[key].status_code == 201, replies[key].text
        assert replies[key].json()["sha256"] == hashlib.sha256(data).hexdigest()
        assert requests.get(replies[key].json()["url"], timeout=30).content == data
    assert not [f for f in files_under(server.results_dir) if f.endswith("partial~")]


# Raw URL path segments, sent as they are (no client-side normalisation).
BAD_SEGMENTS = [
    "..",               # dot segment, literal
    "%2e%2e",           # dot segment, percent-encoded
    "%2E.",
    "a%2Fb",            # encoded separator
    "..%2F..%2Fsecret",
    "a%5Cb",            # encoded backslash
    "",                 # empty
    "a%00b",            # NUL
    "t%20x",            # outside [A-Za-z0-9._-]
    "a..b",             # '..' inside a name
    "a" * 201,          # too long
]
BAD_FILENAMES = ["../x", "a/b", "a\\b", "..", "", "a b", "x" * 201, "\u00e9.bin", "../../etc/passwd"]


def test_bad_names_are_400_and_touch_nothing(server_factory) -> None:
    server = server_factory()
    (server.results_dir.parent / "secret").write_text("do not serve me")
    upload_body, upload_headers = multipart("ok.bin", b"data")
    for seg in BAD_SEGMENTS:
        for method, path in (("GET", f"/api/v1/results/{seg}/files/x"), ("HEAD", f"/api/v1/results/{seg}/files/x"),
                             ("POST", f"/api/v1/results/{seg}/files"), ("GET", f"/api/v1/results/t/files/{seg}"),
                             ("GET", f"/api/v1/results/{seg}"), ("GET", f"/api/v1/tasks/{seg}"),
                             ("POST", f"/api/v1/tasks/{seg}/cancel")):
            body, headers = (upload_body, upload_headers) if path.endswith("/files") else (b"", {})
            status, reply = raw_request(server, method, path, body, headers)
            assert status == 400, (method, path, status, reply)
    for filename in BAD_FILENAMES:
        body, headers = multipart(filename, b"payload")
        status, reply = raw_request(server, "POST", "/api/v1/results/t/files", body, headers)
        assert status == 400 and reply["field"] == "filename", (filename, reply)
    assert files_under(server.results_dir) == []
    assert not server.results_dir.exists() or list(server.results_dir.iterdir()) == []


def test_malformed_multipart_is_refused(server_factory) -> None:
    server = server_factory()
    status, reply = raw_request(server, "POST", "/api/v1/results/t/files", b"just bytes",
                                {"Content-Type": "application/octet-stream"})
    assert status == 415
    body, headers = multipart("a.bin", b"payload")
    status, reply = raw_request(server, "POST", "/api/v1/results/t/files", body[:-20], headers)  # no end
    assert status == 400 and reply["field"] == "body"
    no_file = b"--b\r\nContent-Disposition: form-data; name=\"other\"\r\n\r\nv\r\n--b--\r\n"
    status, reply = raw_request(server, "POST", "/api/v1/results/t/files", no_file,
                                {"Content-Type": "multipart/form-data; boundary=b"})
    assert status == 400 and reply["field"] == "file"
    assert files_under(server.results_dir) == []


def test_oversize_uploads_are_413_and_leave_nothing(server_factory) -> None:
    limit = 10_000
    server = server_factory(env={"MESHQ_MAX_UPLOAD_BYTES": str(limit)})
    assert upload(server, "t", "exact.bin", b"x" * limit).status_code == 201

    # Declared by Content-Length: refused before the body is read.
    reply = upload(server, "big", "a.bin", os.urandom(limit + 100_000))
    assert reply.status_code == 413 and reply.json()["field"] == "file"
    # Just over the limit (the multipart envelope fits the allowance): refused while streaming.
    reply = upload(server, "big", "b.bin", os.urandom(limit + 1))
    assert reply.status_code == 413
    # Chunked, no Content-Length: refused while streaming.
    body, headers = multipart("c.bin", os.urandom(limit * 3))
    reply = requests.post(f"{server.base_url}/api/v1/results/big/files", headers=headers,
                          data=(body[i:i + 4096] for i in range(0, len(body), 4096)), timeout=30)
    assert reply.status_code == 413
    assert artifact_layout(server.results_dir) == artifact_files("t", "exact.bin")


def test_client_disconnect_mid_upload_leaves_no_file(server_factory) -> None:
    server = server_factory()
    boundary = "cut"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"half.bin\"\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall((f"POST /api/v1/results/cut/files HTTP/1.1\r\nHost: x\r\n"
                      f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                      f"Content-Length: {10 * 1024 * 1024}\r\n\r\n").encode() + head)
        sock.sendall(os.urandom(3 * 1024 * 1024))
        wait_for(lambda: any(f.endswith("partial~") for f in files_under(server.results_dir)), 10,
                 message="the upload to start writing")
    wait_for(lambda: "POST /api/v1/results/cut/files 499" in server.log(), 10,
             message="the server to notice the disconnect")
    wait_for(lambda: files_under(server.results_dir) == [], 10, message="the partial file to be removed")
    assert not (server.results_dir / "cut").exists()
    assert requests.get(f"{server.base_url}/api/v1/results/cut/files/half.bin", timeout=30).status_code == 404


def test_files_in_the_task_directory_are_served_but_not_links(server_factory, tmp_path: Path) -> None:
    server = server_factory()
    task = server.results_dir / "t9"
    task.mkdir(parents=True)
    (task / "responses.json").write_text('{"ok": true}')
    (tmp_path / "outside.txt").write_text("secret")
    (task / "link.txt").symlink_to(tmp_path / "outside.txt")
    got = requests.get(f"{server.base_url}/api/v1/results/t9/files/responses.json", timeout=30)
    assert got.status_code == 200 and got.json() == {"ok": True}
    assert got.headers["X-Checksum-Sha256"] == hashlib.sha256(b'{"ok": true}').hexdigest()
    assert requests.get(f"{server.base_url}/api/v1/results/t9/files/link.txt", timeout=30).status_code == 404
    result = requests.get(f"{server.base_url}/api/v1/results/t9", timeout=30).json()
    assert result["source"] == "responses.json" and result["result"] == {"ok": True}


# -- authentication --------------------------------------------------------------------
def test_token_required_everywhere_but_healthz_and_never_logged(server_factory) -> None:
    server = server_factory(token=TOKEN)
    url = f"{server.base_url}/api/v1/results/t/files"
    assert requests.get(f"{server.base_url}/healthz", timeout=10).status_code == 200

    missing = requests.post(url, files={"file": ("a.bin", b"data")}, timeout=10)
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == "Bearer"
    wrong = requests.post(url, files={"file": ("a.bin", b"data")},
                          headers={"Authorization": "Bearer not-the-token"}, timeout=10)
    assert wrong.status_code == 403
    assert requests.get(f"{server.base_url}/api/v1/workers", headers={"Authorization": TOKEN},
                        timeout=10).status_code == 401  # not a bearer credential
    assert requests.get(f"{server.base_url}/openapi.json", timeout=10).status_code == 401
    assert files_under(server.results_dir) == []

    auth = {"Authorization": f"Bearer {TOKEN}"}
    schema = requests.get(f"{server.base_url}/openapi.json", headers=auth, timeout=10).json()
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    ok = requests.post(url, files={"file": ("a.bin", b"data")}, headers=auth, timeout=10)
    assert ok.status_code == 201
    assert requests.get(ok.json()["url"], timeout=10).status_code == 401
    assert requests.get(ok.json()["url"], headers=auth, timeout=10).content == b"data"
    assert TOKEN not in server.log()
    assert "GET /api/v1/workers 401" in server.log() and "POST /api/v1/results/t/files 403" in server.log()


# -- results, tasks, workers -----------------------------------------------------------
def test_result_envelope_roundtrip(server_factory, redis_client) -> None:
    server = server_factory()
    envelope = {"task_id": "job-7", "result": {"final_lora_archive_sha256": "ab", "items": [1, 2]},
                "worker_id": "w1", "status": "SUCCESS"}
    reply = requests.post(f"{server.base_url}/api/v1/results", json=envelope, timeout=10)
    assert reply.status_code == 201, reply.text
    got = requests.get(f"{server.base_url}/api/v1/results/job-7", timeout=10).json()
    assert got["result"] == envelope["result"] and got["worker_id"] == "w1" and got["status"] == "SUCCESS"
    assert got["source"] == "envelope" and got["artifacts"] == []

    bad = requests.post(f"{server.base_url}/api/v1/results", json={**envelope, "task_id": "../x"}, timeout=10)
    assert bad.status_code == 400 and bad.json()["field"] == "task_id"
    missing = requests.post(f"{server.base_url}/api/v1/results", json={"result": 1}, timeout=10)
    assert missing.status_code == 422 and missing.json()["field"] == "task_id"
    assert requests.post(f"{server.base_url}/api/v1/results", data=b"{nope", timeout=10).status_code == 422
    assert requests.get(f"{server.base_url}/api/v1/results/never-ran", timeout=10).status_code == 404
    assert files_under(server.results_dir) == ["job-7/result.json"]


def test_invalid_task_documents_are_refused_naming_the_field(server_factory, redis_client) -> None:
    server = server_factory()
    url = f"{server.base_url}/api/v1/tasks"
    cases = [
        ({"spec": {"taskType": "echo", "echo": {"steps": 0}}}, "spec.echo.steps"),
        ({"spec": {"taskType": "translate"}}, "spec.taskType"),
        ({"apiVersion": "meshq/v1", "spec": {"taskType": "echo"}, "extra": 1}, "extra"),
        ({"spec": {"taskType": "inference", "data": {"type": "list", "items": ["hi"]}}}, "spec.model"),
        ({"kind": "EchoTask"}, "spec"),
        ([1, 2], "body"),
    ]
    for document, field in cases:
        reply = requests.post(url, json=document, timeout=10)
        assert reply.status_code == 422, (document, reply.text)
        assert reply.json()["field"] == field, reply.json()
        assert field in reply.json()["detail"]
    yaml_reply = requests.post(url, data="spec: {taskType: echo, echo: {sleep_s: -1}}",
                               headers={"Content-Type": "application/yaml"}, timeout=10)
    assert yaml_reply.status_code == 422 and yaml_reply.json()["field"] == "spec.echo.sleep_s"
    broken = requests.post(url, data="spec: [unclosed", headers={"Content-Type": "application/yaml"}, timeout=10)
    assert broken.status_code == 400 and broken.json()["field"] == "body"
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)) + "spec: *i\n"
    assert requests.post(url, data=bomb, headers={"Content-Type": "application/yaml"},
                         timeout=10).status_code == 413
    assert requests.post(url, data=b"<xml/>", headers={"Content-Type": "application/xml"},
                         timeout=10).status_code == 415
    assert redis_client.llen("tasks") == 0  # nothing was enqueued


def test_a_pipeline_whose_messages_would_pass_the_limit_is_refused_at_submission(server_factory,
                                                                                    redis_client) -> None:
    """A small document of 64 stages sharing 64 KiB of ``data``: every stage carries its own copy and a
    chain's first message carries every stage, 4 MiB in all, over the server's MAX_MESSAGE_BYTES
    (1 MiB here): 413 naming the limit, nothing recorded, nothing queued."""
    server = server_factory(env={"MESHQ_MAX_MESSAGE_BYTES": str(1024 * 1024)})
    shared = {"blob": "x" * (64 * 1024)}
    document = {"spec": {"taskType": "echo", "data": shared,
                         "stages": [{"name": f"s{i}", "spec": {"echo": {"message": i}}} for i in range(64)]}}
    reply = requests.post(f"{server.base_url}/api/v1/tasks", json=document, timeout=60)
    assert reply.status_code == 413, reply.text
    assert reply.json()["field"] == "spec" and "MAX_MESSAGE_BYTES=1048576" in reply.json()["detail"]
    assert "64 stages carries its own copy of the shared spec" in reply.json()["detail"]
    assert redis_client.llen("tasks") == 0 and not redis_client.keys("meshq:pipeline:*")
    # The same stages without the shared blob fit, and are accepted.
    small = {"spec": {"taskType": "echo", "stages": document["spec"]["stages"]}}
    assert requests.post(f"{server.base_url}/api/v1/tasks", json=small, timeout=60).status_code == 202


def test_submit_echo_runs_on_a_real_worker_then_state_result_cancel(server_factory, worker_factory,
                                                                    redis_client) -> None:
    server = server_factory()
    base = server.base_url
    worker = worker_factory(worker_id="srv-w1")
    workers = requests.get(f"{base}/api/v1/workers", timeout=10).json()["workers"]
    assert [(w["worker_id"], w["alive"], w["status"]) for w in workers] == [("srv-w1", True, "IDLE")]

    document = {"apiVersion": "meshq/v1", "kind": "EchoTask", "metadata": {"name": "hello"},
                "spec": {"taskType": "echo", "data": {"hello": "world"}, "echo": {"message": "hi"}}}
    reply = requests.post(f"{base}/api/v1/tasks", json=document, timeout=30)
    assert reply.status_code == 202, reply.text
    submitted = reply.json()
    assert submitted["queue"] == "tasks" and submitted["warnings"] == []
    assert submitted["task_ids"] == [submitted["id"]]
    task_url = f"{base}/api/v1/tasks/{submitted['id']}"
    state = wait_for(lambda: (s := requests.get(task_url, timeout=10).json())["state"] == "SUCCESS" and s, 60,
                     message="the echo task to succeed")
    assert state["result"]["echo"] == {"message": "hi", "data": {"hello": "world"}}
    assert state["result"]["worker_id"] == "srv-w1"
    result = requests.get(f"{base}/api/v1/results/{submitted['id']}", timeout=10).json()
    assert result["source"] == "celery" and result["worker_id"] == "srv-w1"
    assert result["result"]["echo"]["message"] == "hi"
    assert requests.post(f"{task_url}/cancel", timeout=10).status_code == 409  # already ended

    # YAML body, a bare spec, a long task: cancelled while it runs.
    long_task = "taskType: echo\necho: {sleep_s: 30, steps: 300}\n"
    reply = requests.post(f"{base}/api/v1/tasks", data=long_task, headers={"Content-Type": "text/yaml"}, timeout=30)
    assert reply.status_code == 202, reply.text
    long_url = f"{base}/api/v1/tasks/{reply.json()['id']}"
    running = wait_for(lambda: (s := requests.get(long_url, timeout=10).json())["state"] == "PROGRESS" and s, 30,
                       message="progress of the long task")
    assert running["progress"]["total_steps"] == 300
    cancel = requests.post(f"{long_url}/cancel", timeout=10)
    assert cancel.status_code == 200 and cancel.json()["cancel_requested"] is True
    ended = wait_for(lambda: (s := requests.get(long_url, timeout=10).json())["state"] == "REVOKED" and s, 30,
                     message="the long task to stop")
    assert ended["error_type"] == "TaskCancelled" and ended["error"].startswith("TaskCancelled: ")

    # Tagged task nobody consumes: accepted, with a warning.
    reply = requests.post(f"{base}/api/v1/tasks", json={"spec": {"taskType": "echo", "tags": ["tpu"]}}, timeout=30)
    assert reply.status_code == 202 and reply.json()["queue"] == "tasks.tpu"
    assert "no live worker" in reply.json()["warnings"][0]
    assert worker.alive()


def test_serve_refuses_bad_configuration(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {**os.environ, "MESHQ_MAX_UPLOAD_BYTES": "lots"}
    done = subprocess.run([sys.executable, "-m", "cli.main", "serve", "--port", "1", "--results-dir",
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "MESHQ_MAX_UPLOAD_BYTES" in done.stderr


def test_server_restart_on_same_port_keeps_serving(server_factory) -> None:
    server = server_factory()
    port = server.port
    assert upload(server, "r", "x.bin", b"abc").status_code == 201
    server.kill()
    started = time.monotonic()
    server.start()
    assert server.port == port and time.monotonic() - started < 30
    assert requests.get(f"{server.base_url}/api/v1/results/r/files/x.bin", timeout=10).content == b"abc"
