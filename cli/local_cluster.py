"""Start a throw-away meshq deployment on this machine: embedded Redis, workers, server.

Used by ``meshq demo`` and the benchmarks; everything started is stopped by
``close()`` (or on leaving the ``with`` block), even after an error.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from app.core import keys
from app.core.errors import MeshqError
from app.core.redis_address import MASTER_VARIABLE
from app.core.redis_client import new_client
from cli.embedded_redis import EmbeddedRedis

READY_TIMEOUT_S = 120.0


class LocalCluster:
    def __init__(self, workdir: str | Path, redis_url: str | None = None) -> None:
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.redis_server: EmbeddedRedis | None = None
        self.redis_url = redis_url or ""
        self.processes: list[tuple[str, subprocess.Popen[bytes]]] = []

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start_redis(self) -> str:
        if not self.redis_url:
            self.redis_server = EmbeddedRedis().start()
            self.redis_url = self.redis_server.url
        return self.redis_url

    def env(self, **extra: str) -> dict[str, str]:
        env = {**os.environ, "REDIS_URL": self.redis_url, "PYTHONUNBUFFERED": "1"}
        env.update(extra)
        return env

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "wb")
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   cwd=self.workdir, start_new_session=True)
        log.close()
        self.processes.append((name, process))
        return process

    def start_worker(self, worker_id: str, tags: str = "", results_dir: str | Path | None = None,
                     extra_env: dict[str, str] | None = None, wait: bool = True) -> subprocess.Popen[bytes]:
        results = Path(results_dir or self.workdir / f"results-{worker_id}")
        env = self.env(WORKER_ID=worker_id, WORKER_TAGS=tags, RESULTS_DIR=str(results),
                       MESHQ_LOG_FILE=str(self.workdir / f"worker-{worker_id}.log"),
                       **(extra_env or {}))
        process = self.spawn(f"worker-{worker_id}-stdout",
                             [sys.executable, "-m", "celery", "-A", "app", "worker", "--loglevel", "INFO",
                              "--without-mingle", "--without-gossip"], env)
        if wait:
            self.wait_worker(worker_id, process)
        return process

    def start_server(self, results_dir: str | Path | None = None, port: int | None = None,
                     extra_env: dict[str, str] | None = None) -> str:
        """Run ``meshq serve`` on a loopback port; returns its base URL once ``/healthz`` answers."""
        import urllib.error
        import urllib.request

        from cli.embedded_redis import free_port

        port = port or free_port()
        results = Path(results_dir or self.workdir / "results-server")
        env = self.env(MESHQ_LOG_FILE=str(self.workdir / "server.log"), **(extra_env or {}))
        process = self.spawn("server-stdout", [sys.executable, "-m", "cli.main", "serve", "--host", "127.0.0.1",
                                               "--port", str(port), "--results-dir", str(results)], env)
        base_url = f"http://127.0.0.1:{port}"
        token = env.get("ORCHESTRATOR_TOKEN", "")
        request = urllib.request.Request(f"{base_url}/healthz",
                                         headers={"Authorization": f"Bearer {token}"} if token else {})
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if process.poll() is not None:
                log = (self.workdir / "server-stdout.log").read_text(errors="replace")
                raise MeshqError(f"meshq serve exited during start-up:\n{log[-3000:]}")
            try:
                with urllib.request.urlopen(request, timeout=1) as reply:
                    if reply.status == 200:
                        return base_url
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise MeshqError(f"meshq serve not ready after {READY_TIMEOUT_S}s")
            time.sleep(0.2)

    def wait_worker(self, worker_id: str, process: subprocess.Popen[bytes]) -> None:
        client = new_client(self.redis_url, os.environ.get(MASTER_VARIABLE, "").strip())
        deadline = time.monotonic() + READY_TIMEOUT_S
        try:
            while client.hget(keys.worker_hash(worker_id), "status") != "IDLE":
                if process.poll() is not None:
                    log = (self.workdir / f"worker-{worker_id}-stdout.log").read_text(errors="replace")
                    raise MeshqError(f"worker {worker_id} exited during start-up:\n{log[-3000:]}")
                if time.monotonic() > deadline:
                    raise MeshqError(f"worker {worker_id} not ready after {READY_TIMEOUT_S}s")
                time.sleep(0.2)
        finally:
            client.close()

    def close(self) -> None:
        for _name, process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for _name, process in reversed(self.processes):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.processes.clear()
        if self.redis_server is not None:
            self.redis_server.stop()
            self.redis_server = None
