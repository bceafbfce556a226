"""One training task, N ranks: data parallel over every device of a worker.

A training task with ``training.allow_multi_gpu: true`` runs as N processes on its worker
— one per GPU the worker owns (``CUDA_VISIBLE_DEVICES`` at its start), or per id in
``training.visible_devices`` (a subset of those); on a CPU worker, ``MESHQ_CPU_RANKS``
processes (default 1). N = 1 is exactly the one-process path.

The ranks are started by torch's elastic launcher (``python -m torch.distributed.run``,
i.e. ``torchrun --standalone``) and train with the ``Trainer``'s own data parallel
(DDP: NCCL on GPUs, gloo on CPU); each rank runs the same executor
(``tasks.executors.rank_main``). The pool process that runs the Celery task stays the
owner of the task:

* rank 0 alone writes checkpoints (the ``Trainer`` does so), ``final_*``, the archive and
  the training log, and hands its result back in ``result.json``; the pool process
  uploads, stores and reports it as for one process;
* rank 0's progress reports (``progress.jsonl``) are relayed by the pool process, whose
  reports keep checking the task's lease and cancel flag: a cancel touches a flag file
  that every rank reads at the end of each step, and the ranks agree on it (an
  all-reduce), so all of them stop after the same step;
* a rank that raises writes its error (``rank-<r>.error.json``); the launcher then stops
  the others, and the task fails with that rank's error;
* the launcher runs in a session of its own and dies with the pool process, each rank
  with the launcher (``PR_SET_PDEATHSIG``): a SIGKILLed worker or pool process leaves no
  rank behind, and a lost lease, a cancel or any error kills the whole session.

A redelivered task resumes from the newest complete checkpoint like a one-process run.
DDP checkpoints hold the full (replicated) model and optimiser state, so a resume with
another N works too; only the per-rank RNG states and the data order of the rest of the
epoch then differ from an uninterrupted run.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from app.artifacts.manifest import write_json_atomic
from app.core.engines import deepspeed_installed
from app.core.errors import ExecutorError, SpecError, TaskCancelled
from app.core.task_spec import BaseTaskSpec, TrainingOptions
from tasks.executors.progress import Progress

log = logging.getLogger(__name__)

JOB_VARIABLE = "MESHQ_RANK_JOB"  # set in each rank: the job file of the run it belongs to
POLL_S = 0.2
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class RankPlan:
    world_size: int
    backend: str                        # "nccl" on GPUs, "gloo" on CPU
    device_ids: tuple[int, ...] = ()    # the CUDA devices (worker-visible ids), one per rank
    strategy: str = "ddp"
    notes: tuple[str, ...] = ()

    @property
    def spans_ranks(self) -> bool:
        return self.world_size > 1


def visible_device_ids(value: list[int] | str | None) -> list[int] | None:
    """``training.visible_devices`` (``"0,1"`` or ``[0, 1]``) as ids, or None when not given."""
    if value is None or value == "" or value == []:
        return None
    parts = value if isinstance(value, list) else [p.strip() for p in str(value).split(",") if p.strip()]
    ids = []
    for part in parts:
        try:
            ids.append(int(part))
        except (TypeError, ValueError):
            raise SpecError("spec.training.visible_devices", f"{part!r} is not a GPU index") from None
    if len(set(ids)) != len(ids):
        raise SpecError("spec.training.visible_devices", f"{value!r} names a GPU twice")
    return ids


def zero_stage(options: TrainingOptions) -> int | None:
    """The ZeRO stage the spec asks for (``deepspeed.zero_optimization.stage`` or
    ``auto_deepspeed_stage``), or None when it asks for no DeepSpeed."""
    if options.deepspeed:
        stage = (options.deepspeed.get("zero_optimization") or {}).get("stage", 0)
        return int(stage) if isinstance(stage, int) and not isinstance(stage, bool) else 0
    return options.auto_deepspeed_stage or None


def deepspeed_config(options: TrainingOptions) -> dict[str, Any] | None:
    """The DeepSpeed config a multi-rank run hands the ``Trainer`` where DeepSpeed is installed:
    the spec's own ``deepspeed`` block, or one meshq writes for ``auto_deepspeed_stage`` whose
    batch sizes, accumulation, clipping and precision are the ``Trainer``'s (``"auto"``: the
    ``Trainer`` fills them from ``training.*``, so they always agree)."""
    if zero_stage(options) is None or not deepspeed_installed():
        return None
    if options.deepspeed:
        return dict(options.deepspeed)
    return {"zero_optimization": {"stage": options.auto_deepspeed_stage},
            "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
            "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}, "zero_allow_untested_optimizer": True}


def rank_strategy(options: TrainingOptions) -> str:
    """``ddp``, or ``deepspeed-zero<stage>`` where the spec asks for DeepSpeed and it is installed."""
    stage = zero_stage(options)
    return f"deepspeed-zero{stage}" if stage is not None and deepspeed_installed() else "ddp"


def plan_ranks(options: TrainingOptions, device: str, gpus: int, cpu_ranks: int) -> RankPlan:
    """How many ranks this task runs as on this worker (``gpus``: the GPUs it owns)."""
    notes: list[str] = []
    asks_zero = zero_stage(options) is not None
    if asks_zero and not deepspeed_installed():
        notes.append("training.deepspeed, training.auto_deepspeed_stage: DeepSpeed is not installed on this "
                     "worker (make install-deepspeed); the ranks train with plain data parallel (DDP), each "
                     "holding the whole model")
    if not options.allow_multi_gpu:
        if options.visible_devices is not None:
            notes.append("training.visible_devices: no effect without training.allow_multi_gpu: true")
        if asks_zero and deepspeed_installed():
            notes.append("training.deepspeed, training.auto_deepspeed_stage: no effect without "
                         "training.allow_multi_gpu: true (one process)")
        return RankPlan(1, "gloo" if device != "cuda" else "nccl", notes=tuple(notes))
    if device == "cuda":
        ids = visible_device_ids(options.visible_devices)
        if ids is None:
            ids = list(range(gpus))
        foreign = [i for i in ids if not 0 <= i < gpus]
        if foreign:
            raise SpecError("spec.training.visible_devices",
                            f"GPU {foreign[0]} is not one of this worker's {gpus} GPU(s)"
                            + (f" (0-{gpus - 1})" if gpus else ""))
        return _with_one_rank_note(RankPlan(max(len(ids), 1), "nccl", tuple(ids), rank_strategy(options),
                                            notes=tuple(notes)), asks_zero)
    if options.visible_devices is not None:
        notes.append("training.visible_devices: no effect on a CPU worker (MESHQ_CPU_RANKS sets its ranks)")
    return _with_one_rank_note(RankPlan(cpu_ranks, "gloo", strategy=rank_strategy(options), notes=tuple(notes)),
                               asks_zero)


def _with_one_rank_note(plan: RankPlan, asks_zero: bool) -> RankPlan:
    """One rank after all (one GPU, ``MESHQ_CPU_RANKS=1``): one process as without
    ``allow_multi_gpu``, and DeepSpeed, where installed, has nothing to shard over."""
    if plan.spans_ranks or not asks_zero or not deepspeed_installed():
        return plan
    return RankPlan(1, plan.backend, plan.device_ids, "ddp", plan.notes + (
        "training.deepspeed, training.auto_deepspeed_stage: no effect with one rank on this worker (one process)",))


def current_rank() -> tuple[int, int]:
    """``(rank, world size)`` of this process: ``(0, 1)`` outside a multi-rank run."""
    if not os.environ.get(JOB_VARIABLE):
        return 0, 1
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux; elsewhere a no-op)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return


# -- the job directory: what the pool process and the ranks share ------------------------------
class RankFiles:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.job = directory / "job.json"
        self.progress = directory / "progress.jsonl"
        self.cancel = directory / "cancel"
        self.result = directory / "result.json"
        self.cancelled = directory / "cancelled.json"
        self.log = directory / "ranks.log"

    def error(self, rank: int) -> Path:
        return self.dir / f"rank-{rank}.error.json"

    def errors(self) -> list[dict[str, Any]]:
        """Errors the ranks wrote, the earliest first (the others usually follow from it)."""
        found = sorted(self.dir.glob("rank-*.error.json"), key=lambda p: p.stat().st_mtime_ns)
        out = []
        for path in found:
            try:
                out.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
        return out


class RankProgress(Progress):
    """The ``Progress`` of a rank: rank 0 appends its reports to ``progress.jsonl`` for the pool
    process to relay; every rank reads the cancel flag file, and inside a process group the
    ranks agree on it (any rank's "cancelled" stops all of them after the same step)."""

    def __init__(self, files: RankFiles, rank: int, task_id: str, run: int | None) -> None:
        self.files = files
        self.rank = rank
        self.task_id = task_id
        self.run = run

    def __call__(self, force: bool = False, **fields: Any) -> None:
        if self.rank == 0:
            with open(self.files.progress, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"force": force, **fields}) + "\n")

    def cancelled(self) -> bool:
        flag = self.files.cancel.exists()
        try:
            import torch.distributed as dist
        except ImportError:
            return flag
        if not (dist.is_available() and dist.is_initialized()):
            return flag
        import torch

        agreed = torch.tensor([1 if flag else 0], dtype=torch.int32,
                              device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        return bool(agreed.item())


# -- the pool process's side ---------------------------------------------------------------
def run_ranks(spec: BaseTaskSpec, out_dir: Path, progress: Progress, plan: RankPlan) -> dict[str, Any]:
    """Run ``spec`` as ``plan.world_size`` ranks; return rank 0's result (``TaskCancelled`` when
    the task was cancelled, the first failing rank's error when one failed)."""
    files = RankFiles(out_dir / ".meshq" / f"ranks-{progress.run or 0}")
    if files.dir.exists():
        import shutil

        shutil.rmtree(files.dir)
    files.dir.mkdir(parents=True)
    write_json_atomic(files.job, {"spec": spec.model_dump(mode="json", by_alias=True, exclude_unset=True),
                           "out_dir": str(out_dir), "task_id": progress.task_id, "run": progress.run,
                           "plan": asdict(plan)})
    env = {**os.environ, JOB_VARIABLE: str(files.job)}
    if plan.device_ids:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        owned = [d.strip() for d in visible.split(",")] if visible else [str(i) for i in range(max(plan.device_ids) + 1)]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(owned[i] for i in plan.device_ids)
    else:
        env.setdefault("OMP_NUM_THREADS", "1")  # one core per rank; MESHQ_CPU_RANKS is the parallelism
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={plan.world_size}",
               "--max-restarts=0", "--monitor-interval=0.5", "-m", "tasks.executors.rank_main", str(files.job)]
    log.info("task %s: training on %d ranks (%s, %s)", progress.task_id, plan.world_size, plan.backend,
             plan.strategy)
    with open(files.log, "ab") as output:
        launcher = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT,
                                    start_new_session=True, preexec_fn=die_with_parent)
    try:
        code = _follow(launcher, files, progress)
    except BaseException:
        _kill_session(launcher)
        raise
    _kill_session(launcher)  # nothing of the run outlives it, whatever the launcher left
    if files.cancelled.exists():
        where = json.loads(files.cancelled.read_text()).get("where", "")
        raise TaskCancelled(progress.task_id, where)
    if code == 0 and files.result.exists():
        result: dict[str, Any] = json.loads(files.result.read_text())
        return result
    raise rank_error(files, code)


