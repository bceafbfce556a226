"""Shared fixtures: a real Redis (``REDIS_URL`` or the embedded server) and real workers.

The test process itself is a Celery client: ``REDIS_URL`` is set before
``app.celery`` is imported, so the client and the worker subprocesses share it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from cli.embedded_redis import EmbeddedRedis

ROOT = Path(__file__).resolve().parent.parent
_embedded: EmbeddedRedis | None = None


def pytest_configure(config: pytest.Config) -> None:
    """Start the embedded Redis before any test module imports the Celery app."""
    global _embedded
    if not os.environ.get("REDIS_URL"):
        _embedded = EmbeddedRedis().start()
        os.environ["REDIS_URL"] = _embedded.url
        os.environ["MESHQ_TEST_EMBEDDED_REDIS"] = "1"
    os.environ.setdefault("HEARTBEAT_INTERVAL_SEC", "1")
    os.environ.setdefault("MESHQ_LOG_FILE", os.devnull)
    # Tests keep their datasets and checkpoints in pytest's temporary directories: a data root
    # for the in-process executors and every worker started here (app.core.data_roots).
    os.environ["MESHQ_DATA_DIRS"] = os.pathsep.join(
        filter(None, [os.environ.get("MESHQ_DATA_DIRS", ""), str(temp_root_of(config))]))


def temp_root_of(config: pytest.Config) -> Path:
    """The directory every ``tmp_path`` of this session lies under."""
    if config.option.basetemp:
        return Path(config.option.basetemp).resolve()
    import getpass
    import tempfile

    try:
        user = getpass.getuser()
    except (ImportError, KeyError, OSError):
        user = "unknown"
    return (Path(os.environ.get("PYTEST_DEBUG_TEMPROOT") or tempfile.gettempdir()) / f"pytest-of-{user}").resolve()


def pytest_unconfigure(config: pytest.Config) -> None:
    if _embedded is not None:
        _embedded.stop()


@pytest.fixture(scope="session")
def redis_url() -> str:
    return os.environ["REDIS_URL"]


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client on a freshly flushed database (each test starts from nothing)."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushdb()
    yield client
    client.close()


def wait_for(predicate: Callable[[], Any], timeout_s: float = 30.0, interval_s: float = 0.1,
             message: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {message}")
        time.sleep(interval_s)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ~1M-parameter tiny Llama model, built once per test session."""
    from cli.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model", size="test")


