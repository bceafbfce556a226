"""``${...}`` reference resolution (pure: no Redis, no worker)."""

from __future__ import annotations

from typing import Any

import pytest

from app.core.errors import LimitExceeded, SpecError
from app.core.limits import MAX_MESSAGE_BYTES
from pipelines.references import expand_env, resolve_stage_references

RESULTS: dict[str, Any] = {
    "train": {"final_lora_archive_url": "http://orch:8080/api/v1/results/t1/files/final_lora.zip",
              "metrics": {"train_loss": 0.25, "steps": 40}, "ok": True, "nothing": None},
    "gen": {"items": [{"index": 0, "prompt": "hi", "output": "hello"},
                      {"index": 1, "prompt": "bye", "output": "goodbye"}],
            "usage": {"total_tokens": 12}},
}
ORDER = ["train", "gen", "infer"]  # "infer" is the stage being resolved


def results(name: str) -> Any:
    """Earlier stages of ORDER; ``stage`` is the previous one (gen)."""
    if name == "stage":
        return RESULTS["gen"]
    if name not in ORDER:
        raise LookupError(f"unknown stage {name!r} (stages: {', '.join(ORDER)})")
    if name not in RESULTS:
        raise LookupError(f"stage {name!r} has not run before this stage")
    return RESULTS[name]


def resolve(spec: Any) -> Any:
    return resolve_stage_references(spec, results, "spec.stages[2].spec", MAX_MESSAGE_BYTES)


@pytest.mark.parametrize(("value", "expected"), [
    # A whole-value reference keeps the referenced JSON type.
    ("${train.result.metrics.steps}", 40),
    ("${train.result.metrics}", {"train_loss": 0.25, "steps": 40}),
    ("${train.result.ok}", True),
    ("${train.result.nothing}", None),
    ("${gen.result.items}", RESULTS["gen"]["items"]),
    ("${train.result}", RESULTS["train"]),
    # Nested paths and list indices (dotted or bracketed, negative from the end).
    ("${gen.result.items.1.output}", "goodbye"),
    ("${gen.result.items[0].prompt}", "hi"),
    ("${gen.result.items.-1.index}", 1),
    # "stage" is the previous stage.
    ("${stage.result.usage.total_tokens}", 12),
    # Inside a longer string: strings as they are, anything else as JSON.
    ("url=${train.result.final_lora_archive_url}", "url=http://orch:8080/api/v1/results/t1/files/final_lora.zip"),
    ("steps: ${train.result.metrics.steps}, ok: ${train.result.ok}", "steps: 40, ok: true"),
    ("m=${train.result.metrics}", 'm={"train_loss": 0.25, "steps": 40}'),
    ("${gen.result.items.0.output} ${gen.result.items.1.output}", "hello goodbye"),
    # Escapes and strings without references.
    ("literal $${train.result.x}", "literal ${train.result.x}"),
    ("$${train.result.x}", "${train.result.x}"),
    ("price $5 {not a ref}", "price $5 {not a ref}"),
])
def test_resolution(value: str, expected: Any) -> None:
    assert resolve({"data": {"field": value}}) == {"data": {"field": expected}}


def test_resolution_walks_lists_and_mappings_and_copies() -> None:
    spec = {"taskType": "inference", "data": {"items": ["${gen.result.items.0.output}", "plain"]},
            "checkpoint": {"load": {"type": "http", "url": "${train.result.final_lora_archive_url}"}},
            "nested": {"whole": "${gen.result.items}"}}
    resolved = resolve(spec)
    assert resolved["data"]["items"] == ["hello", "plain"]
    assert resolved["checkpoint"]["load"]["url"] == RESULTS["train"]["final_lora_archive_url"]
    resolved["nested"]["whole"][0]["output"] = "changed"
    assert RESULTS["gen"]["items"][0]["output"] == "hello"  # results are copied, not shared
    assert spec["data"]["items"][0] == "${gen.result.items.0.output}"  # the input is not modified


