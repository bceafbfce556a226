"""The ``meshq`` command line.

Each sub-command is a small function; heavy imports (torch, the server) happen
inside the command that needs them, so ``meshq workers`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.core.errors import MeshqError
from cli.sentinel_cluster import DEFAULT_DOWN_AFTER_MS
from cli.tiny_model import SIZES


def _redis() -> Any:
    from app.core.redis_client import get_redis

    return get_redis()


def _age_s(iso: str | None) -> float | None:
    if not iso:
        return None
    try:
        return round((datetime.now(UTC) - datetime.fromisoformat(iso)).total_seconds(), 1)
    except ValueError:
        return None


# -- workers / health / redis ---------------------------------------------------
def cmd_workers(args: argparse.Namespace) -> int:
    from app.core.capabilities import Capabilities
    from app.core.redaction import redact
    from app.core.settings import get_settings
    from app.worker.registry import list_workers

    settings = get_settings()
    redis_url = redact(settings.redis_url) + ("" if settings.redis_url_from_env else " (REDIS_URL is not set)")
    workers = list_workers(_redis())
    for worker in workers:
        worker["last_seen_age_s"] = _age_s(worker.get("last_seen"))
    if not args.all:
        workers = [w for w in workers if w["alive"]]
    if args.json:
        print(json.dumps(workers, indent=2))
        return 0
    print(f"workers registered in Redis {redis_url}:" if workers else f"no live workers in Redis {redis_url}")
    if not workers:
        return 0
    print(f"{'WORKER':<24} {'STATUS':<9} {'TAGS':<20} {'LAST BEAT':>10}  {'CURRENT TASK':<36}  HARDWARE")
    for w in workers:
        age = w["last_seen_age_s"]
        status = w.get("status", "?") if w["alive"] else "DEAD"
        hardware = Capabilities.from_dict(w["capabilities"]).summary() if w.get("capabilities") else "-"
        print(f"{w['worker_id']:<24} {status:<9} {','.join(w.get('tags') or []) or '-':<20} "
              f"{(f'{age:.0f}s ago' if age is not None else '?'):>10}  {w.get('current_task') or '-':<36}  "
              f"{hardware}")
    return 0


# A worker that missed this many heartbeats (plus a few seconds of slack) is not alive, though
# its ``:hb`` key lives on for its TTL (max(4 × interval, 120) s) after a SIGKILL.
MISSED_BEATS = 2
BEAT_SLACK_S = 5.0


def cmd_health(args: argparse.Namespace) -> int:
    from app.core import keys

    pipe = _redis().pipeline(transaction=False)
    pipe.get(keys.worker_heartbeat(args.worker))  # the time of its last beat
    pipe.hget(keys.worker_hash(args.worker), "env_json")
    last_beat, env_json = pipe.execute()
    if not last_beat:
        print(f"worker {args.worker}: not alive (no heartbeat key)")
        return 1
    try:
        interval = float(json.loads(env_json or "{}").get("HEARTBEAT_INTERVAL_SEC") or 30)
    except (ValueError, TypeError, AttributeError):
        interval = 30.0
    age = _age_s(last_beat)
    limit = MISSED_BEATS * interval + BEAT_SLACK_S
    if age is not None and age > limit:
        print(f"worker {args.worker}: not alive (last heartbeat {age:.0f}s ago; it beats every {interval:g}s)")
        return 1
    print(f"worker {args.worker}: alive (last heartbeat {age if age is not None else '?'}s ago)")
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    from app.celery import app
    from app.core.settings import get_settings
    from cli.purge import meshq_queues, purge_queues

    names = meshq_queues(_redis(), get_settings().task_topic)
    if not args.force:
        answer = input(f"remove every task waiting in {len(names)} queue(s): {', '.join(names)}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing purged")
            return 1
    removed = purge_queues(app, names)
    for name, count in removed.items():
        if count:
            print(f"{name}: {count} message(s) purged")
    print(f"purged {sum(removed.values())} message(s) from {len(names)} queue(s)")
    return 0


class _Stop(Exception):
    """SIGTERM/SIGHUP received: leave the ``with`` block so the child server is stopped."""


def _raise_stop(signum: int, _frame: Any) -> None:
    raise _Stop(signum)


def cmd_redis(args: argparse.Namespace) -> int:
    import signal
    import time

    from cli.embedded_redis import EmbeddedRedis, default_redis_data_dir

    # redis-server runs in its own session (Ctrl-C in a shell must not reach it twice), so a
    # SIGTERM to this process would otherwise leave it running: stop it on the way out.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_stop)
    data_dir = Path(args.data_dir or default_redis_data_dir(args.port)).expanduser()
    if args.sentinel:
        return _run_sentinel_cluster(args, data_dir)
    with EmbeddedRedis(port=args.port, data_dir=data_dir) as server:
        print(f"embedded Redis running: export REDIS_URL={server.url}   (Ctrl-C to stop; "
              f"data kept in {data_dir}, AOF)", flush=True)
        try:
            while server.process is not None and server.process.poll() is None:
                time.sleep(0.5)
        except (KeyboardInterrupt, _Stop):
            return 0
        code = server.process.returncode if server.process is not None else None
    print(f"meshq: embedded redis-server stopped by itself (exit status {code})", file=sys.stderr)
    return 1


def _run_sentinel_cluster(args: argparse.Namespace, data_dir: Path) -> int:
    """``meshq redis --sentinel``: master (``--port``), replica and three sentinels until Ctrl-C.
    A node that dies is left dead (the others fail over around it), as on real machines."""
    import time

    from cli.sentinel_cluster import SentinelCluster

    with SentinelCluster(data_dir, master_port=args.port, down_after_ms=args.down_after_ms) as cluster:
        ports = ", ".join(str(s.port) for s in cluster.sentinels)
        print(f"master 127.0.0.1:{cluster.master.port}, replica 127.0.0.1:{cluster.replica.port}, "
              f"sentinels on {ports} (data kept in {data_dir}, AOF); Ctrl-C to stop all\n"
              f"  export REDIS_URL='{cluster.url}'\n  export MESHQ_REDIS_MASTER={cluster.master_name}", flush=True)
        try:
            while any(s.process is not None and s.process.poll() is None for s in cluster.sentinels):
                time.sleep(0.5)
        except (KeyboardInterrupt, _Stop):
            return 0
    print("meshq: every sentinel stopped by itself", file=sys.stderr)
    return 1


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from cli.tiny_model import build_tiny_model

    out = build_tiny_model(args.dir, size=args.size, seed=args.seed)
    print(f"tiny {args.size} model written to {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from cli.demo import run_demo

    return run_demo(args.workdir)


def cmd_serve(args: argparse.Namespace) -> int:
    from server.app import serve

    serve(args.host, args.port, args.results_dir)
    return 0


# -- pipelines: submit / status / cancel ----------------------------------------
def _print_report(report: dict[str, Any], as_json: bool, with_status: bool = True) -> None:
    from pipelines.display import result_lines, status_lines

    if as_json:
        print(json.dumps(report, indent=2, default=str))
        return
    for line in status_lines(report) if with_status else []:
        print(line)
    for line in result_lines(report):
        print(line)


def _exit_status(report: dict[str, Any]) -> int:
    """0 only when every stage succeeded."""
    return 0 if report["state"] == "SUCCESS" else 1


def _follow(run: Any, args: argparse.Namespace) -> int:
    # On a terminal the live display (stderr) leaves the final status on screen; printing
    # it again on the same terminal would show it twice.
    final_on_screen = sys.stderr.isatty() and sys.stdout.isatty()
    try:
        report = run.follow(timeout=args.timeout, progress=True)
    except TimeoutError as exc:
        print(f"meshq: {exc}", file=sys.stderr)
        report = run.status()
        final_on_screen = False  # the display stopped before the status below
    _print_report(report, args.json, with_status=not final_on_screen)
    return _exit_status(report)


def cmd_submit(args: argparse.Namespace) -> int:
    from pipelines import Pipeline

    run = Pipeline.from_yaml(args.file).submit()
    for warning in run.warnings:
        print(f"meshq: warning: {warning}", file=sys.stderr)
    if args.wait:
        return _follow(run, args)
    if args.json:
        print(json.dumps({"id": run.id, "name": run.name, "warnings": run.warnings,
                          "stages": {s["name"]: {"task_id": s["task_id"], "queue": s["queue"]}
                                     for s in run.stages}}, indent=2))
    else:
        print(f"submitted pipeline {run.id} ({run.name})")
        for stage in run.stages:
            print(f"  {stage['name']}: task {stage['task_id']} → queue {stage['queue']}"
                  + (f" (runs on the worker of {stage['run_on']!r})" if stage.get("run_on") else ""))
        print(f"follow it with: meshq status {run.id} --wait")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from pipelines import PipelineRun

    run = PipelineRun.find(args.id)
    if args.wait:
        return _follow(run, args)
    report = run.status()
    _print_report(report, args.json)
    return _exit_status(report)


def cmd_cancel(args: argparse.Namespace) -> int:
    from pipelines.run import cancel_any

    report = cancel_any(args.id)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(f"cancel requested for {report.get('kind', 'pipeline')} {report['id']}: now {report['state']}")
    return 0


def cmd_deliver(args: argparse.Namespace) -> int:
    from app.artifacts.delivery import redeliver
    from app.core.errors import ConfigError
    from app.core.names import check_name
    from app.core.settings import get_settings

    try:
        task_id = check_name(args.task_id, "task_id")
    except ValueError as exc:
        raise ConfigError("task_id", str(exc)) from None
    headers = {}
    for header in args.header or []:
        name, sep, value = header.partition(":")
        if not sep or not name.strip():
            raise ConfigError("--header", "must be 'Name: value'")
        headers[name.strip()] = value.strip()
    results_dir = Path(args.results_dir or get_settings().results_dir).resolve()
    delivered = redeliver(results_dir / task_id, headers)
    urls = {key: value for key, value in delivered.items() if key.endswith("_archive_url")}
    export = delivered.get("jsonl_export")
    if isinstance(export, dict) and export.get("url"):
        urls["jsonl_export"] = export["url"]
    if args.json:
        print(json.dumps({"task_id": task_id, "delivered": True, "urls": urls}, indent=2))
    else:
        print(f"delivered the outputs of task {task_id}" + "".join(f"\n  {k}: {v}" for k, v in urls.items()))
    return 0


# -- wiring ---------------------------------------------------------------------
Command = Callable[[argparse.Namespace], int]


def _add_follow_options(p: argparse.ArgumentParser) -> None:
    """``--wait``, ``--json`` and ``--timeout``, shared by ``submit`` and ``status``."""
    p.add_argument("--wait", action="store_true", help="show live progress and wait for the end")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--timeout", type=float, default=None, help="with --wait: give up after SECONDS")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshq", description="LLM jobs on a Celery worker fleet")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("workers", help="list live workers from their heartbeat hashes")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--all", action="store_true", help="include workers whose heartbeat expired")
    p.set_defaults(func=cmd_workers)

    p = sub.add_parser("health", help="exit 0 if the worker beat within two heartbeat intervals (+5 s), "
                                      "1 otherwise")
    p.add_argument("--worker", required=True, help="WORKER_ID to check")
    p.set_defaults(func=cmd_health)

    p = sub.add_parser("purge", help="remove every waiting task from all of meshq's queues (default, tag, "
                                     "capability and worker queues; celery purge knows the default one only)")
    p.add_argument("-f", "--force", action="store_true", help="do not ask for confirmation")
    p.set_defaults(func=cmd_purge)

    p = sub.add_parser("redis", help="run the embedded Redis server in the foreground")
    p.add_argument("--port", type=int, default=6379)
    p.add_argument("--data-dir", default=None,
                   help="where the server keeps its data (AOF); default ~/.local/share/meshq/redis-<port>")
    p.add_argument("--sentinel", action="store_true",
                   help="a master (on --port), a replica and three sentinels on loopback, for failover "
                        "(REDIS_URL=sentinel://..., MESHQ_REDIS_MASTER=meshq)")
    p.add_argument("--down-after-ms", type=int, default=DEFAULT_DOWN_AFTER_MS,
                   help="with --sentinel: how long the master may be silent before a replica is promoted")
    p.set_defaults(func=cmd_redis)

    p = sub.add_parser("tiny-model", help="build a tiny random Llama model + tokenizer locally")
    p.add_argument("dir", help="output directory")
    p.add_argument("--size", choices=list(SIZES), default="test",
                   help="test ~1M, vllm ~3.7M (the vLLM tests' model), bench ~30M, gpu ~100M, "
                        "llama-1b ~1.0B parameters (Llama 3.2 1B's layer shape)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser("submit", help="submit a pipeline or task file (YAML or JSON)")
    p.add_argument("file", help="pipeline template or task spec, e.g. pipelines/examples/lora_then_infer.yaml")
    _add_follow_options(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="state of a pipeline (or task) by id; exit 0 only if every stage succeeded")
    p.add_argument("id", help="pipeline id, or the task id of a stage or of a single task")
    _add_follow_options(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("cancel", help="cancel a pipeline (its later stages never start) or a single task")
    p.add_argument("id", help="pipeline id, or a task id")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("deliver", help="deliver a finished task's outputs whose upload failed (on the worker's "
                                       "host), without running the task again")
    p.add_argument("task_id", help="the task whose delivery failed")
    p.add_argument("--results-dir", default=None, help="the worker's results directory (default $RESULTS_DIR)")
    p.add_argument("-H", "--header", action="append",
                   help="'Name: value' of the destination's headers (their values are never recorded)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_deliver)

    p = sub.add_parser("demo", help="run the main job end to end on a private local deployment")
    p.add_argument("--workdir", help="where logs and results go (default: a new temporary directory)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("serve", help="run the orchestrator HTTP server (artifacts, results, tasks, workers)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    p.add_argument("--results-dir", default=None,
                   help="where artifacts and results are kept "
                        "(default $MESHQ_SERVER_RESULTS_DIR or ./results_server)")
    p.set_defaults(func=cmd_serve)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import redis

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:  # ``meshq workers --json | head``: the reader left early; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0
    except MeshqError as exc:
        print(f"meshq: {exc}", file=sys.stderr)
        return 2
    except (redis.ConnectionError, redis.TimeoutError) as exc:  # name the server, not a traceback
        from app.core.redaction import redact
        from app.core.settings import get_settings

        print(f"meshq: cannot reach Redis at {redact(get_settings().redis_url)}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
