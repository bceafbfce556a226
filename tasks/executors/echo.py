"""The echo executor: the smallest real job (tests, benchmarks, smoke checks)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from app.core.task_spec import EchoOptions, EchoTaskSpec, TaskSpec, spec_as
from tasks.executors.progress import Progress


class EchoExecutor:
    """Returns the spec's ``data`` and ``echo.message``; optionally sleeps in steps."""

    writes_files = False  # its manifest lists responses.json alone

    def run(self, spec: TaskSpec, out_dir: Path, progress: Progress) -> dict[str, Any]:
        echo = spec_as(spec, EchoTaskSpec)
        options = echo.echo or EchoOptions()
        started = time.monotonic()
        if options.sleep_s > 0:
            step_s = options.sleep_s / options.steps
            for step in range(1, options.steps + 1):
                progress.check_cancelled(f"at step {step - 1}")
                time.sleep(step_s)
                progress(step=step, total_steps=options.steps, force=step == options.steps)
        return {"echo": {"message": options.message, "data": echo.data},
                "runtime_sec": round(time.monotonic() - started, 6)}

