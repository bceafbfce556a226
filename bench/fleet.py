"""A fleet, not a handful: what each idle worker costs Redis, and how throughput scales.

For each fleet size (default 1, 8, 32 real ``celery worker`` processes, started with the
default command ``celery -A <app> worker --loglevel WARNING``: mingle, gossip and task
events on, as users run them) on a private embedded Redis:

* a meshq fleet with realistic tags (every fourth worker 6 tags, every fourth 4, the others
  1-2: up to 63 tag-subset queues each) and a dozen capability queues recorded and consumed;
* idle: Redis commands/s and Redis CPU (``INFO cpu``) per worker over a quiet window, the
  workers' RSS (parent + pool child), and where Redis time goes (``INFO commandstats``);
* load: echo tasks/s and submit→start p50/p99, meshq (``echo.apply_async``) against a bare
  Celery app with the same worker count and settings (bench/bare_app.py);
* at the largest size, the same load on meshq workers without tags or capability queues
  (one shared queue each): the tagged fleet's throughput ratio to it.

Numbers on a shared machine are noisy; the table says what was measured, not a verdict.

    python bench/fleet.py [--sizes 1,8,32] [--idle-s 20] [--tasks 200] [--top 8]
                          [--no-bare] [--no-plain] [--no-load] [--worker-args=--without-gossip]
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.dispatch import percentile, send_bare_noop, send_meshq_echo  # noqa: E402
from cli.embedded_redis import EmbeddedRedis  # noqa: E402

# Tag sets by worker index: a realistic mix, several workers with 4-6 tags.
TAG_SETS = ["gpu,a100,train,infer,eu,spot", "gpu,t4,infer,us", "cpu", "gpu,infer"]
# A dozen hardware requirements every worker here meets: each is one capability queue.
# Extra ``celery worker`` options of every worker (``--worker-args``): none, as users run them.
WORKER_ARGS: list[str] = []
CAPABILITY_NEEDS = [{"cpu": cpu, "memory": memory} for cpu in ("100m", "500m", "1")
                    for memory in ("16Mi", "32Mi", "64Mi", "128Mi")]


@dataclass
class Fleet:
    kind: str  # "meshq" (tagged), "meshq-plain" (no tags, no capability queues) or "bare"
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    worker_ids: list[str] = field(default_factory=list)


def start_fleet(kind: str, size: int, env: dict[str, str], workdir: Path) -> Fleet:
    fleet = Fleet(kind)
    topic = env["TASK_TOPIC"]
    for i in range(size):
        worker_id = f"{topic}-{kind}-{i}"
        worker_env = {**env, "RESULTS_DIR": str(workdir / "results" / worker_id), "LOG_LEVEL": "WARNING",
                      "MESHQ_LOG_FILE": str(workdir / f"{worker_id}.log"), "WORKER_ID": worker_id,
                      "WORKER_TAGS": TAG_SETS[i % len(TAG_SETS)] if kind == "meshq" else ""}
        app = "bench.bare_app" if kind == "bare" else "app"
        command = [sys.executable, "-m", "celery", "-A", app, "worker", "--loglevel", "WARNING", *WORKER_ARGS]
        if kind == "bare":
            command += ["-n", f"{worker_id}@%h"]
        fleet.processes.append(subprocess.Popen(command, cwd=ROOT, env=worker_env,
                                                stdout=open(workdir / f"{worker_id}.out", "wb"),
                                                stderr=subprocess.STDOUT, start_new_session=True))
        fleet.worker_ids.append(worker_id)
    return fleet


def wait_ready(fleet: Fleet, client: redis.Redis, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in fleet.processes):
            raise SystemExit(f"a {fleet.kind} worker exited during start-up")
        if fleet.kind == "bare":
            from bench.bare_app import app

            if len(app.control.ping(timeout=1.0)) >= len(fleet.processes):
                return
        else:
            pipe = client.pipeline(transaction=False)
            for worker_id in fleet.worker_ids:
                pipe.hget(f"worker:{worker_id}", "status")
            if all(status == "IDLE" for status in pipe.execute()):
                return
        time.sleep(0.5)
    raise SystemExit(f"the {fleet.kind} fleet did not start in {timeout_s:.0f}s")


def stop_fleet(fleet: Fleet) -> None:
    for process in fleet.processes:
        process.terminate()
    for process in fleet.processes:
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()


def fleet_rss_mb(fleet: Fleet) -> float:
    """Mean RSS of one worker (its parent and pool child), MiB."""
    totals = []
    for process in fleet.processes:
        try:
            root = psutil.Process(process.pid)
            totals.append(sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]))
        except psutil.Error:
            continue
    return sum(totals) / max(len(totals), 1) / 2**20


def redis_snapshot(client: redis.Redis) -> dict[str, Any]:
    cpu = client.info("cpu")
    stats = client.info("commandstats")
    return {"cpu_s": float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]),
            "commands": {name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
                         for name, v in stats.items()},
            "at": time.monotonic()}


def delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    commands = {}
    for name, (calls, usec) in after["commands"].items():
        if name == "info":  # this bench's own snapshots
            continue
        calls0, usec0 = before["commands"].get(name, (0, 0))
        if calls > calls0:
            commands[name] = (calls - calls0, usec - usec0)
    return {"seconds": after["at"] - before["at"], "cpu_s": after["cpu_s"] - before["cpu_s"], "commands": commands}


def measure_idle(client: redis.Redis, idle_s: float) -> dict[str, Any]:
    time.sleep(min(5.0, idle_s / 4))  # start-up traffic (mingle, first beats) settles
    before = redis_snapshot(client)
    time.sleep(idle_s)
    return delta(before, redis_snapshot(client))


def run_load(fleet: Fleet, tasks: int, env: dict[str, str]) -> dict[str, float]:
    """``tasks`` echo tasks (bare: no-op tasks) sent at once, then every result awaited."""
    if fleet.kind == "bare":
        elapsed, starts = send_bare_noop(tasks)
    else:
        elapsed, starts = send_meshq_echo(tasks, env["REDIS_URL"])
    return {"tasks_per_s": tasks / elapsed, "p50_ms": percentile(starts, 50) * 1000,
            "p99_ms": percentile(starts, 99) * 1000}


def record_capability_queues() -> list[str]:
    """Record the dozen capability queues (as a submitter would) before the fleet starts."""
    from tasks.placement import queue_for, record_queue, requirement_for

    queues = []
    for need in CAPABILITY_NEEDS:
        requirement = requirement_for({"taskType": "echo", "resources": {"hardware": need}})
        queue = queue_for(requirement)
        record_queue(queue, requirement)
        queues.append(queue)
    return queues


def queues_per_worker(client: redis.Redis, fleet: Fleet) -> float:
    import json

    counts = [len(json.loads(client.hget(f"worker:{w}", "queues_json") or "[]")) for w in fleet.worker_ids]
    return sum(counts) / max(len(counts), 1)


def one_fleet(kind: str, size: int, args: argparse.Namespace, server: EmbeddedRedis, env: dict[str, str],
              workdir: Path, loaded: bool = True) -> dict[str, Any]:
    client = redis.Redis.from_url(server.url, decode_responses=True)
    client.flushdb()
    if kind == "meshq":
        record_capability_queues()
    started = time.monotonic()
    fleet = start_fleet(kind, size, env, workdir)
    try:
        wait_ready(fleet, client)
        row: dict[str, Any] = {"kind": kind, "size": size, "start_s": time.monotonic() - started,
                               "queues": queues_per_worker(client, fleet) if kind != "bare" else 1.0}
        row["idle"] = measure_idle(client, args.idle_s)
        row["rss_mb"] = fleet_rss_mb(fleet)
        if loaded and not args.no_load:
            row["load"] = run_load(fleet, args.tasks, env)
    finally:
        stop_fleet(fleet)
        client.close()
    return row


def print_rows(rows: list[dict[str, Any]], top: int) -> None:
    print(f"\n{'fleet':<13}{'workers':>8}{'queues/w':>9}{'start s':>8}{'idle cmd/s':>11}{'cmd/s/w':>9}"
          f"{'Redis CPU ms/s/w':>17}{'RSS MiB/w':>10}{'tasks/s':>9}{'p50 ms':>8}{'p99 ms':>8}")
    for row in rows:
        idle, size = row["idle"], row["size"]
        calls = sum(c for c, _ in idle["commands"].values()) / idle["seconds"]
        cpu_ms = idle["cpu_s"] / idle["seconds"] * 1000
        load = row.get("load") or {"tasks_per_s": float("nan"), "p50_ms": float("nan"), "p99_ms": float("nan")}
        print(f"{row['kind']:<13}{size:>8}{row['queues']:>9.1f}{row['start_s']:>8.0f}{calls:>11.1f}"
              f"{calls / size:>9.2f}{cpu_ms / size:>17.3f}{row['rss_mb']:>10.0f}{load['tasks_per_s']:>9.1f}"
              f"{load['p50_ms']:>8.0f}{load['p99_ms']:>8.0f}")
    for row in rows:
        idle = row["idle"]
        ranked = sorted(idle["commands"].items(), key=lambda item: -item[1][1])[:top]
        total_usec = sum(u for _, u in idle["commands"].values()) or 1
        print(f"\nidle commandstats, {row['kind']} x{row['size']} ({idle['seconds']:.0f} s): "
              f"{'command':<20}{'calls/s':>9}{'calls/s/w':>10}{'usec/s':>9}{'share':>7}")
        for name, (calls, usec) in ranked:
            print(f"{'':<40}{name:<20}{calls / idle['seconds']:>9.1f}{calls / idle['seconds'] / row['size']:>10.2f}"
                  f"{usec / idle['seconds']:>9.0f}{usec / total_usec:>7.0%}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,8,32", help="fleet sizes, comma-separated")
    parser.add_argument("--idle-s", type=float, default=20.0, help="length of the idle window")
    parser.add_argument("--tasks", type=int, default=200, help="echo tasks per load run")
    parser.add_argument("--top", type=int, default=8, help="commands shown per commandstats table")
    parser.add_argument("--no-bare", action="store_true", help="skip the bare Celery fleets")
    parser.add_argument("--no-plain", action="store_true", help="skip the one-queue meshq fleet")
    parser.add_argument("--no-load", action="store_true", help="idle measurements only")
    parser.add_argument("--worker-args", default="",
                        help="extra celery worker options for every worker, e.g. --worker-args=--without-gossip")
    args = parser.parse_args()
    WORKER_ARGS.extend(args.worker_args.split())
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if os.environ.get("REDIS_URL"):
        print("bench: REDIS_URL is ignored; a private embedded Redis is used")
    server = EmbeddedRedis().start()
    os.environ["REDIS_URL"] = server.url
    os.environ.pop("HEARTBEAT_INTERVAL_SEC", None)  # the default heartbeat, as a fleet runs it
    os.environ["TASK_TOPIC"] = f"meshq-bench-{secrets.token_hex(4)}"
    os.environ["MESHQ_BENCH_BARE_QUEUE"] = f"{os.environ['TASK_TOPIC']}-bare"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    rows: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="meshq-bench-fleet-") as tmp:
            workdir = Path(tmp)
            for size in sizes:
                kinds = ["meshq"] + ([] if args.no_bare else ["bare"])
                if size == max(sizes) and not args.no_plain:
                    kinds.append("meshq-plain")
                for kind in kinds:
                    print(f"fleet: {kind} x{size} ...", flush=True)
                    rows.append(one_fleet(kind, size, args, server, env, workdir))
    finally:
        server.stop()
    print(f"\nfleet: private embedded Redis, default heartbeat, {args.tasks} echo tasks per load run, "
          f"idle window {args.idle_s:.0f} s, {os.cpu_count()} CPUs, worker options: {args.worker_args or 'none'}")
    print_rows(rows, args.top)
    by = {(r["kind"], r["size"]): r for r in rows}
    for size in sizes:
        meshq, bare = by.get(("meshq", size)), by.get(("bare", size))
        if meshq and bare and "load" in meshq and "load" in bare:
            print(f"x{size}: meshq/bare throughput {meshq['load']['tasks_per_s'] / bare['load']['tasks_per_s']:.2f}")
    top = max(sizes)
    if ("meshq-plain", top) in by and "load" in by[("meshq-plain", top)]:
        ratio = by[("meshq", top)]["load"]["tasks_per_s"] / by[("meshq-plain", top)]["load"]["tasks_per_s"]
        print(f"x{top}: tagged fleet / one-queue fleet throughput {ratio:.2f}  "
              f"(target ≥ 0.80: {'met' if ratio >= 0.8 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
