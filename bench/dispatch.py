"""Dispatch overhead: N echo tasks through meshq vs N no-op tasks of a bare Celery app.

Same Redis, same worker settings (prefork, concurrency 1, prefetch 1, late acks,
JSON, events on), the same log level (WARNING) on both sides. Two meshq paths: a plain
``echo.apply_async`` and the public Python API (``Pipeline.from_dict(...).submit()``
for every task, then ``.wait()`` on every run). Prints throughput of each, the ratio to
bare Celery per round and its median, and p50/p99 submit→start latency. Target: both
meshq paths ≥ 0.9× bare Celery (issue 28; was 0.7), with 1 and 8 workers (``--workers 8``)
and the default worker command, mingle and gossip on (``--default-worker``).

The Redis is a private embedded one, whatever ``REDIS_URL`` says, unless ``--redis-url``
names one explicitly; the bench flushes only the database it created itself, and its
queues, worker id and bare-Celery queue have names of their own (``meshq-bench-<hex>``),
never a production queue.

Each echo task also creates its directory and two files, so a slow filesystem
under ``--results-dir`` shows in meshq's number (on the development VM, file
creation slowed 15× after heavy disk traffic); ``--results-dir /dev/shm`` takes
the disk out and leaves the dispatch overhead itself.

    python bench/dispatch.py [--tasks 2000] [--rounds 3] [--results-dir DIR] [--redis-url URL]
                             [--workers 8] [--default-worker]
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cli.embedded_redis import EmbeddedRedis  # noqa: E402

# The two ways users send work: Celery's own apply_async of a meshq task, and the public
# Python API (Pipeline.from_dict(...).submit() then .wait() on every run).
PATHS = ("apply_async", "pipeline")
LABELS = {"apply_async": "meshq apply_async", "pipeline": "meshq Pipeline.submit"}


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


# Worker command options (set from the command line): how many workers per side, and
# whether they run as ``celery worker`` does by default (mingle and gossip on) or without.
WORKERS = 1
QUIET_WORKER_OPTIONS = ["--without-mingle", "--without-gossip"]
WORKER_OPTIONS: list[str] = QUIET_WORKER_OPTIONS


def start_worker(app_name: str, env: dict[str, str], log: Path, name: str = "") -> subprocess.Popen[bytes]:
    node = ["-n", f"{name}@%h"] if name else []
    return subprocess.Popen([sys.executable, "-m", "celery", "-A", app_name, "worker", "--loglevel", "WARNING",
                             *WORKER_OPTIONS, *node],
                            cwd=ROOT, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


class Workers:
    """``WORKERS`` worker processes of one side, stopped together."""

    def __init__(self, processes: list[subprocess.Popen[bytes]]) -> None:
        self.processes = processes

    def terminate(self) -> None:
        for process in self.processes:
            process.terminate()

    def wait(self, timeout: float) -> None:
        for process in self.processes:
            process.wait(timeout=timeout)

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()

    def cpu_s(self) -> float:
        """CPU seconds (user + system) used so far by the workers and their pool processes: per
        task, a steadier figure than tasks/s on a shared machine, where neighbours move throughput."""
        total = 0.0
        for process in self.processes:
            try:
                parent = psutil.Process(process.pid)
                for member in (parent, *parent.children(recursive=True)):
                    times = member.cpu_times()
                    total += times.user + times.system
            except psutil.Error:  # a pool process replaced meanwhile: counted until it went
                continue
        return total


def stop(process: subprocess.Popen[bytes] | Workers) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def wait_worker_ready(app, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if len(app.control.ping(timeout=0.5)) >= WORKERS:
            return
    raise SystemExit("workers did not answer ping")


def filesystem_of(path: Path) -> str:
    """``type (mount point)`` of the filesystem holding ``path``, from /proc/mounts."""
    best = ("?", "")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _dev, mount, fstype, *_ = line.split()
            if str(path.resolve()).startswith(mount) and len(mount) >= len(best[1]):
                best = (fstype, mount)
    except OSError:
        pass
    return f"{best[0]} ({best[1] or '?'})"


def run_bare(n: int, env: dict[str, str], workdir: Path) -> dict[str, float]:
    worker = Workers([start_worker("bench.bare_app", env, workdir / f"bare{i}.log", name=f"bare{i}-{secrets.token_hex(2)}")
                      for i in range(WORKERS)])
    try:
        from bench.bare_app import app

        wait_worker_ready(app)
        cpu_before = worker.cpu_s()
        elapsed, starts = send_bare_noop(n)
        cpu_ms = (worker.cpu_s() - cpu_before) * 1000 / n
    finally:
        stop(worker)
    return {"tasks_per_s": n / elapsed, "p50_ms": percentile(starts, 50) * 1000,
            "p99_ms": percentile(starts, 99) * 1000, "elapsed_s": elapsed, "worker_cpu_ms": cpu_ms}


def send_bare_noop(n: int) -> tuple[float, list[float]]:
    """Send ``n`` bare Celery no-op tasks at once, then await each: the seconds it took and each
    task's submit→start delay (the task returns its start time)."""
    from bench.bare_app import noop

    submitted: dict[str, float] = {}
    t0 = time.perf_counter()
    results = []
    for i in range(n):
        submitted_at = time.time()
        r = noop.apply_async(args=[{"i": i}])
        submitted[r.id] = submitted_at
        results.append(r)
    starts = [r.get(timeout=600)["started_at"] - submitted[r.id] for r in results]
    return time.perf_counter() - t0, starts


