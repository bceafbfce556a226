"""What a newcomer sees on the command line and the HTTP API: each message once, naming what to fix."""

from __future__ import annotations

import fcntl
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

from tests.conftest import ROOT

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
    code, screen = run_in_terminal([sys.executable, "-m", "app.cli.main", "submit", str(spec), "--wait"],
                                   dict(os.environ))
    assert code == 0, "\n".join(screen)
    finals = [line for line in screen if line.startswith(("pipeline ", "task ")) and line.endswith(": SUCCESS")]
    assert len(finals) == 1, "\n".join(screen)


def test_workers_names_the_redis_it_asked_without_credentials(redis_client: redis.Redis, redis_url: str) -> None:
    done = subprocess.run([sys.executable, "-m", "app.cli.main", "workers"], cwd=ROOT,
                          env={**os.environ, "REDIS_URL": redis_url}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"no live workers in Redis {redis_url}" in done.stdout
    down = subprocess.run([sys.executable, "-m", "app.cli.main", "workers"], cwd=ROOT, capture_output=True,
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
    cli = subprocess.run([sys.executable, "-m", "app.cli.main", "submit", str(tmp_path / "bad.yaml")], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert cli.returncode == 2 and "line 4, column 1" in cli.stderr, cli.stderr
