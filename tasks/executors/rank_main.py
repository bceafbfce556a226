"""One rank of a multi-rank training task (``tasks.executors.ranks``), started by torchrun.

``python -m torch.distributed.run ... -m tasks.executors.rank_main <job.json>``: reads the
job its pool process wrote, runs the task's executor with a ``RankProgress`` and hands back
rank 0's result (``result.json``), a cancel (``cancelled.json``) or this rank's error
(``rank-<r>.error.json``, then exit status 1: the launcher stops the other ranks).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

from app.artifacts.manifest import write_json_atomic
from app.core.errors import SpecError, TaskCancelled
from tasks.executors.ranks import RankFiles, RankProgress, die_with_parent


def main(job_path: str) -> int:
    die_with_parent()  # the launcher died (its pool process was killed): so does this rank
    if os.getppid() == 1:  # it died before the line above took effect
        return 1
    files = RankFiles(Path(job_path).parent)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    try:
        # Imported here: a failure to import is this rank's error like any other.
        from app.core.task_spec import parse_task_spec
        from tasks.executors import EXECUTORS

        job = json.loads(files.job.read_text())
        spec = parse_task_spec(job["spec"])
        progress = RankProgress(files, rank, job["task_id"], job["run"])
        try:
            result = EXECUTORS[spec.taskType]().run(spec, Path(job["out_dir"]), progress)
        except TaskCancelled as exc:
            if rank == 0:
                write_json_atomic(files.cancelled, {"where": exc.where})
            return 0
        if rank == 0:
            write_json_atomic(files.result, result)
        return 0
    except BaseException as exc:  # noqa: BLE001 (every error of a rank is reported as such)
        write_json_atomic(files.error(rank), {
            "rank": rank, "world_size": world, "type": type(exc).__name__,
            "field": exc.field if isinstance(exc, SpecError) else None,
            "message": exc.message if isinstance(exc, SpecError) else str(exc),
            "traceback": traceback.format_exc()[-4000:]})
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