def send_meshq_echo(n: int, path: str = "apply_async") -> tuple[float, list[float]]:
    """Send ``n`` meshq echo tasks at once (``apply_async``, or the user's Python API:
    ``Pipeline.from_dict(...).submit()``), then await each: the seconds it took and each task's
    submit→start delay (its result's ``started_at``, as the bare no-op returns its start time:
    no extra process listening on the meshq side only)."""
    from pipelines import Pipeline
    from tasks import echo

    submitted: list[float] = []
    results: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    if path == "pipeline":  # the user's path: the public Python API, submit then wait
        runs = []
        for i in range(n):
            submitted.append(time.time())
            runs.append(Pipeline.from_dict({"taskType": "echo", "data": {"i": i}}).submit())
        for run in runs:
            (result,) = run.wait(timeout=600).values()
            results.append(result)
    else:
        sent = []
        for i in range(n):
            submitted.append(time.time())
            sent.append(echo.apply_async(args=[{"taskType": "echo", "data": {"i": i}}]))
        results = [r.get(timeout=600) for r in sent]
    elapsed = time.perf_counter() - t0
    return elapsed, [datetime.fromisoformat(result["started_at"]).timestamp() - at
                     for result, at in zip(results, submitted, strict=True)]


def run_meshq(n: int, env: dict[str, str], workdir: Path, results_dir: Path,
              path: str = "apply_async") -> dict[str, float]:
    worker_ids = [f"{env['TASK_TOPIC']}-w{i}" for i in range(WORKERS)]
    worker = Workers([start_worker("app", {**env, "WORKER_ID": worker_id, "RESULTS_DIR": str(results_dir),
                                           "MESHQ_LOG_FILE": str(workdir / "meshq-worker.log"),
                                           "LOG_LEVEL": "WARNING"}, workdir / f"{worker_id}.log")
                      for worker_id in worker_ids])
    client = redis.Redis.from_url(env["REDIS_URL"], decode_responses=True)
    try:
        while any(client.hget(f"worker:{worker_id}", "status") != "IDLE" for worker_id in worker_ids):
            time.sleep(0.1)
        cpu_before = worker.cpu_s()
        elapsed, starts = send_meshq_echo(n, path)
        cpu_ms = (worker.cpu_s() - cpu_before) * 1000 / n
    finally:
        stop(worker)
    return {"tasks_per_s": n / elapsed, "p50_ms": percentile(starts, 50) * 1000,
            "p99_ms": percentile(starts, 99) * 1000, "elapsed_s": elapsed, "worker_cpu_ms": cpu_ms}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternate bare/meshq this many times; the median round is reported")
    parser.add_argument("--results-dir", default=None,
                        help="parent of the echo tasks' RESULTS_DIR (default: the system temp dir)")
    parser.add_argument("--redis-url", default=None,
                        help="use this Redis (never flushed) instead of a private embedded one")
    parser.add_argument("--workers", type=int, default=1, help="workers per side")
    parser.add_argument("--default-worker", action="store_true",
                        help="start workers with the default command (mingle and gossip on), as users do")
    args = parser.parse_args()
    global WORKERS, WORKER_OPTIONS
    WORKERS = args.workers
    WORKER_OPTIONS = [] if args.default_worker else QUIET_WORKER_OPTIONS
    server = None
    if args.redis_url:
        os.environ["REDIS_URL"] = args.redis_url
    else:
        if os.environ.get("REDIS_URL"):
            print("bench: REDIS_URL is ignored; a private embedded Redis is used (--redis-url to choose one)")
        server = EmbeddedRedis().start()
        os.environ["REDIS_URL"] = server.url
    # Queue names of the bench's own (read by the Celery client of this process at import).
    os.environ["TASK_TOPIC"] = f"meshq-bench-{secrets.token_hex(4)}"
    os.environ["MESHQ_BENCH_BARE_QUEUE"] = f"{os.environ['TASK_TOPIC']}-bare"
    print(f"bench: Redis {'(private, embedded)' if server else '(given, never flushed)'}, "
          f"queues {os.environ['TASK_TOPIC']} and {os.environ['MESHQ_BENCH_BARE_QUEUE']}", flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rounds: list[dict[str, dict[str, float]]] = []  # per round: each side's row
    results_fs = "?"
    try:
        # All rounds' files are removed at the end: deleting thousands of task
        # directories between rounds would slow the next round's file creation.
        with tempfile.TemporaryDirectory(prefix="meshq-bench-dispatch-") as tmp, \
                tempfile.TemporaryDirectory(prefix="meshq-bench-results-", dir=args.results_dir) as results:
            workdir = Path(tmp)
            results_fs = filesystem_of(Path(results))
            for round_no in range(args.rounds):
                # Alternating rounds, and which side goes first: a noisy neighbour or a
                # disk that slows down during the run then costs both sides alike.
                sides: dict[str, dict[str, float]] = {}
                order = ("bare", *PATHS) if round_no % 2 == 0 else (*reversed(PATHS), "bare")
                for side in order:
                    if server is not None:  # only a database this bench created is flushed
                        redis.Redis.from_url(server.url).flushdb()
                    sides[side] = (run_bare(args.tasks, env, workdir) if side == "bare"
                                   else run_meshq(args.tasks, env, workdir,
                                                  Path(results) / f"round{round_no}-{side}", path=side))
                rounds.append(sides)
    finally:
        if server is not None:
            server.stop()
    print(f"\ndispatch: {args.tasks} tasks, {WORKERS} worker(s) a side (prefork, concurrency 1, prefetch 1, "
          f"acks_late; mingle and gossip {'on' if args.default_worker else 'off'}); "
          f"echo outputs on {results_fs}")
    print(f"{'round':<7}{'':<22}{'tasks/s':>10}{'p50 submit→start ms':>22}{'p99 ms':>10}{'elapsed s':>11}"
          f"{'worker CPU ms/task':>20}")
    for i, sides in enumerate(rounds, 1):
        for side, name in (("bare", "bare celery"), *((p, LABELS[p]) for p in PATHS)):
            row = sides[side]
            print(f"{i:<7}{name:<22}{row['tasks_per_s']:>10.1f}{row['p50_ms']:>22.1f}{row['p99_ms']:>10.1f}"
                  f"{row['elapsed_s']:>11.1f}{row['worker_cpu_ms']:>20.2f}")
    for path in PATHS:
        ratios = [sides[path]["tasks_per_s"] / sides["bare"]["tasks_per_s"] for sides in rounds]
        ratio = statistics.median(ratios)
        # The OS counts CPU in clock ticks (10 ms): a short run can read 0 for a side.
        cpus = [sides[path]["worker_cpu_ms"] / sides["bare"]["worker_cpu_ms"]
                for sides in rounds if sides["bare"]["worker_cpu_ms"] > 0]
        cpu = f"{statistics.median(cpus):.2f}× bare's" if cpus else "not measurable in so short a run"
        print(f"{LABELS[path]}: ratio to bare Celery per round {', '.join(f'{r:.2f}' for r in ratios)}; "
              f"median {ratio:.2f}  (target ≥ 0.90: {'met' if ratio >= 0.9 else 'NOT met'}); "
              f"worker CPU per task {cpu}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
