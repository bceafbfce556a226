"""Flower against the test Redis: meshq workers, tasks and progress are visible."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from cli.embedded_redis import free_port
from tests.conftest import ROOT, terminate_group, wait_for

DOCS = ROOT / "docs"
# The browser test refreshes the screenshots in docs/ only when asked; otherwise a test run would
# rewrite tracked files in the checkout it runs from.
REFRESH_SCREENSHOTS = os.environ.get("MESHQ_REFRESH_SCREENSHOTS") == "1"
AUTH = ("meshq", "flower-test")  # Flower's API needs auth (or FLOWER_UNAUTHENTICATED_API)
# The same runtime buckets as `make flower`: long LLM tasks need buckets up to hours.
BUCKETS = "1,5,15,60,300,900,1800,3600,7200,14400,43200"


@pytest.fixture
def flower(redis_url: str, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    log = open(tmp_path / "flower.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "app", "flower", f"--port={port}", "--address=127.0.0.1",
         f"--basic-auth={AUTH[0]}:{AUTH[1]}", f"--task_runtime_metric_buckets={BUCKETS}"],
        cwd=ROOT, env={**os.environ, "REDIS_URL": redis_url}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            pytest.fail("flower exited:\n" + (tmp_path / "flower.log").read_text())
        try:
            return requests.get(f"{base}/healthcheck", timeout=1, auth=AUTH).ok
        except requests.ConnectionError:
            return False

    try:
        wait_for(up, 60, message="flower to answer")
        yield base
    finally:
        terminate_group(proc)
        log.close()


def test_flower_shows_workers_and_task_progress(flower: str, worker_factory) -> None:
    from tasks import echo

    worker = worker_factory("gpu", worker_id="flower-w")
    node = f"meshq-{worker.worker_id}@"

    def listed() -> bool:
        workers = requests.get(f"{flower}/api/workers", params={"refresh": "true"}, timeout=10,
                               auth=AUTH).json()
        return any(name.startswith(node) for name in workers)

    wait_for(listed, 30, interval_s=0.5, message="the worker in /api/workers")

    result = echo.apply_async(args=[{"taskType": "echo", "data": {}, "echo": {"sleep_s": 4, "steps": 8}}])
    states: list[str] = []

    def task_state() -> str | None:
        tasks = requests.get(f"{flower}/api/tasks", timeout=10, auth=AUTH).json()
        state = tasks.get(result.id, {}).get("state")
        if state and (not states or states[-1] != state):
            states.append(state)
        return state

    wait_for(lambda: task_state() == "SUCCESS", 60, interval_s=0.2, message="SUCCESS in /api/tasks")
    assert "PROGRESS" in states, states
    assert states.index("PROGRESS") < states.index("SUCCESS")
    info = requests.get(f"{flower}/api/task/info/{result.id}", timeout=10, auth=AUTH).json()
    assert info["worker"].startswith(node)
    metrics = requests.get(f"{flower}/metrics", timeout=10, auth=AUTH).text
    assert 'flower_task_runtime_seconds_bucket{' in metrics and 'le="14400.0"' in metrics


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="BROWSER TEST NOT RUN: no Chromium on this machine "
                    "(apt-get install chromium; .ci/run does)")
def test_flower_worker_page_in_headless_chromium(flower: str, worker_factory, tmp_path: Path) -> None:
    worker = worker_factory(worker_id="browser-w")
    workers = wait_for(lambda: [n for n in requests.get(f"{flower}/api/workers", params={"refresh": "true"},
                                                        timeout=10, auth=AUTH).json() if "browser-w" in n],
                       30, interval_s=0.5, message="the worker in /api/workers")
    node = workers[0]
    url = f"{flower}/worker/{node}".replace("http://", f"http://{AUTH[0]}:{AUTH[1]}@")
    flags = [CHROMIUM or "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
             "--window-size=1280,900"]
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert node in dom.stdout, dom.stderr[-2000:]
    assert worker.worker_id in dom.stdout
    shots = DOCS if REFRESH_SCREENSHOTS else tmp_path
    shot = shots / "flower-worker.png"
    subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True, text=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10_000

    # A running task's page shows PROGRESS with its step (the Result row); after meshq cancel, REVOKED.
    from tasks import echo
    from tasks.control import cancel_task

    task = echo.apply_async(args=[{"taskType": "echo", "data": {}, "echo": {"sleep_s": 60, "steps": 120}}])
    wait_for(lambda: requests.get(f"{flower}/api/task/info/{task.id}", timeout=10, auth=AUTH).json()
             .get("state") == "PROGRESS" if requests.get(f"{flower}/api/task/info/{task.id}", timeout=10,
                                                          auth=AUTH).ok else False,
             60, interval_s=0.3, message="PROGRESS in Flower")
    task_url = f"{flower}/task/{task.id}".replace("http://", f"http://{AUTH[0]}:{AUTH[1]}@")
    dom = subprocess.run([*flags, "--dump-dom", task_url], capture_output=True, text=True, timeout=120).stdout
    assert "PROGRESS" in dom and "'step': " in dom and "'total_steps': 120" in dom, dom[-3000:]
    shot = shots / "flower-task.png"
    subprocess.run([*flags, f"--screenshot={shot}", task_url], capture_output=True, text=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10_000
    cancel_task(task.id)
    wait_for(lambda: requests.get(f"{flower}/api/task/info/{task.id}", timeout=10, auth=AUTH).json()
             .get("state") == "REVOKED", 30, interval_s=0.3, message="REVOKED in Flower")
    dom = subprocess.run([*flags, "--dump-dom", task_url], capture_output=True, text=True, timeout=120).stdout
    assert "REVOKED" in dom and "PROGRESS" not in dom, dom[-3000:]


SECRET = "Bearer s3cret-token-for-the-orchestrator"


def test_secrets_in_specs_never_reach_flower_events_or_stored_results(flower: str, worker_factory,
                                                                       redis_client) -> None:
    """A spec's ``output.destination.headers`` and presigned URLs are redacted in Flower (events),
    ``inspect active`` and every key in Redis once the task ran (result_extended, pipeline record)."""
    from app.celery import app
    from pipelines import Pipeline

    worker_factory(worker_id="secret-w")
    destination = {"type": "local", "url": "https://h.example/x?X-Amz-Signature=s3cret-sig",
                   "headers": {"Authorization": SECRET}}
    document = {"spec": {"taskType": "echo", "data": {"hello": "world"}, "echo": {"sleep_s": 3, "steps": 6},
                         "output": {"destination": destination}}}
    run = Pipeline.from_dict(document).submit()
    task_id = run.stages[0]["task_id"]
    node = wait_for(lambda: next((n for n, active in (app.control.inspect(timeout=1).active() or {}).items()
                                  if any(t["id"] == task_id for t in active)), None), 30,
                    message="the task in inspect active")
    active = app.control.inspect(destination=[node], timeout=5).active()[node]
    shown = str(active)
    assert "'hello': 'world'" in shown and "s3cret" not in shown, shown
    run.wait(timeout=60)

    def flower_task() -> dict:
        info = requests.get(f"{flower}/api/task/info/{task_id}", timeout=10, auth=AUTH)
        return info.json() if info.ok and info.json().get("state") == "SUCCESS" else {}

    info = wait_for(flower_task, 30, interval_s=0.3, message="the task's SUCCESS in Flower")
    listed = requests.get(f"{flower}/api/tasks", timeout=10, auth=AUTH).json()[task_id]
    for view in (info, listed):
        assert "'hello': 'world'" in str(view["args"]) and "s3cret" not in json.dumps(view), view
    stored = app.backend.get_task_meta(task_id)
    assert stored["status"] == "SUCCESS"
    assert stored["args"][0]["output"]["destination"] == {**destination, "url": "https://h.example/x?…",
                                                          "headers": {"Authorization": "[redacted]"}}
    leaks = [key for key in redis_client.scan_iter() if "s3cret" in json.dumps(dump_key(redis_client, key))]
    assert not leaks, leaks


def dump_key(client, key: str):
    kind = client.type(key)
    return {"string": client.get, "hash": client.hgetall, "list": lambda k: client.lrange(k, 0, -1),
            "set": client.smembers, "zset": lambda k: client.zrange(k, 0, -1)}.get(kind, lambda k: None)(key) \
        if kind != "set" else sorted(client.smembers(key))


class CeleryEvents:
    """Celery's own events (what Flower and ``celery events`` receive), captured in a thread."""

    def __init__(self, app) -> None:
        self.app = app
        self.events: list[dict] = []
        self.receiver = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        wait_for(lambda: self.receiver is not None, 10, message="the event receiver")

    def _run(self) -> None:
        with self.app.connection_for_read() as connection:
            self.receiver = self.app.events.Receiver(connection, handlers={"*": self.events.append})
            self.receiver.capture(limit=None, timeout=None, wakeup=True)

    def of(self, task_id: str, type_: str) -> list[dict]:
        return [e for e in list(self.events) if e.get("uuid") == task_id and e["type"] == type_]

    def close(self) -> None:
        if self.receiver is not None:
            self.receiver.should_stop = True
        self._thread.join(timeout=15)


