"""Live progress of a pipeline: one line per stage, redrawn on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import IO, Any

# Progress fields executors report, in the order they are shown.
_COUNTERS = (("step", ("total_steps", "max_steps", "total")), ("done", ("total",)),
             ("batch", ("batches",)), ("epoch", ("num_train_epochs", "epochs")))
_RATES = (("loss", "loss {:.4g}"), ("tokens_per_s", "{:.1f} tok/s"), ("tokens_per_sec", "{:.1f} tok/s"),
          ("samples_per_s", "{:.2f} samples/s"), ("learning_rate", "lr {:.2g}"), ("eta_s", "eta {:.0f}s"),
          ("phase", "{}"), ("message", "{}"))
PLAIN_PROGRESS_INTERVAL_S = 5.0  # without a terminal, a stage's progress line at most this often


def describe_progress(progress: dict[str, Any]) -> str:
    parts = []
    shown: set[str] = set()
    for key, totals in _COUNTERS:
        if key in progress and progress[key] is not None:
            total = next((progress[t] for t in totals if progress.get(t) is not None), None)
            value = progress[key]
            if isinstance(value, float):
                value_text = str(int(value)) if value.is_integer() else f"{value:.2f}"
            else:
                value_text = str(value)
            parts.append(f"{key} {value_text}" + (f"/{total}" if total is not None else ""))
            shown.update((key, *totals))
    for key, fmt in _RATES:
        value = progress.get(key)
        if value is None or key in shown:
            continue
        try:
            parts.append(fmt.format(value))
        except (TypeError, ValueError):
            parts.append(f"{key} {value}")
    return "  ".join(parts)


def stage_line(name: str, stage: dict[str, Any], width: int = 12) -> str:
    state = stage["state"]
    text = f"{name:<{width}} {state:<10}"
    if stage.get("progress"):
        text += f" {describe_progress(stage['progress'])}"
    if stage.get("worker_id"):
        text += f"  [worker {stage['worker_id']}]"
    if stage.get("error"):
        text += f"  {stage['error']}"
    return text.rstrip()


def status_lines(report: dict[str, Any]) -> list[str]:
    width = max([len(n) for n in report["stages"]] + [5])
    lines = [f"{report.get('kind', 'pipeline')} {report['id']} ({report.get('name') or '-'}): {report['state']}"]
    lines += ["  " + stage_line(name, stage, width) for name, stage in report["stages"].items()]
    return lines


class ProgressDisplay:
    """Shows successive status reports: redrawn in place on a TTY, plain lines otherwise.

    Without a terminal (logs, CI) a line is written when a stage changes state, and
    for progress within a state at most every ``plain_interval_s``.
    """

    def __init__(self, stream: IO[str] | None = None, tty: bool | None = None,
                 plain_interval_s: float = PLAIN_PROGRESS_INTERVAL_S) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.plain_interval_s = plain_interval_s
        self._drawn = 0
        self._last: list[str] = []
        self._plain: dict[str, tuple[str, str, float]] = {}  # key → (state, line, written at)

    def update(self, report: dict[str, Any]) -> None:
        lines = status_lines(report)
        if lines == self._last:
            return
        self._last = lines
        if self.tty:
            if self._drawn:
                self.stream.write(f"\x1b[{self._drawn}F\x1b[J")
            self.stream.write("\n".join(lines) + "\n")
            self._drawn = len(lines)
        else:
            states = [report["state"], *(s["state"] for s in report["stages"].values())]
            for key, state, line in zip(["", *report["stages"]], states, lines, strict=True):
                self._plain_line(key, state, line.strip())
        self.stream.flush()

    def _plain_line(self, key: str, state: str, line: str) -> None:
        now = time.monotonic()
        previous = self._plain.get(key)
        if previous is not None:
            old_state, old_line, written = previous
            if old_line == line or (old_state == state and now - written < self.plain_interval_s):
                return
        self.stream.write(line + "\n")
        self._plain[key] = (state, line, now)

    def close(self) -> None:
        self.stream.flush()


def result_lines(report: dict[str, Any], max_items: int = 20) -> list[str]:
    """A short human summary of what finished stages produced (generations, artifacts)."""
    lines: list[str] = []
    for name, stage in report["stages"].items():
        result = stage.get("result")
        if not isinstance(result, dict):
            continue
        items = result.get("items")
        if isinstance(items, list) and items:
            lines.append(f"{name}: {len(items)} generation(s)")
            for item in items[:max_items]:
                if isinstance(item, dict):
                    lines.append(f"  {item.get('prompt')!r} → {item.get('output')!r}")
        for key in sorted(result):
            if key.startswith("final_") and (key.endswith("_path") or key.endswith("_url")) and result[key]:
                lines.append(f"{name}: {key} = {result[key]}")
    return lines
