"""Pipeline templates and chain building (pure: no broker is needed to build a chain)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from app.core.errors import SpecError
from pipelines import EXAMPLES_DIR, Pipeline
from pipelines.template import deep_merge

ENV = {"MESHQ_MODEL": "/models/tiny", "MESHQ_QUESTIONS": "/data/questions.jsonl"}


def lora_then_infer() -> dict[str, Any]:
    return {
        "apiVersion": "meshq/v1", "kind": "Pipeline", "metadata": {"name": "lora-then-infer"},
        "spec": {
            "model": {"source": {"identifier": "${env:MESHQ_MODEL}"}, "transformers": {"device_map": "cpu"}},
            "stages": [
                {"name": "train", "tags": ["trainer"],
                 "spec": {"taskType": "lora_sft", "data": {"prompts": [{"prompt": "a", "response": "b"}]},
                          "training": {"max_steps": 5}, "output": {"destination": {"type": "http"}}}},
                {"name": "infer", "tags": ["inferer"],
                 "spec": {"taskType": "inference", "data": {"type": "list", "items": ["a"]},
                          "checkpoint": {"load": {"type": "http",
                                                  "url": "${train.result.final_lora_archive_url}"}}}},
            ]}}


def rejects(document: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        Pipeline.from_dict(document, env=ENV)
    assert info.value.field == field, str(info.value)
    assert message in info.value.message, str(info.value)


def test_stages_merge_over_the_shared_spec() -> None:
    pipeline = Pipeline.from_dict(lora_then_infer(), env=ENV)
    assert pipeline.name == "lora-then-infer"
    train, infer = pipeline.stages
    assert (train.name, train.task_type, train.tags) == ("train", "lora_sft", ["trainer"])
    assert train.spec["model"] == {"source": {"identifier": "/models/tiny"}, "transformers": {"device_map": "cpu"}}
    assert infer.spec["checkpoint"]["load"]["url"] == "${train.result.final_lora_archive_url}"
    assert "training" not in infer.spec and infer.run_on is None


def test_merge_is_json_merge_patch() -> None:
    base = {"a": {"b": 1, "c": 2}, "l": [1, 2], "keep": "x"}
    assert deep_merge(base, {"a": {"c": 3, "d": 4}, "l": [9], "keep": None}) == \
        {"a": {"b": 1, "c": 3, "d": 4}, "l": [9]}
    assert base == {"a": {"b": 1, "c": 2}, "l": [1, 2], "keep": "x"}


def test_plain_spec_is_a_one_stage_pipeline() -> None:
    bare = {"taskType": "echo", "data": {"x": 1}}
    for document in (bare, {"apiVersion": "meshq/v1", "kind": "EchoTask", "spec": bare}):
        pipeline = Pipeline.from_dict(document)
        assert [(s.name, s.task_type, s.location) for s in pipeline.stages] == [("echo", "echo", "spec")]
        assert pipeline.stages[0].spec == bare
    rejects({"spec": {"taskType": "echo", "data": {"x": "${stage.result.y}"}}}, "spec.data.x",
            "the first stage has no previous stage")
    rejects({"spec": {"taskType": "echo", "bogus": 1}}, "spec.bogus", "unknown field")


def test_a_reference_holding_field_passes_submission_validation() -> None:
    """A URL that only exists after stage 1 cannot be checked now; everything else can."""
    document = lora_then_infer()
    document["spec"]["stages"][1]["spec"]["inference"] = {"max_new_tokens": "${train.result.steps}"}
    Pipeline.from_dict(document, env=ENV)
    document["spec"]["stages"][1]["spec"]["inference"] = {"max_new_tokens": "many"}
    rejects(document, "spec.stages[1].spec.inference.max_new_tokens", "valid integer")


@pytest.mark.parametrize(("mutate", "field", "message"), [
    (lambda d: d["spec"]["stages"][1]["spec"]["checkpoint"]["load"].update(url="${trian.result.final_lora_archive_url}"),
     "spec.stages[1].spec.checkpoint.load.url", "unknown stage 'trian'"),
    (lambda d: d["spec"]["stages"][0]["spec"]["data"].update(prompts="${infer.result.items}"),
     "spec.stages[0].spec.data.prompts", "stage 'infer' runs after this stage"),
    (lambda d: d["spec"]["stages"][1]["spec"]["data"].update(items=["${infer.result.items.0}"]),
     "spec.stages[1].spec.data.items[0]", "cannot refer to its own result"),
    (lambda d: d["spec"]["stages"][1].update(name="train"), "spec.stages[1].name", "duplicate stage name 'train'"),
    (lambda d: d["spec"]["stages"][1].update(name="stage"), "spec.stages[1].name", "reserved"),
    (lambda d: d["spec"]["stages"][1].update(name="bad name"), "spec.stages[1].name", "1-64 characters"),
    (lambda d: d["spec"]["stages"][1].update(runOn={"stage": "nope"}), "spec.stages[1].runOn.stage", "unknown stage"),
    (lambda d: d["spec"]["stages"][0].update(runOn={"stage": "infer"}), "spec.stages[0].runOn.stage",
     "does not run before"),
    (lambda d: d["spec"]["stages"][1].update(runOn="train"), "spec.stages[1].runOn", "must be {stage:"),
    (lambda d: d["spec"]["stages"][1].update(extra=1), "spec.stages[1].extra", "unknown field"),
    (lambda d: d["spec"]["stages"][1]["spec"].update(tags=["${train.result.worker_id}"]) or d["spec"]["stages"][1].pop("tags"),
     "spec.stages[1].spec.tags[0]", "references are not allowed in tags"),
    (lambda d: d["spec"]["stages"][1]["spec"].pop("data"), "spec.stages[1].spec.data", "required"),
    (lambda d: d["spec"]["stages"][1]["spec"].update(taskType="infer"), "spec.stages[1].spec.taskType",
     "unknown task type"),
    (lambda d: d["spec"]["model"]["source"].update(bogus=1), "spec.model.source.bogus", "unknown field"),
    (lambda d: d["spec"]["model"]["source"].update(identifier="${env:NOT_SET_ANYWHERE}"),
     "spec.model.source.identifier", "environment variable NOT_SET_ANYWHERE is not set"),
    (lambda d: d["spec"].update(stages=[]), "spec.stages", "non-empty list"),
    (lambda d: d.update(extra={}), "extra", "unknown field"),
    (lambda d: d["spec"]["stages"][1]["spec"]["checkpoint"]["load"].update(url="${train.result.x.}"),
     "spec.stages[1].spec.checkpoint.load.url", "is not a reference"),
])
def test_invalid_templates_are_rejected_with_their_location(mutate: Any, field: str, message: str) -> None:
    document = lora_then_infer()
    mutate(document)
    rejects(document, field, message)


def test_chain_is_built_without_a_broker() -> None:
    document = {"metadata": {"name": "echoes"}, "spec": {"taskType": "echo", "stages": [
        {"name": "one", "tags": ["cpu", "big"], "spec": {"data": {"x": 1}}},
        {"name": "two", "runOn": {"stage": "one"}, "spec": {"data": {"y": "${one.result.echo.data.x}"}}}]}}
    pipeline = Pipeline.from_dict(document)
    canvas = pipeline.chain("pipe-1", ["t-one", "t-two"])
    first, second = canvas.tasks
    assert (first.task, second.task) == ("meshq.echo", "meshq.echo")
    assert first.options["task_id"] == "t-one" and first.options["queue"] == "tasks.big+cpu"
    assert second.options["task_id"] == "t-two" and second.options["queue"] == "tasks"
    assert first.args == ({"taskType": "echo", "tags": ["cpu", "big"], "data": {"x": 1}},)
    assert second.kwargs["pipeline"] == {
        "id": "pipe-1", "name": "echoes", "stage": "two", "index": 1, "location": "spec.stages[1].spec",
        "run_on": "one", "stages": [{"name": "one", "task_id": "t-one"}, {"name": "two", "task_id": "t-two"}]}


def test_unterminated_reference_is_plain_text() -> None:
    pipeline = Pipeline.from_dict({"spec": {"taskType": "echo", "data": {"x": "${one.result"}}})
    assert pipeline.stages[0].spec["data"]["x"] == "${one.result"


@pytest.mark.parametrize("path", sorted(EXAMPLES_DIR.glob("*.yaml")), ids=lambda p: Path(p).name)
def test_examples_are_valid(path: Path) -> None:
    pipeline = Pipeline.from_yaml(path, env=ENV)
    assert len(pipeline.stages) >= 2
    assert pipeline.stages[0].spec["model"]["source"]["identifier"] == "/models/tiny"


def test_examples_exist() -> None:
    names = {p.name for p in EXAMPLES_DIR.glob("*.yaml")}
    assert {"lora_then_infer.yaml", "sft_then_infer.yaml", "shared_storage_lora_then_infer.yaml"} <= names


def test_from_yaml_reports_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML or JSON"):
        Pipeline.from_yaml(bad)
    with pytest.raises(SpecError, match="cannot read"):
        Pipeline.from_yaml(tmp_path / "missing.yaml")
    dates = tmp_path / "dates.yaml"
    dates.write_text("spec: {taskType: echo, data: {when: 2024-01-01}}\n")
    with pytest.raises(SpecError, match="plain JSON data"):
        Pipeline.from_yaml(dates)


def test_input_document_is_not_modified() -> None:
    document = lora_then_infer()
    before = copy.deepcopy(document)
    Pipeline.from_dict(document, env=ENV)
    assert document == before
