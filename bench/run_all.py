"""``make bench``: run every benchmark script in turn, each as its own process.

Each script prints its own table. Append new benchmarks to ``BENCHMARKS`` as
``(script, [arguments])``; a failing benchmark is reported and the rest still run.

    python bench/run_all.py [NAME ...]     # only the named scripts (e.g. server_transfer)
    python bench/run_all.py --redis-url URL   # dispatch on that Redis (never flushed)

Every benchmark uses a private embedded Redis of its own unless ``--redis-url`` is given;
``REDIS_URL`` in the environment is ignored, so ``make bench`` never touches a real one.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent

BENCHMARKS: list[tuple[str, list[str]]] = [
    ("dispatch.py", []),
    ("pool_path.py", []),
    ("fleet.py", []),
    ("server_transfer.py", []),
    ("webui.py", []),
    ("inference.py", []),
    ("shards.py", []),
    ("merging.py", []),
    ("transfer.py", []),
    ("training.py", ["--steps", "30", "--repeat", "2"]),
    ("multi_rank.py", []),
    ("vllm.py", []),
]

# Benchmarks that need another environment's interpreter; skipped (saying so) where it is absent.
INTERPRETERS = {"vllm.py": BENCH_DIR.parent / ".venv-vllm" / "bin" / "python"}
SKIP_REASONS = {"vllm.py": "no .venv-vllm here (make install-vllm builds it)"}


# The benchmarks that can run on a Redis the user names (the others always start their own).
TAKES_REDIS_URL = {"dispatch.py"}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="only these benchmarks")
    parser.add_argument("--redis-url", default=None, help="a Redis for the dispatch benchmark (never flushed)")
    options = parser.parse_args(argv)
    wanted = {name.removesuffix(".py") for name in options.names}
    failed = []
    for script, args in BENCHMARKS:
        if wanted and script.removesuffix(".py") not in wanted:
            continue
        if options.redis_url and script in TAKES_REDIS_URL:
            args = [*args, "--redis-url", options.redis_url]
        print(f"\n=== {script} {' '.join(args)}".rstrip(), flush=True)
        python = INTERPRETERS.get(script, Path(sys.executable))
        if not python.exists():
            print(f"=== {script}: skipped: {SKIP_REASONS[script]}", flush=True)
            continue
        started = time.monotonic()
        code = subprocess.call([str(python), str(BENCH_DIR / script), *args], cwd=BENCH_DIR.parent)
        print(f"=== {script}: exit {code} after {time.monotonic() - started:.0f}s", flush=True)
        if code != 0:
            failed.append(script)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