def test_cancel_and_terminate_end_revoked_in_flower_with_a_task_revoked_event(flower: str, worker_factory,
                                                                               redis_client) -> None:
    """``meshq cancel`` and ``celery control terminate`` of a task in PROGRESS: Flower shows REVOKED
    (not PROGRESS), a ``task-revoked`` event went out (with the reason), /metrics counts both,
    and progress was on the task (Flower's Result) while it ran."""
    from app.celery import app
    from tasks import echo
    from tasks.control import cancel_task
    from tests.test_pipeline import TaskEvents

    celery_events, meshq_events = CeleryEvents(app), TaskEvents(redis_client)
    try:
        worker_factory(worker_id="rev-w")
        spec = {"taskType": "echo", "data": {}, "echo": {"sleep_s": 60, "steps": 120}}

        def in_flower(task_id: str) -> dict:
            reply = requests.get(f"{flower}/api/task/info/{task_id}", timeout=10, auth=AUTH)
            return reply.json() if reply.ok else {}

        def progressing(task_id: str) -> dict:
            return wait_for(lambda: (lambda t: t if t.get("state") == "PROGRESS" and "'step':" in str(t.get("result"))
                                     else None)(in_flower(task_id)), 60, interval_s=0.3,
                            message=f"{task_id} in PROGRESS with its step in Flower")

        cancelled = echo.apply_async(args=[spec])
        progressing(cancelled.id)
        cancel_task(cancelled.id)
        wait_for(lambda: in_flower(cancelled.id).get("state") == "REVOKED", 30, interval_s=0.3,
                 message="REVOKED in Flower after meshq cancel")
        revoked = wait_for(lambda: celery_events.of(cancelled.id, "task-revoked"), 10, message="task-revoked")
        assert "cancelled at step" in revoked[0]["reason"] and revoked[0]["terminated"] is False, revoked

        terminated = echo.apply_async(args=[spec])
        progressing(terminated.id)
        app.control.revoke(terminated.id, terminate=True)
        wait_for(lambda: in_flower(terminated.id).get("state") == "REVOKED", 30, interval_s=0.3,
                 message="REVOKED in Flower after celery control terminate")
        assert celery_events.of(terminated.id, "task-revoked")[0]["terminated"] is True
        # The worker's record and meshq's own events agree: the task ended, the worker is free.
        wait_for(lambda: redis_client.hget("worker:rev-w", "last_task") == terminated.id, 15,
                 message="the worker's record to end the terminated task")
        assert redis_client.hget("worker:rev-w", "status") == "IDLE"
        assert meshq_events.for_task(terminated.id)[-1] == "TASK_FAILED"
        assert echo.apply_async(args=[{"taskType": "echo", "data": {}}]).get(timeout=60)["echo"]["data"] == {}
    finally:
        celery_events.close()
        meshq_events.close()
    metrics = requests.get(f"{flower}/metrics", timeout=10).text
    revoked_lines = [line for line in metrics.splitlines()
                     if line.startswith("flower_events_total{") and 'type="task-revoked"' in line]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in revoked_lines) == 2, revoked_lines