def _follow(launcher: subprocess.Popen[bytes], files: RankFiles, progress: Progress) -> int:
    """Relay rank 0's progress, pass a cancel on to the ranks, until the launcher exits."""
    offset = 0
    told_cancel = False
    while True:
        code = launcher.poll()
        offset = _relay(files, progress, offset)
        if not told_cancel and progress.cancelled():  # also the lease check: LeaseLost stops the run
            files.cancel.touch()
            told_cancel = True
        if code is not None:
            return code
        time.sleep(POLL_S)


def _relay(files: RankFiles, progress: Progress, offset: int) -> int:
    try:
        with open(files.progress, "rb") as fh:
            fh.seek(offset)
            chunk = fh.read()
    except FileNotFoundError:
        return offset
    complete = chunk[:chunk.rfind(b"\n") + 1]
    for line in complete.splitlines():
        fields = json.loads(line)
        force = bool(fields.pop("force", False))
        progress(force=force, **fields)
    return offset + len(complete)


def _kill_session(launcher: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(launcher.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    launcher.wait()


def rank_error(files: RankFiles, code: int | None) -> Exception:
    """The first failing rank's error, as the exception type it raised where meshq has one."""
    errors = files.errors()
    if not errors:
        tail = files.log.read_text(errors="replace")[-2000:] if files.log.exists() else ""
        return ExecutorError(f"the training ranks exited with status {code} without a result; launcher log:\n{tail}")
    first = errors[0]
    message = f"rank {first['rank']} of {first.get('world_size', '?')}: {first['message']}"
    if first.get("type") == "SpecError" and first.get("field"):
        return SpecError(first["field"], message)
    return ExecutorError(f"{first.get('type', 'Error')} on {message}")
