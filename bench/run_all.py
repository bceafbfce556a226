"""``make bench``: run every benchmark script in turn, each as its own process.

Each script prints its own table. Append new benchmarks to ``BENCHMARKS`` as
``(script, [arguments])``; a failing benchmark is reported and the rest still run.

    python bench/run_all.py [NAME ...]     # only the named scripts (e.g. server_transfer)
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent

BENCHMARKS: list[tuple[str, list[str]]] = [
    ("dispatch.py", []),
    ("server_transfer.py", []),
    ("inference.py", []),
    ("transfer.py", []),
    ("training.py", ["--steps", "30", "--repeat", "2"]),
]


def main(argv: list[str]) -> int:
    wanted = {name.removesuffix(".py") for name in argv}
    failed = []
    for script, args in BENCHMARKS:
        if wanted and script.removesuffix(".py") not in wanted:
            continue
        print(f"\n=== {script} {' '.join(args)}".rstrip(), flush=True)
        started = time.monotonic()
        code = subprocess.call([sys.executable, str(BENCH_DIR / script), *args], cwd=BENCH_DIR.parent)
        print(f"=== {script}: exit {code} after {time.monotonic() - started:.0f}s", flush=True)
        if code != 0:
            failed.append(script)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
