"""``make bench`` never flushes a Redis it did not create and never uses production queue names."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import redis

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def dispatch_bench(*extra: str, env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "bench/dispatch.py", "--tasks", "3", "--rounds", "1", *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def queues_declared(client: redis.Redis) -> set[str]:
    """Queue names kombu bound in this database (``_kombu.binding.<exchange>`` members)."""
    names = set()
    for key in client.scan_iter("_kombu.binding.*"):
        for member in client.smembers(key):
            names.add(str(member).split("\x06\x16")[-1])
    return names


def test_bench_uses_a_private_redis_unless_told_and_never_flushes_the_given_one(redis_client: redis.Redis,
                                                                                  redis_url: str) -> None:
    redis_client.set("users-data", "must survive")
    # REDIS_URL exported (as the README tells users): ignored, a private Redis is used.
    out = dispatch_bench(env={**os.environ, "REDIS_URL": redis_url})
    assert "private, embedded" in out and out.count("; median ") == 2, out  # both meshq paths
    assert redis_client.get("users-data") == "must survive"
    assert not queues_declared(redis_client)  # nothing at all happened in the user's Redis

    # Told explicitly: it runs there, flushes nothing and uses queue names of its own.
    out = dispatch_bench("--redis-url", redis_url, env={k: v for k, v in os.environ.items() if k != "REDIS_URL"})
    assert "given, never flushed" in out, out
    assert redis_client.get("users-data") == "must survive"
    declared = queues_declared(redis_client)
    assert declared and all(name.startswith("meshq-bench-") for name in declared), declared
    assert "tasks" not in declared and "bare" not in declared
