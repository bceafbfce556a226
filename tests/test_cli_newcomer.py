"""What a newcomer sees on the command line and the HTTP API: each message once, naming what to fix."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pyte
import redis
import requests

from tests.conftest import ROOT, wait_for

COLUMNS, LINES = 140, 80


def run_in_terminal(argv: list[str], env: dict[str, str], timeout_s: float = 120) -> tuple[int, list[str]]:
    """Run ``argv`` with stdin/stdout/stderr on a pseudo-terminal; return its exit status and the
    lines left on the screen (as a terminal emulator draws them, cursor moves and all)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", LINES, COLUMNS, 0, 0))
    proc = subprocess.Popen(argv, cwd=ROOT, stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                            env={**env, "TERM": "xterm-256color", "COLUMNS": str(COLUMNS), "LINES": str(LINES)})
    os.close(slave)
    screen = pyte.Screen(COLUMNS, LINES)
    stream = pyte.ByteStream(screen)
    try:
        while True:
            ready, _, _ = select.select([master], [], [], timeout_s)
            if not ready:
                raise TimeoutError(f"{argv} printed nothing for {timeout_s}s")
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            stream.feed(chunk)
        code = proc.wait(timeout=timeout_s)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return code, [line.rstrip() for line in screen.display if line.strip()]


def test_submit_wait_shows_the_final_status_once_on_a_terminal(worker_factory, tmp_path: Path) -> None:
    worker_factory(worker_id="tty-w")
    spec = tmp_path / "task.yaml"
    spec.write_text("spec:\n  taskType: echo\n  data: {hello: world}\n  echo: {sleep_s: 1, steps: 2}\n")
    code, screen = run_in_terminal([sys.executable, "-m", "cli.main", "submit", str(spec), "--wait"],
                                   dict(os.environ))
    assert code == 0, "\n".join(screen)
    finals = [line for line in screen if line.startswith(("pipeline ", "task ")) and line.endswith(": SUCCESS")]
    assert len(finals) == 1, "\n".join(screen)


def test_workers_names_the_redis_it_asked_without_credentials(redis_client: redis.Redis, redis_url: str) -> None:
    done = subprocess.run([sys.executable, "-m", "cli.main", "workers"], cwd=ROOT,
                          env={**os.environ, "REDIS_URL": redis_url}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"no live workers in Redis {redis_url}" in done.stdout
    down = subprocess.run([sys.executable, "-m", "cli.main", "workers"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "REDIS_URL": "redis://u:s3cret@127.0.0.1:1/0"})
    assert down.returncode == 2
    assert "cannot reach Redis at redis://127.0.0.1:1/0" in down.stderr and "s3cret" not in down.stderr
    assert "Traceback" not in down.stderr


def test_http_submit_of_malformed_yaml_names_line_and_column(redis_client: redis.Redis, server_factory,
                                                             tmp_path: Path) -> None:
    server = server_factory()
    body = "spec:\n  taskType: echo\n  data: [1, 2\n"
    reply = requests.post(f"{server.base_url}/api/v1/tasks", data=body,
                          headers={"Content-Type": "application/yaml"}, timeout=10)
    assert reply.status_code == 400, reply.text
    assert reply.json()["field"] == "body"
    assert "line 4, column 1" in reply.json()["detail"] and "line 3, column 9" in reply.json()["detail"]
    (tmp_path / "bad.yaml").write_text(body)
    cli = subprocess.run([sys.executable, "-m", "cli.main", "submit", str(tmp_path / "bad.yaml")], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert cli.returncode == 2 and "line 4, column 1" in cli.stderr, cli.stderr


def meshq(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "REDIS_URL": redis_url})


def test_workers_json_into_head_and_memory_in_human_units(worker_factory, redis_url: str) -> None:
    """``meshq workers --json | head`` ends quietly when head stops reading; memory that a binary
    unit divides exactly is still shown as people read it (23.5Gi, not 24683784Ki)."""
    worker_factory(worker_id="roomy", env={"MESHQ_FAKE_HARDWARE": json.dumps({"memory_total_bytes": 24683784 * 1024})})
    read_end, write_end = os.pipe()
    os.close(read_end)  # as when head has read its lines and gone: the next write gets EPIPE
    try:
        piped = subprocess.run([sys.executable, "-m", "cli.main", "workers", "--json"], cwd=ROOT,
                               stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60,
                               env={**os.environ, "REDIS_URL": redis_url})
    finally:
        os.close(write_end)
    assert piped.returncode == 0 and piped.stderr == "", piped.stderr
    listed = meshq(redis_url, "workers")
    line = next(row for row in listed.stdout.splitlines() if row.startswith("roomy "))
    assert ", 23.5Gi" in line and "Ki" not in line, line


def test_health_says_not_alive_soon_after_a_sigkill(worker_factory, redis_client: redis.Redis,
                                                    redis_url: str) -> None:
    """The heartbeat key outlives a killed worker by its TTL (120 s here); health compares the last
    beat with the worker's interval (1 s) instead, so a probe sees the death within seconds."""
    worker = worker_factory(worker_id="probed")
    alive = meshq(redis_url, "health", "--worker", "probed")
    assert alive.returncode == 0 and "probed: alive" in alive.stdout, alive.stdout + alive.stderr
    worker.kill()
    verdicts: list[subprocess.CompletedProcess[str]] = []
    wait_for(lambda: verdicts.append(meshq(redis_url, "health", "--worker", "probed")) or
             verdicts[-1].returncode == 1, timeout_s=40, interval_s=1)
    assert "not alive (last heartbeat" in verdicts[-1].stdout and "beats every 1s" in verdicts[-1].stdout
    assert redis_client.ttl("worker:probed:hb") > 60  # the key itself is still there


def test_meshq_purge_empties_tag_capability_and_default_queues(worker_factory, redis_client: redis.Redis,
                                                              redis_url: str) -> None:
    """``celery purge`` knows only the default queue; ``meshq purge`` finds meshq's own queues (a tag
    nobody has, a recorded capability queue, the default one) and empties them all."""
    from tasks.submit import submit_task

    worker = worker_factory(worker_id="purger")
    worker.terminate()  # no consumer: the messages wait
    tag = submit_task({"taskType": "echo", "tags": ["purge-me"]})
    need = submit_task({"taskType": "echo", "resources": {"hardware": {"cpu": 999}}})
    default = submit_task({"taskType": "echo"})
    queues = (tag.queue, need.queue, default.queue)
    assert [redis_client.llen(q) for q in queues] == [1, 1, 1]
    celery_purge = subprocess.run([sys.executable, "-m", "celery", "-A", "app", "purge", "-f"], cwd=ROOT,
                                  capture_output=True, text=True, timeout=60, env={**os.environ, "REDIS_URL": redis_url})
    assert celery_purge.returncode == 0, celery_purge.stderr
    assert [redis_client.llen(q) for q in queues[:2]] == [1, 1]  # Celery's purge knows the default queue only
    purged = meshq(redis_url, "purge", "-f")
    assert purged.returncode == 0, purged.stderr
    assert [redis_client.llen(q) for q in queues] == [0, 0, 0]
    assert f"{tag.queue}: 1 message(s) purged" in purged.stdout and f"{need.queue}: 1 message(s) purged" in purged.stdout
