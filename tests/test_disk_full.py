"""Disk full while writing results: a clear failure, and the worker goes on."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def tmpfs(mount_point: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` when this machine lets us mount one (CI runs as root)."""
    mount_point.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"DISK-FULL TEST NOT RUN: cannot mount a tmpfs here ({proc.stderr.strip()})")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "small-disk", "512k") as mount_point:
        yield mount_point


def test_disk_full_fails_clearly_and_worker_survives(worker_factory, small_disk: Path) -> None:
    from app.core.errors import ExecutorError
    from tasks import echo

    results = small_disk / "results"
    worker = worker_factory(worker_id="diskfull", results_dir=results)
    filler = small_disk / "filler"
    with open(filler, "wb") as fh:  # leave a few KiB free
        try:
            fh.write(b"\0" * (512 * 1024))
        except OSError:
            pass
    big = {"taskType": "echo", "data": {"blob": "x" * 200_000}}
    failed = echo.apply_async(args=[big])
    with pytest.raises(ExecutorError) as info:
        failed.get(timeout=60)
    message = str(info.value)
    assert "No space left on device" in message and str(results) in message
    assert worker.alive()
    os.remove(filler)
    ok = echo.apply_async(args=[big]).get(timeout=60)
    assert ok["worker_id"] == "diskfull"
    assert (results / ok["task_id"] / "responses.json").is_file()


def test_training_that_fills_the_disk_removes_its_checkpoints(worker_factory, tiny_model_dir: Path,
                                                              tmp_path: Path) -> None:
    """Full fine-tuning of the ~1M-parameter model writes ~12 MB per checkpoint (weights and Adam's
    state): the second one fills a 20 MiB disk. The task fails saying so, and the checkpoints it
    wrote are gone (a failed task's checkpoints would hold the space every later task needs)."""
    from app.core.errors import ExecutorError
    from tasks import echo, sft

    with tmpfs(tmp_path / "training-disk", "20m") as disk:
        results = disk / "results"
        worker = worker_factory(worker_id="trainfull", results_dir=results)
        spec = {"taskType": "sft", "model": {"source": {"identifier": str(tiny_model_dir)},
                                             "transformers": {"device_map": "cpu"}},
                "data": {"prompts": ["hello world", "the sky is blue"]},
                "training": {"max_steps": 6, "batch_size": 2, "save_steps": 1, "save_total_limit": 6}}
        failed = sft.apply_async(args=[spec])
        with pytest.raises(ExecutorError) as info:
            failed.get(timeout=300)
        assert "No space left on device" in str(info.value) and str(results) in str(info.value)
        task_dir = results / failed.id
        assert not (task_dir / "checkpoints").exists()
        leftovers = {str(p.relative_to(disk)): p.stat().st_size for p in disk.rglob("*") if p.is_file()}
        assert shutil.disk_usage(disk).used < 2 * 1024 * 1024, leftovers  # the space is free again
        ok = echo.apply_async(args=[{"taskType": "echo", "data": {"after": "full disk"}}]).get(timeout=60)
        assert ok["worker_id"] == "trainfull" and worker.alive()
