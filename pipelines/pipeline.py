"""``Pipeline``: a validated template that becomes one Celery canvas when submitted.

Pipelines are data until submitted: ``Pipeline.from_yaml(path)`` validates,
``.graph()`` builds the Celery canvas without touching a broker (a linear
pipeline's is its chain, also ``.chain()``; a DAG's has groups and chords,
``pipelines.graph``), ``.submit()`` records the pipeline in Redis and sends the canvas.

Each stage (or node) is the per-type task (``meshq.<taskType>``) with the stage's
merged spec and a ``pipeline`` kwarg (pipeline id, stage name and index, every
stage's task id, ``runOn``; for a node also ``graph``, ``depends_on`` and
``ancestors``, which a stage's message leaves to the worker to derive from its
index), sent to the queue of the stage's own tags. Task ids are generated
here, before anything is sent, so every stage can be looked up by id from the
moment ``submit`` returns. A one-stage pipeline (a plain task spec) uses its task id
as the pipeline id.
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery.canvas import Signature

from app.core.capabilities import Requirement
from app.core.errors import SpecError
from app.core.events import utc_now_iso
from app.sent_tasks import record_ttl_s, written_with_publish
from pipelines.graph import compile_canvas
from pipelines.run import PipelineRun
from pipelines.template import PipelineTemplate, StageTemplate, load_document, load_file, parse_pipeline
from tasks.placement import queue_for, queue_warning, record_queue, requirement_for
from tasks.submit import task_for_type


@dataclass(frozen=True)
class StageRoute:
    """Where a stage is first sent (a ``runOn`` stage is re-pointed at run time): its tags'
    queue or the capability queue of its ``resources`` (``tasks.placement``), and what it needs."""

    queue: str
    requirement: Requirement


def stage_route(stage: StageTemplate) -> StageRoute:
    """From the spec parsed at submission (the raw spec, parsed for its routing fields, where a
    reference kept it from being typed)."""
    requirement = requirement_for(stage.parsed if stage.parsed is not None else stage.spec)
    return StageRoute(queue_for(requirement), requirement)


def stage_task(stage: StageTemplate) -> Any:
    try:
        return task_for_type(stage.task_type)
    except KeyError:
        raise SpecError(f"{stage.location}.taskType",
                        f"no task is registered for {stage.task_type!r} in this installation") from None


class Pipeline:
    """A validated pipeline template (see ``pipelines.template`` for the format)."""

    def __init__(self, template: PipelineTemplate) -> None:
        self.template = template

    @functools.cached_property
    def routes(self) -> dict[str, StageRoute]:
        """Each stage's route, worked out once (the canvas, the queue records, the warnings
        and the pipeline record all read it)."""
        return {stage.name: stage_route(stage) for stage in self.stages}

    # -- loading --------------------------------------------------------------
    @classmethod
    def from_dict(cls, document: Mapping[str, Any], *, env: Mapping[str, str] | None = None,
                  expand_environment: bool = True) -> Pipeline:
        """From a document (or bare task spec); ``${env:NAME}`` expands from ``env`` or os.environ."""
        return cls(parse_pipeline(document, env=env, expand_environment=expand_environment))

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None) -> Pipeline:
        """From a YAML or JSON file."""
        return cls.from_dict(load_file(Path(path)), env=env)

    @classmethod
    def from_text(cls, text: str | bytes, source: str = "document", *, env: Mapping[str, str] | None = None,
                  expand_environment: bool = True) -> Pipeline:
        return cls.from_dict(load_document(text, source), env=env, expand_environment=expand_environment)

    # -- views ----------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.template.name

    @property
    def stages(self) -> tuple[StageTemplate, ...]:
        return self.template.stages

    @property
    def document(self) -> dict[str, Any]:
        return self.template.document

    @property
    def is_graph(self) -> bool:
        return self.template.is_graph

    def __repr__(self) -> str:
        if self.is_graph:
            return f"Pipeline({self.name!r}, nodes={ {s.name: list(s.depends_on) for s in self.stages} })"
        return f"Pipeline({self.name!r}, stages={[s.name for s in self.stages]})"

    # -- the Celery canvas ----------------------------------------------------
    def stage_info(self, stage: StageTemplate, pipeline_id: str, task_ids: list[str]) -> dict[str, Any]:
        """The ``pipeline`` kwarg each stage task receives (everything the worker needs)."""
        info = {"id": pipeline_id, "name": self.name, "stage": stage.name, "index": stage.index,
                "location": stage.location, "run_on": stage.run_on,
                "stages": [{"name": s.name, "task_id": t} for s, t in zip(self.stages, task_ids, strict=True)]}
        if self.is_graph:
            info.update(graph=True, depends_on=list(stage.depends_on), ancestors=list(stage.ancestors))
        return info

    def signature(self, stage: StageTemplate, pipeline_id: str, task_ids: list[str], task_id: str,
                  *, immutable: bool = False) -> Signature:
        """One stage's (or node's) task, with its id and queue."""
        task = stage_task(stage)
        make = task.si if immutable else task.s
        signature: Signature = make(stage.spec, pipeline=self.stage_info(stage, pipeline_id, task_ids))
        return signature.set(task_id=task_id, queue=self.routes[stage.name].queue)

    def graph(self, pipeline_id: str | None = None, task_ids: list[str] | None = None) -> Any:
        """The Celery canvas (no broker needed): ``pipelines.graph.compile_canvas`` of the nodes,
        which for a linear pipeline (a path) is its chain. Task ids follow the order of
        ``stages`` (dependencies first) and are generated unless given."""
        pipeline_id = pipeline_id or str(uuid.uuid4())
        task_ids = task_ids or [str(uuid.uuid4()) for _ in self.stages]
        if len(task_ids) != len(self.stages):
            raise ValueError(f"task_ids: {len(task_ids)} ids for {len(self.stages)} {self.template.form.kind}s")
        by_name = {stage.name: (stage, task_id) for stage, task_id in zip(self.stages, task_ids, strict=True)}

        def signature_of(name: str) -> Signature:
            stage, task_id = by_name[name]
            # A chain hands each stage the previous stage's result; graph nodes are immutable and
            # read the results they reference from the backend (a chord would otherwise hand
            # every header's result on).
            return self.signature(stage, pipeline_id, task_ids, task_id, immutable=self.is_graph)

        return compile_canvas([s.name for s in self.stages], {s.name: s.depends_on for s in self.stages},
                              signature_of)

    def chain(self, pipeline_id: str | None = None, task_ids: list[str] | None = None) -> Any:
        """The canvas of a linear pipeline, which is a chain (``graph()`` for a DAG)."""
        if self.is_graph:
            raise ValueError(f"pipeline {self.name!r} is a graph, not a chain: use .graph()")
        return self.graph(pipeline_id, task_ids)

    # -- submitting -----------------------------------------------------------
    def submit(self) -> PipelineRun:
        """Record the pipeline in Redis and send its chain; returns a ``PipelineRun``."""
        task_ids = [str(uuid.uuid4()) for _ in self.stages]
        # A one-stage pipeline (a plain task) has its task's id, so either view finds it.
        pipeline_id = task_ids[0] if len(task_ids) == 1 else str(uuid.uuid4())
        canvas = self.graph(pipeline_id, task_ids)
        warnings = []
        for stage in self.stages:
            route = self.routes[stage.name]
            record_queue(route.queue, route.requirement)
            if stage.run_on is None:
                warning = queue_warning(route.queue, route.requirement)
                if warning:
                    warnings.append(f"{self.template.form.kind} {stage.name!r}: {warning}")
        run = PipelineRun(
            id=pipeline_id, name=self.name, submitted_at=utc_now_iso(), document=self.document,
            warnings=warnings,
            stages=[{"name": s.name, "task_id": t, "taskType": s.task_type, "queue": self.routes[s.name].queue,
                     "run_on": s.run_on, **({"depends_on": list(s.depends_on)} if self.is_graph else {})}
                    for s, t in zip(self.stages, task_ids, strict=True)],
            is_graph=self.is_graph)
        ttl_s = record_ttl_s()
        # The record goes out in the first message's round trip, before it (app.sent_tasks).
        with written_with_publish(lambda pipe: run.record(pipe, ttl_s)):
            canvas.apply_async()
        return run
