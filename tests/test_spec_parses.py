"""One inference task from ``meshq submit`` to its result parses its spec once on each side:
once by the client that submits it, once by the worker that runs it (``app.core.task_spec.parse_task_spec``,
the one parse; its calls are counted through ``MESHQ_COUNT_SPEC_PARSES``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from app.core.task_spec.validation import COUNT_PARSES_ENV
from tests.conftest import ROOT

# One torch thread in the worker: the CPUs are shared with the test process.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def test_one_inference_task_is_parsed_once_by_the_client_and_once_by_the_worker(
        worker_factory, redis_url: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    worker_counts, client_counts = tmp_path / "worker-parses.txt", tmp_path / "client-parses.txt"
    worker_factory(env={**WORKER_ENV, COUNT_PARSES_ENV: str(worker_counts)})
    document = tmp_path / "task.json"
    document.write_text(json.dumps({"spec": {
        "taskType": "inference",
        "model": {"source": {"identifier": str(tiny_model_dir)}, "transformers": {"device_map": "cpu"}},
        "data": {"type": "list", "items": ["Hello there", "a b c"]},
        "inference": {"max_new_tokens": 4}}}))
    submitted = subprocess.run([sys.executable, "-m", "cli.main", "submit", str(document), "--wait", "--json"],
                               cwd=ROOT, env={**os.environ, "REDIS_URL": redis_url, COUNT_PARSES_ENV: str(client_counts)},
                               capture_output=True, text=True, timeout=300)
    assert submitted.returncode == 0, submitted.stderr
    assert json.loads(submitted.stdout)["state"] == "SUCCESS", submitted.stdout

    assert len(client_counts.read_text().splitlines()) == 1
    assert len(worker_counts.read_text().splitlines()) == 1
