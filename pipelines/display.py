"""Live progress of a pipeline: a rich progress bar per stage on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import IO, Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

# Progress fields executors report, in the order they are shown: counter, then its totals.
_COUNTERS = (("shards_done", ("shards_total",)), ("step", ("total_steps", "max_steps", "total")), ("done", ("total",)),
             ("batch", ("batches",)), ("epoch", ("num_train_epochs", "epochs")))
_RATES = (("loss", "loss {:.4g}"), ("reward", "reward {:.4g}"), ("tokens_per_s", "{:.1f} tok/s"),
          ("tokens_per_sec", "{:.1f} tok/s"), ("samples_per_s", "{:.2f} samples/s"),
          ("learning_rate", "lr {:.2g}"), ("eta_s", "eta {:.0f}s"), ("phase", "{}"), ("message", "{}"))
PLAIN_PROGRESS_INTERVAL_S = 5.0  # without a terminal, a stage's progress line at most this often
LIVE_REFRESH_PER_S = 4
STATE_STYLES = {"SUCCESS": "green", "FAILURE": "bold red", "REVOKED": "yellow", "CANCELLED": "yellow",
                "CANCELLING": "yellow", "SKIPPED": "dim", "PENDING": "dim", "PROGRESS": "cyan",
                "STARTED": "cyan", "RUNNING": "cyan"}


def _number(value: Any) -> str:
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else f"{value:.2f}"
    return str(value)


def fraction_done(progress: dict[str, Any]) -> tuple[float, float] | None:
    """``(completed, total)`` of the first counter that has a total (for a progress bar)."""
    for key, totals in _COUNTERS:
        value = progress.get(key)
        total = next((progress[t] for t in totals if progress.get(t) is not None), None)
        if isinstance(value, int | float) and isinstance(total, int | float) and total > 0:
            return float(value), float(total)
    return None


def describe_progress(progress: dict[str, Any]) -> str:
    """``step 30/150  loss 1.234  eta 12s`` — the counters with their totals, then rates."""
    parts = []
    shown: set[str] = set()
    for key, totals in _COUNTERS:
        if key in progress and progress[key] is not None:
            total = next((progress[t] for t in totals if progress.get(t) is not None), None)
            label = key.removesuffix("_done")  # shards_done 1/4 reads "shards 1/4"
            parts.append(f"{label} {_number(progress[key])}" + (f"/{total}" if total is not None else ""))
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
    if stage.get("depends_on"):  # a graph node: what it waits for
        text += f"  (after {', '.join(stage['depends_on'])})"
    if stage.get("error"):
        text += f"  {stage['error']}"
    return text.rstrip()


def header_line(report: dict[str, Any]) -> str:
    return f"{report.get('kind', 'pipeline')} {report['id']} ({report.get('name') or '-'}): {report['state']}"


def metadata_line(metadata: dict[str, Any]) -> str:
    """``owner=ml-team project=qa description=...`` (annotations flattened)."""
    flat = {k: v for k, v in metadata.items() if k != "annotations"}
    if isinstance(metadata.get("annotations"), dict):
        flat.update(metadata["annotations"])
    return " ".join(f"{key}={value}" for key, value in flat.items())


def status_lines(report: dict[str, Any]) -> list[str]:
    """The header, then one line per stage (the live display keeps this shape)."""
    width = max([len(n) for n in report["stages"]] + [5])
    return [header_line(report)] + ["  " + stage_line(name, stage, width) for name, stage in report["stages"].items()]


def status_renderable(report: dict[str, Any]) -> Group:
    """The report as rich renderables: a header, then a row per stage with its progress bar."""
    table = Table.grid(padding=(0, 1))
    for _ in range(5):
        table.add_column()
    for name, stage in report["stages"].items():
        state = stage["state"]
        progress = stage.get("progress") or {}
        done = fraction_done(progress)
        if state == "SUCCESS":
            bar = ProgressBar(total=1, completed=1, width=24)
        elif done is not None:
            bar = ProgressBar(total=done[1], completed=min(done[0], done[1]), width=24)
        elif state in ("STARTED", "PROGRESS"):
            bar = ProgressBar(total=None, width=24)  # running, no counter yet: a pulsing bar
        else:
            bar = ProgressBar(total=1, completed=0, width=24)
        detail = describe_progress(progress) if progress else ""
        if stage.get("error"):
            detail = (detail + "  " if detail else "") + str(stage["error"])
        worker = f"[worker {stage['worker_id']}]" if stage.get("worker_id") else ""
        if stage.get("depends_on"):
            worker = (worker + " " if worker else "") + f"(after {', '.join(stage['depends_on'])})"
        table.add_row(Text(name, style="bold"), Text(state, style=STATE_STYLES.get(state, "")), bar,
                      Text(detail), Text(worker, style="dim"))
    title = Text(header_line(report), style=STATE_STYLES.get(report["state"], ""))
    return Group(title, table)


class ProgressDisplay:
    """Shows successive status reports: live progress bars on a terminal, plain lines otherwise.

    Without a terminal (logs, CI) a line is written when a stage changes state, and
    for progress within a state at most every ``plain_interval_s``.
    """

    def __init__(self, stream: IO[str] | None = None, tty: bool | None = None,
                 plain_interval_s: float = PLAIN_PROGRESS_INTERVAL_S) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.plain_interval_s = plain_interval_s
        self._last: list[str] = []
        self._plain: dict[str, tuple[str, str, float]] = {}  # key → (state, line, written at)
        self._live: Live | None = None

    def update(self, report: dict[str, Any]) -> None:
        lines = status_lines(report)
        if lines == self._last:
            return
        self._last = lines
        if self.tty:
            if self._live is None:
                console = Console(file=self.stream, force_terminal=True)
                self._live = Live(status_renderable(report), console=console,
                                  refresh_per_second=LIVE_REFRESH_PER_S, transient=False)
                self._live.start()
            else:
                self._live.update(status_renderable(report), refresh=True)
            return
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
        if self._live is not None:
            self._live.stop()  # leaves the last frame on the terminal
        self.stream.flush()


def result_lines(report: dict[str, Any], max_items: int = 20) -> list[str]:
    """A short human summary: the template's metadata, and what finished stages produced
    (generations, artifacts, exports, warnings, notes)."""
    lines: list[str] = []
    if report.get("metadata"):
        lines.append("metadata: " + metadata_line(report["metadata"]))
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
        export = result.get("jsonl_export")
        if isinstance(export, dict):
            lines.append(f"{name}: jsonl_export = {export.get('url') or export.get('path')} "
                         f"({export.get('rows')} rows, {export.get('skipped')} skipped)")
        for kind in ("warnings", "notes"):
            for text in result.get(kind) or []:
                lines.append(f"{name}: {kind[:-1]}: {text}")
    return lines