def test_flower_metrics_answer_without_auth_while_the_api_needs_it(flower: str) -> None:
    """As docs/MONITORING.md says: Flower 2.2 exempts /metrics (and /healthcheck) from --basic-auth."""
    assert requests.get(f"{flower}/api/workers", timeout=10).status_code == 401
    assert requests.get(f"{flower}/metrics", timeout=10).status_code == 200


def test_flower_api_on_a_running_task_is_what_monitoring_md_says(flower: str, worker_factory) -> None:
    """MONITORING.md's reply of ``/api/task/result/<id>`` for a running task is Flower 2.2's own
    (no ``result`` until the task ends); the progress is in ``/api/task/info/<id>``."""
    import re

    from tasks import echo

    text = (ROOT / "docs" / "MONITORING.md").read_text()
    documented = re.search(r'`/api/task/result/<id>` answers `(\{[^`]*\})` while the task runs', text)
    assert documented, "MONITORING.md does not say what /api/task/result answers for a running task"
    worker_factory(worker_id="flower-progress")
    task = echo.apply_async(args=[{"taskType": "echo", "echo": {"sleep_s": 20, "steps": 40}}])

    def info() -> dict[str, Any]:
        return requests.get(f"{flower}/api/task/info/{task.id}", timeout=10, auth=AUTH).json()

    wait_for(lambda: info().get("state") == "PROGRESS" and "step" in str(info().get("result")), 60,
             interval_s=0.2, message="PROGRESS with its fields in /api/task/info")
    running = requests.get(f"{flower}/api/task/result/{task.id}", timeout=10, auth=AUTH).json()
    assert running["state"] == "PROGRESS" and set(running) == set(json.loads(documented.group(1)))
    task.get(timeout=60)
    finished = requests.get(f"{flower}/api/task/result/{task.id}", timeout=10, auth=AUTH).json()
    assert finished["state"] == "SUCCESS" and finished["result"]["task_id"] == task.id
