"""``celery -A app worker`` as the README starts it: LOG_LEVEL applied, one log file per worker,
bad RESULTS_DIR and concurrency above one refused at start-up, ``pool_grow`` refused at run time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import redis

from tests.conftest import ROOT, wait_for


def plain_worker(worker_id: str, cwd: Path, redis_url: str, **env: str) -> subprocess.Popen[str]:
    """``celery -A app worker`` with no --loglevel and no MESHQ_LOG_FILE, as a newcomer runs it."""
    full_env = {k: v for k, v in os.environ.items() if k != "MESHQ_LOG_FILE"}
    full_env.update({"REDIS_URL": redis_url, "WORKER_ID": worker_id, "RESULTS_DIR": str(cwd / "results"),
                     "HEARTBEAT_INTERVAL_SEC": "1", "PYTHONPATH": str(ROOT), **env})
    return subprocess.Popen([sys.executable, "-m", "celery", "-A", "app", "worker", "--without-mingle",
                             "--without-gossip"], cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def stop(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    return out


def test_log_level_applies_and_each_worker_has_its_own_log_file(redis_client: redis.Redis, redis_url: str,
                                                                 tmp_path: Path) -> None:
    workers = {wid: plain_worker(wid, tmp_path, redis_url, LOG_LEVEL="INFO") for wid in ("log-a", "log-b")}
    try:
        for wid, proc in workers.items():
            def ready(wid: str = wid, proc: subprocess.Popen[str] = proc) -> bool:
                assert proc.poll() is None, proc.communicate()[0]
                return redis_client.hget(f"worker:{wid}", "status") == "IDLE"

            wait_for(ready, 60, message=f"{wid} IDLE")
        wait_for(lambda: all(f"meshq-{w}@" in (tmp_path / f"worker-{w}.log").read_text() for w in workers),
                 30, message="each worker's log file")
    finally:
        outputs = {wid: stop(proc) for wid, proc in workers.items()}
    assert not (tmp_path / "worker.log").exists()
    for wid, out in outputs.items():
        own = (tmp_path / f"worker-{wid}.log").read_text()
        other = "log-b" if wid == "log-a" else "log-a"
        assert f"meshq-{wid}@" in own and " ready." in own, own
        assert f"meshq-{other}@" not in own
        assert " ready." in out, out  # the console too, at INFO without --loglevel


def test_an_unwritable_results_dir_is_refused_at_start_up(worker_factory) -> None:
    worker = worker_factory(results_dir=Path("/proc/meshq-not-writable"), wait=False)
    assert worker.process.wait(timeout=60) == 2
    log = worker.log()
    assert "RESULTS_DIR: '/proc/meshq-not-writable' is not a writable directory" in log, log


def test_concurrency_above_one_is_refused_at_start_up(worker_factory) -> None:
    for args, variable in ((["-c", "2"], "--concurrency"), (["--autoscale", "2,1"], "--autoscale")):
        worker = worker_factory(extra_args=args, wait=False)
        assert worker.process.wait(timeout=60) == 2, worker.log()
        assert f"{variable}: " in worker.log() and "one task at a time" in worker.log(), worker.log()


def test_a_pool_other_than_prefork_is_refused_at_start_up(worker_factory) -> None:
    """``-P threads`` (or solo) would run tasks in the main process, beside the heartbeat, with no
    child to watch or kill: refused with a message, as ``-c 2`` is."""
    for args, name in ((["-P", "threads"], "'threads'"), (["--pool=solo"], "'solo'")):
        worker = worker_factory(extra_args=args, wait=False)
        assert worker.process.wait(timeout=60) == 2, worker.log()
        assert f"--pool: {name} asked" in worker.log() and "prefork pool" in worker.log(), worker.log()


def test_pool_grow_is_refused_and_the_pool_keeps_one_process(worker_factory) -> None:
    from app.celery import app

    worker = worker_factory(worker_id="grow-w")
    node = wait_for(lambda: next((n for reply in app.control.ping(timeout=1) for n in reply
                                  if n.startswith("meshq-grow-w@")), None), 30, message="the worker's ping")
    replies = app.control.pool_grow(1, reply=True, destination=[node], timeout=5)
    assert replies and "one task at a time" in replies[0][node]["error"], replies
    stats = app.control.inspect(destination=[node], timeout=5).stats()
    assert len(stats[node]["pool"]["processes"]) == 1, stats
    assert worker.alive()
