"""Unknown ids are "not found" (CLI exit 2, HTTP 404); a queued task that no worker started is PENDING."""

from __future__ import annotations

import os
import subprocess
import sys

import redis
import requests

from tests.conftest import ROOT

QUEUE_NOBODY_CONSUMES = "tasks.nobody-consumes-this"


def meshq(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, env=dict(os.environ),
                          capture_output=True, text=True, timeout=60)


def queued_echo_task() -> str:
    """A meshq task published with plain Celery to a queue no worker consumes: it stays queued."""
    from tasks import echo

    return str(echo.apply_async(args=[{"taskType": "echo", "data": {}}], queue=QUEUE_NOBODY_CONSUMES).id)


def test_cli_unknown_id_is_not_found_and_a_queued_task_is_pending(redis_client: redis.Redis) -> None:
    for command in ("cancel", "status"):
        done = meshq(command, "nosuchid")
        assert done.returncode == 2, (command, done.stdout, done.stderr)
        assert "nosuchid: not found" in done.stderr, done.stderr
    task_id = queued_echo_task()
    status = meshq("status", task_id, "--json")
    assert status.returncode == 1, status.stderr  # not finished
    assert '"state": "PENDING"' in status.stdout
    cancel = meshq("cancel", task_id)
    assert cancel.returncode == 0, cancel.stderr
    assert f"cancel requested for task {task_id}" in cancel.stdout
    assert redis_client.exists(f"meshq:task:{task_id}:cancel")  # it will end REVOKED, never run


def test_http_unknown_id_is_404_and_a_queued_task_is_pending(redis_client: redis.Redis, server_factory) -> None:
    server = server_factory()
    api = f"{server.base_url}/api/v1/tasks"
    for reply in (requests.get(f"{api}/nope", timeout=10), requests.post(f"{api}/nope/cancel", timeout=10)):
        assert reply.status_code == 404, reply.text
        assert reply.json()["field"] == "task_id" and "nope" in reply.json()["detail"]
    task_id = queued_echo_task()
    reply = requests.get(f"{api}/{task_id}", timeout=10)
    assert reply.status_code == 200 and reply.json()["state"] == "PENDING", reply.text
    # A task submitted over HTTP (one-stage pipeline record) is known before any worker sees it.
    submitted = requests.post(api, json={"spec": {"taskType": "echo", "tags": ["nobody-has-this-tag"],
                                                  "data": {}}}, timeout=10).json()
    reply = requests.get(f"{api}/{submitted['id']}", timeout=10)
    assert reply.status_code == 200 and reply.json()["state"] == "PENDING", reply.text
    cancelled = requests.post(f"{api}/{submitted['id']}/cancel", timeout=10)
    assert cancelled.status_code == 200 and cancelled.json()["cancel_requested"] is True, cancelled.text
