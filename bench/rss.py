"""Peak RSS sampling for the benchmarks: a process and its descendants, in a thread."""

from __future__ import annotations

import threading

import psutil


class TreeRss:
    """Peak RSS of a process and of each of its descendants (sampled every 10 ms in a thread)."""

    def __init__(self, pid: int, interval_s: float = 0.01) -> None:
        self.root = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak_total = 0
        self.peak_root = 0
        self.peak_by_name: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                return
            total = 0
            for process in processes:
                try:
                    rss = process.memory_info().rss
                    name = process.name()
                except psutil.Error:
                    continue
                total += rss
                self.peak_by_name[name] = max(self.peak_by_name.get(name, 0), rss)
                if process.pid == self.root.pid:
                    self.peak_root = max(self.peak_root, rss)
            self.peak_total = max(self.peak_total, total)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> TreeRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