@contextlib.contextmanager
def http_server(handler: Any) -> Iterator[str]:
    """A throw-away threaded HTTP server on loopback for ``handler``; yields its base URL."""
    import http.server

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def terminate_group(process: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """SIGTERM a process group started with ``start_new_session``; SIGKILL it if it lingers."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


class PrivateRedis:
    """An embedded Redis of one test's own, which the test may kill and restart on the same port."""

    def __init__(self) -> None:
        from cli.embedded_redis import EmbeddedRedis, free_port

        self._factory = EmbeddedRedis
        self.port = free_port()
        self.server = EmbeddedRedis(port=self.port).start()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.client = redis.Redis.from_url(self.url, decode_responses=True)

    def restart(self, down_s: float) -> None:
        """Stop, stay down ``down_s`` seconds, start again empty (it keeps nothing)."""
        self.server.stop()
        time.sleep(down_s)
        self.server = self._factory(port=self.port).start()

    def worker(self, worker_id: str, tmp_path: Path) -> WorkerProcess:
        env = {**os.environ, "REDIS_URL": self.url, "WORKER_ID": worker_id, "HEARTBEAT_INTERVAL_SEC": "1",
               "RESULTS_DIR": str(tmp_path / "results"), "MESHQ_LOG_FILE": str(tmp_path / "worker.log")}
        return WorkerProcess(worker_id, env, ROOT, tmp_path / "stdout.log", [])

    def close(self) -> None:
        self.client.close()
        self.server.stop()


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    yield server
    server.close()


class WorkerProcess:
    """A real ``celery -A app worker`` subprocess."""

    def __init__(self, worker_id: str, env: dict[str, str], cwd: Path, log_path: Path,
                 extra_args: list[str], python: str | None = None) -> None:
        self.worker_id = worker_id
        self.env = env
        self.log_path = log_path
        self.results_dir = Path(env["RESULTS_DIR"])
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            [python or sys.executable, "-m", "celery", "-A", "app", "worker", "--loglevel", "INFO",
             "--without-mingle", "--without-gossip", *extra_args],
            cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_ready(self, client: redis.Redis, timeout_s: float = 60.0) -> None:
        def ready() -> bool:
            if not self.alive():
                pytest.fail(f"worker {self.worker_id} exited:\n{self.log()[-4000:]}")
            return client.hget(f"worker:{self.worker_id}", "status") == "IDLE"

        wait_for(ready, timeout_s, message=f"worker {self.worker_id} to be IDLE")

    def terminate(self, timeout_s: float = 30.0) -> int:
        """Graceful (warm) shutdown, as ``kill -TERM``."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL the whole process group (the pool child too), as a crash would."""
        if self.alive():
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def close(self) -> None:
        if self.alive():
            self.terminate(timeout_s=10)
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # leftover pool children
        except ProcessLookupError:
            pass
        self._log.close()


@pytest.fixture
def worker_factory(redis_client: redis.Redis, redis_url: str, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """``worker_factory(tags="gpu", results_dir=..., env={...})`` starts a ready worker
    (``python=``: from another environment's interpreter, e.g. ``.venv`` beside ``.venv-vllm``)."""
    started: list[WorkerProcess] = []

    def start(tags: str = "", *, worker_id: str | None = None, results_dir: Path | None = None,
              env: dict[str, str] | None = None, extra_args: list[str] | None = None,
              wait: bool = True, python: str | None = None) -> WorkerProcess:
        worker_id = worker_id or f"w{len(started)}-{secrets.token_hex(3)}"
        base = tmp_path / f"worker-{worker_id}"
        base.mkdir(parents=True, exist_ok=True)
        full_env = {**os.environ, "REDIS_URL": redis_url, "WORKER_ID": worker_id,
                    "WORKER_TAGS": tags, "HEARTBEAT_INTERVAL_SEC": "1",
                    "RESULTS_DIR": str(results_dir or base / "results"),
                    "MESHQ_LOG_FILE": str(base / "worker.log"), "PYTHONUNBUFFERED": "1"}
        full_env.update(env or {})
        worker = WorkerProcess(worker_id, full_env, ROOT, base / "stdout.log", extra_args or [], python)
        started.append(worker)
        if wait:
            worker.wait_ready(redis_client)
        return worker

    yield start
    for worker in started:
        worker.close()


class ServerProcess:
    """A real ``python -m cli.main serve`` subprocess on a loopback port (the orchestrator)."""

    def __init__(self, port: int, results_dir: Path, env: dict[str, str], log_path: Path,
                 token: str | None) -> None:
        self.port = port
        self.results_dir = results_dir
        self.env = env
        self.log_path = log_path
        self.token = token
        self.base_url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen[bytes] | None = None

    def headers(self) -> dict[str, str]:
        """The ``Authorization`` header for this server's token (empty without one)."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout_s: float = 30.0) -> ServerProcess:
        """Start (or restart) on the same port and results directory; wait for ``/healthz``."""
        import urllib.error
        import urllib.request

        if self.alive():
            return self
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "cli.main", "serve", "--host", "127.0.0.1",
                 "--port", str(self.port), "--results-dir", str(self.results_dir)],
                cwd=ROOT, env=self.env, stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True)

        def ready() -> bool:
            if not self.alive():
                pytest.fail(f"server on port {self.port} exited:\n{self.log()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/healthz", timeout=1) as reply:
                    return bool(reply.status == 200)
            except (urllib.error.URLError, OSError):
                return False

        wait_for(ready, timeout_s, interval_s=0.1, message=f"server on port {self.port}")
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Graceful stop (SIGTERM), SIGKILL if it does not exit in time."""
        if self.process is not None and self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        if self.process is not None and self.alive():
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture
def server_factory(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """``server_factory(token=None, results_dir=None, env=None, port=None)`` starts a ready server."""
    from cli.embedded_redis import free_port

    started: list[ServerProcess] = []

    def start(token: str | None = None, results_dir: Path | None = None,
              env: dict[str, str] | None = None, port: int | None = None) -> ServerProcess:
        base = tmp_path / f"server-{len(started)}"
        base.mkdir(parents=True, exist_ok=True)
        results = Path(results_dir) if results_dir is not None else base / "results"
        full_env = {**os.environ, "REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1",
                    "MESHQ_LOG_FILE": str(base / "server.log")}
        full_env.pop("ORCHESTRATOR_TOKEN", None)
        if token:
            full_env["ORCHESTRATOR_TOKEN"] = token
        full_env.update(env or {})
        server = ServerProcess(port or free_port(), results, full_env, base / "stdout.log", token)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()