@pytest.mark.parametrize(("value", "location", "message"), [
    ("${trian.result.url}", "spec.stages[2].spec.checkpoint.load.url",
     "${trian.result.url}: unknown stage 'trian' (stages: train, gen, infer)"),
    ("${train.result.final_model_archive_url}", "spec.stages[2].spec.checkpoint.load.url",
     "${train.result.final_model_archive_url}: train.result has no field 'final_model_archive_url' "
     "(fields: final_lora_archive_url, metrics, nothing, ok)"),
    ("${train.result.metrics.steps.x}", "spec.stages[2].spec.checkpoint.load.url",
     "train.result.metrics.steps is int 40, it has no field 'x'"),
    ("${gen.result.items.7.output}", "spec.stages[2].spec.checkpoint.load.url",
     "gen.result.items has 2 items: index 7 is out of range"),
    ("${gen.result.items.first}", "spec.stages[2].spec.checkpoint.load.url",
     "gen.result.items is a list: 'first' is not an index"),
    ("${infer.result.x}", "spec.stages[2].spec.checkpoint.load.url",
     "stage 'infer' has not run before this stage"),
    ("see ${trian.result.url} here", "spec.stages[2].spec.checkpoint.load.url", "unknown stage 'trian'"),
    ("${train.results.url}", "spec.stages[2].spec.checkpoint.load.url", "is not a reference"),
    ("${env:HOME}", "spec.stages[2].spec.checkpoint.load.url", "must be expanded before submission"),
])
def test_resolution_errors_name_the_field_and_the_reference(value: str, location: str, message: str) -> None:
    spec = {"checkpoint": {"load": {"type": "http", "url": value}}}
    with pytest.raises(SpecError) as info:
        resolve(spec)
    assert info.value.field == location
    assert message in info.value.message


def test_error_location_of_a_list_item() -> None:
    with pytest.raises(SpecError) as info:
        resolve({"data": {"items": ["ok", "${nope.result.x}"]}})
    assert info.value.field == "spec.stages[2].spec.data.items[1]"


@pytest.mark.parametrize(("value", "expected"), [
    ("${env:MODEL}", "/models/tiny"),
    ("${env:MISSING:-fallback}", "fallback"),
    ("${env:MISSING:-}", ""),
    ("at ${env:MODEL}/x", "at /models/tiny/x"),
    ("${train.result.url}", "${train.result.url}"),      # stage references wait for the worker
    ("$${env:MODEL}", "$${env:MODEL}"),                  # escapes survive until the final pass
])
def test_environment_references(value: str, expected: Any) -> None:
    assert expand_env({"v": value}, {"MODEL": "/models/tiny"}, "") == {"v": expected}


def test_missing_environment_variable_and_disabled_expansion() -> None:
    with pytest.raises(SpecError, match=r"^spec\.model\.source\.identifier: \$\{env:MESHQ_MODEL\}: "
                                        r"environment variable MESHQ_MODEL is not set$"):
        expand_env({"spec": {"model": {"source": {"identifier": "${env:MESHQ_MODEL}"}}}}, {}, "")
    with pytest.raises(SpecError, match="expanded only by the client"):
        expand_env({"spec": {"x": "${env:HOME}"}}, None, "")


def test_a_spec_grown_by_its_references_fails_before_the_copies_exist() -> None:
    """16 references to a 1 KiB result under an 8 KiB limit: LimitExceeded naming the limit and
    the reference where it was passed, after at most 8 results were looked up."""
    looked_up = []

    def big(name: str) -> Any:
        looked_up.append(name)
        return {"text": "z" * 1024}

    spec = {"taskType": "echo", "data": {"copies": ["${gen.result}"] * 16}}
    with pytest.raises(LimitExceeded) as info:
        resolve_stage_references(spec, big, "spec.stages[1].spec", 8 * 1024)
    assert info.value.field.startswith("spec.stages[1].spec.data.copies[")
    assert "(MAX_MESSAGE_BYTES=8192)" in str(info.value) and len(looked_up) <= 8
    # The same spec under the default limit resolves.
    assert len(resolve_stage_references(spec, big, "spec", MAX_MESSAGE_BYTES)["data"]["copies"]) == 16
