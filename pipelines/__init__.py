"""Staged pipelines: templates → Celery chains, ``${...}`` references, submission API.

    from pipelines import Pipeline
    run = Pipeline.from_yaml("pipelines/examples/lora_then_infer.yaml").submit()
    print(run.wait(progress=True))       # {stage_name: result}

See docs/PIPELINES.md.
"""

from pathlib import Path

from pipelines.pipeline import Pipeline
from pipelines.run import PipelineRun

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"

__all__ = ["EXAMPLES_DIR", "Pipeline", "PipelineRun"]
