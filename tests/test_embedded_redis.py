"""``meshq redis``: the embedded server stops with its command, and a taken port is refused."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from cli.embedded_redis import EmbeddedRedis, free_port
from tests.conftest import ROOT, wait_for


def meshq_redis(port: int, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "cli.main", "redis", "--port", str(port)],
                            cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port something (not a Redis) listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_sigterm_stops_the_redis_server_child(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "redis.log"
    proc = meshq_redis(port, log)
    try:
        wait_for(lambda: "embedded Redis running" in log.read_text() or proc.poll() is not None, 30,
                 message="meshq redis to start")
        assert proc.poll() is None, log.read_text()
        client = redis.Redis(port=port)
        server_pid = int(client.info("server")["process_id"])
        client.close()
        assert process_exists(server_pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, log.read_text()
        wait_for(lambda: not process_exists(server_pid), 10, message="redis-server to stop")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_port_taken_by_another_process_is_refused_with_the_reason(taken_port: int, tmp_path: Path) -> None:
    log = tmp_path / "redis.log"
    proc = meshq_redis(taken_port, log)
    assert proc.wait(timeout=30) == 2
    out = log.read_text()
    assert f"127.0.0.1:{taken_port} is already in use" in out, out
    assert "embedded Redis running" not in out


def test_a_port_taken_by_another_redis_is_refused(tmp_path: Path) -> None:
    other = EmbeddedRedis().start()
    try:
        log = tmp_path / "redis.log"
        proc = meshq_redis(other.port, log)
        assert proc.wait(timeout=30) == 2
        out = log.read_text()
        assert "already in use" in out and "embedded Redis running" not in out, out
        assert redis.Redis(port=other.port).ping()  # the other server was left alone
    finally:
        other.stop()


def test_a_queued_task_survives_a_restart_of_meshq_redis(tmp_path: Path) -> None:
    """AOF in a data directory kept between starts: a task queued before ``meshq redis``
    stopped is still queued after it starts again, and a worker then runs it."""
    from tests.conftest import WorkerProcess

    port, data_dir = free_port(), tmp_path / "redis-data"
    url = f"redis://127.0.0.1:{port}/0"
    env = {**os.environ, "REDIS_URL": url, "WORKER_ID": "after-restart", "HEARTBEAT_INTERVAL_SEC": "1",
           "RESULTS_DIR": str(tmp_path / "results"), "MESHQ_LOG_FILE": str(tmp_path / "worker.log")}

    def start_redis(log: Path) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-m", "cli.main", "redis", "--port", str(port),
                                 "--data-dir", str(data_dir)],
                                cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
        wait_for(lambda: "embedded Redis running" in log.read_text() or proc.poll() is not None, 30,
                 message="meshq redis to start")
        assert proc.poll() is None, log.read_text()
        return proc

    first = start_redis(tmp_path / "redis-1.log")
    try:
        submit = subprocess.run(
            [sys.executable, "-c", "import tasks; print(tasks.echo.apply_async(args=[{'taskType': 'echo', "
                                   "'data': {'kept': True}}]).id)"],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
        task_id = submit.stdout.strip()
        assert task_id, submit.stderr
        assert redis.Redis(port=port).llen("tasks") == 1
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=15) == 0
    assert any(data_dir.glob("appendonly*"))  # the AOF (a file, or a directory on Redis 7)
    second = start_redis(tmp_path / "redis-2.log")
    worker = WorkerProcess("after-restart", env, ROOT, tmp_path / "worker-stdout.log", [])
    try:
        client = redis.Redis(port=port, decode_responses=True)
        meta = wait_for(lambda: (raw := client.get(f"celery-task-meta-{task_id}")) and '"SUCCESS"' in raw and raw,
                        60, message="the queued task to run after the restart")
        assert '"kept": true' in meta
        client.close()
    finally:
        worker.close()
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=15)
