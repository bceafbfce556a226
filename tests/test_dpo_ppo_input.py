"""Bad dpo/ppo input: refused at submission (the HTTP server, ``parse_task_spec``) or by the worker
(a preference file row without ``rejected``), each error naming the field; the worker goes on."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests

from app.core.errors import SpecError
from app.core.task_spec import parse_task_spec
from tests.conftest import ROOT

MODEL = {"source": {"identifier": "/models/tiny"}}
PAIR = {"prompt": "p", "chosen": "c", "rejected": "r"}


def dpo(**sections: Any) -> dict[str, Any]:
    return {"taskType": "dpo", "model": MODEL, "data": {"preferences": [PAIR]}, **sections}


def ppo(**sections: Any) -> dict[str, Any]:
    return {"taskType": "ppo", "model": MODEL, "reward_model": {"identifier": "/models/reward"},
            "data": {"prompts": ["q"]}, **sections}


BAD_SPECS: list[tuple[str, dict[str, Any], str, str]] = [
    ("preference row without rejected", dpo(data={"preferences": [{"prompt": "p", "chosen": "c"}]}),
     "spec.data.preferences.0.rejected", "Field required"),
    ("negative beta", dpo(training={"beta": -1}), "spec.training.beta", "greater than 0"),
    ("ppo without a reward model", {k: v for k, v in ppo().items() if k != "reward_model"},
     "spec.reward_model", "required for taskType 'ppo'"),
    ("dpo on plain prompts", dpo(data={"prompts": ["q"]}), "spec.data.prompts", "dpo trains on preference pairs"),
    ("ppo on preference pairs", ppo(data={"preferences": [PAIR]}), "spec.data.preferences",
     "ppo generates from prompts"),
    ("sft on preference pairs", {**dpo(), "taskType": "sft"}, "spec.data.preferences", "dpo data"),
    ("mini-batch larger than the batch", ppo(training={"batch_size": 2, "mini_batch_size": 4}),
     "spec.training.mini_batch_size", "larger than batch_size 2"),
    ("beta on ppo", ppo(training={"beta": 0.1}), "spec.training", "beta is a dpo setting"),
    ("ppo epochs on dpo", dpo(training={"ppo_epochs": 2}), "spec.training", "ppo_epochs is a ppo setting"),
    ("zero ppo epochs", ppo(training={"ppo_epochs": 0}), "spec.training.ppo_epochs", "greater than or equal to 1"),
    ("negative target_kl", ppo(training={"target_kl": -0.1}), "spec.training.target_kl", "greater than 0"),
    ("generation on dpo", dpo(generation={"max_new_tokens": 4}), "spec.generation", "only allowed for taskType 'ppo'"),
    ("zero new tokens", ppo(generation={"max_new_tokens": 0}), "spec.generation.max_new_tokens",
     "greater than or equal to 1"),
    ("reward model without identifier", ppo(reward_model={"type": "sentiment"}), "spec.reward_model.identifier",
     "Field required"),
    ("unknown reward model type", ppo(reward_model={"identifier": "/rm", "type": "toxicity"}),
     "spec.reward_model.type", "'sentiment'"),
    ("packing on dpo", dpo(training={"packing": True}), "spec.training", "packing concatenates sft examples"),
    ("mixed precision on ppo", ppo(training={"bf16": True}), "spec.training", "not implemented for ppo"),
    # A section of another task type names the types that use it (not "unknown field").
    ("reward model on dpo", dpo(reward_model={"identifier": "/rm"}), "spec.reward_model",
     "only allowed for taskType 'ppo', not 'dpo'"),
    ("inference options on ppo", ppo(inference={"max_new_tokens": 4}), "spec.inference",
     "only allowed for taskType 'inference', not 'ppo'"),
    ("lora on sft", {**dpo(), "taskType": "sft", "data": {"prompts": ["q"]}, "lora": {"r": 4}}, "spec.lora",
     "only allowed for taskType lora_sft, dpo, ppo, not 'sft'"),
    ("echo options on dpo", dpo(echo={"message": "hi"}), "spec.echo", "only allowed for taskType 'echo', not 'dpo'"),
]


@pytest.mark.parametrize(("label", "raw", "field", "message"), BAD_SPECS, ids=[case[0] for case in BAD_SPECS])
def test_bad_specs_name_the_field(label: str, raw: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_task_spec(raw)
    assert caught.value.field == field, f"{label}: {caught.value}"
    assert message in str(caught.value), f"{label}: {caught.value}"


def test_every_way_in_refuses_them_at_submission(server_factory, redis_url: str, tmp_path: Path) -> None:
    """The same refusal, naming the same field, from the HTTP server (422), ``meshq submit``
    (exit 2) and ``Pipeline.from_dict`` (``SpecError``) — type/data mismatches included."""
    from pipelines import Pipeline

    server = server_factory()
    for label, raw, field, message in BAD_SPECS:
        # Documents name list items as in YAML paths: preferences[0].rejected
        named = re.sub(r"\.(\d+)\.", r"[\1].", field)
        reply = requests.post(f"{server.base_url}/api/v1/tasks", json={"spec": raw}, timeout=30)
        assert reply.status_code == 422, f"{label}: {reply.status_code} {reply.text}"
        assert reply.json()["field"] == named, f"{label}: {reply.text}"
        assert message in reply.json()["detail"], f"{label}: {reply.text}"

        with pytest.raises(SpecError) as caught:
            Pipeline.from_dict({"spec": raw})
        assert caught.value.field == named and message in str(caught.value), f"{label}: {caught.value}"

    for label, raw, field, message in [case for case in BAD_SPECS if "on p" in case[0]]:  # the mismatches
        document = tmp_path / "task.json"
        document.write_text(json.dumps({"spec": raw}))
        submitted = subprocess.run([sys.executable, "-m", "cli.main", "submit", str(document)], cwd=ROOT,
                                   env={**os.environ, "REDIS_URL": redis_url}, capture_output=True, text=True,
                                   timeout=120)
        assert submitted.returncode == 2, f"{label}: {submitted.returncode} {submitted.stderr}"
        assert field in submitted.stderr and message in submitted.stderr, f"{label}: {submitted.stderr}"


def test_a_misplaced_section_is_named_while_other_fields_wait_for_references() -> None:
    """A stage whose data is an earlier stage's result (typed once resolved, on the worker) still
    has a section of another task type refused at submission, with the same message."""
    from pipelines import Pipeline

    stages = {"stages": [{"name": "greet", "spec": {"taskType": "echo"}},
                         {"name": "train", "spec": dpo(data={"preferences": "${greet.result.pairs}"},
                                                       generation={"max_new_tokens": 4})}]}
    with pytest.raises(SpecError) as caught:
        Pipeline.from_dict(stages)
    assert caught.value.field == "spec.stages[1].spec.generation", caught.value
    assert "only allowed for taskType 'ppo', not 'dpo'" in str(caught.value)


BARE_PIPELINE = {"stages": [
    {"name": "greet", "spec": {"taskType": "echo", "echo": {"message": "hi"}}},
    {"name": "train", "spec": {**dpo(), "data": {"prompts": ["q"]}}},
]}


def test_a_bare_stages_document_gets_the_same_answer_everywhere(server_factory, redis_url: str,
                                                                 tmp_path: Path) -> None:
    """A document that is a bare ``{stages: ...}`` is read as a pipeline by ``Pipeline.from_dict``,
    ``meshq submit`` and ``POST /api/v1/tasks`` alike: here all three refuse its dpo stage on
    prompts, naming the same field; with that stage fixed, all three accept it."""
    from pipelines import Pipeline

    field, message = "spec.stages[1].spec.data.prompts", "dpo trains on preference pairs"
    with pytest.raises(SpecError) as caught:
        Pipeline.from_dict(BARE_PIPELINE)
    assert caught.value.field == field and message in str(caught.value)

    server = server_factory()
    reply = requests.post(f"{server.base_url}/api/v1/tasks", json=BARE_PIPELINE, timeout=30)
    assert reply.status_code == 422, reply.text
    assert reply.json()["field"] == field and message in reply.json()["detail"], reply.text

    document = tmp_path / "pipeline.yaml"
    document.write_text(json.dumps(BARE_PIPELINE))
    submitted = subprocess.run([sys.executable, "-m", "cli.main", "submit", str(document)], cwd=ROOT,
                               env={**os.environ, "REDIS_URL": redis_url}, capture_output=True, text=True,
                               timeout=120)
    assert submitted.returncode == 2, submitted.stderr
    assert field in submitted.stderr and message in submitted.stderr, submitted.stderr

    good = {"stages": [BARE_PIPELINE["stages"][0], {"name": "again", "spec": {"taskType": "echo"}}]}
    assert [stage.name for stage in Pipeline.from_dict(good).stages] == ["greet", "again"]
    reply = requests.post(f"{server.base_url}/api/v1/tasks", json=good, timeout=30)
    assert reply.status_code == 202 and reply.json()["kind"] == "pipeline", reply.text
    document.write_text(json.dumps(good))
    submitted = subprocess.run([sys.executable, "-m", "cli.main", "submit", str(document), "--json"], cwd=ROOT,
                               env={**os.environ, "REDIS_URL": redis_url}, capture_output=True, text=True,
                               timeout=120)
    assert submitted.returncode == 0, submitted.stderr


@pytest.mark.slow
def test_a_preference_file_row_without_rejected_fails_on_the_worker(worker_factory, tiny_model_dir: Path,
                                                                    tmp_path: Path) -> None:
    from tasks import dpo as dpo_task
    from tasks import echo

    worker = worker_factory()
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps(PAIR) + "\n" + json.dumps({"prompt": "p2", "chosen": "c2"}) + "\n")
    spec = dpo(model={"source": {"identifier": str(tiny_model_dir)}}, data={"jsonl": {"path": str(pairs)}})
    handle = dpo_task.apply_async(args=[spec])
    with pytest.raises(SpecError) as caught:
        handle.get(timeout=120)
    assert "spec.data.jsonl.rejected_field: row 1 has no 'rejected'" in str(caught.value)
    assert not (worker.results_dir / handle.id / "final_model").exists()
    assert echo.apply_async(args=[{"taskType": "echo", "data": {}}]).get(timeout=60)["worker_id"] == worker.worker_id


@pytest.mark.parametrize(("value", "shown"), [
    (["a", "b"], 'list ["a", "b"]'), (False, "bool false"), ([], "list []"), (3, "int 3"), ({"x": 1}, 'dict {"x": 1}'),
])
def test_a_preference_value_that_is_not_a_string_is_refused(tmp_path: Path, value: Any, shown: str) -> None:
    """Each of prompt, chosen and rejected must be a non-empty string: a list, boolean, number or
    mapping in a JSONL row is an error naming the field and the row, never its Python text."""
    from tasks.executors.preference_data import load_preferences

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps(PAIR) + "\n" + json.dumps({**PAIR, "chosen": value}) + "\n")
    data = parse_task_spec(dpo(data={"jsonl": {"path": str(pairs)}})).training_data()
    with pytest.raises(SpecError) as caught:
        load_preferences(data)
    assert str(caught.value) == f"spec.data.jsonl.chosen_field: row 1: 'chosen' must be a non-empty string, got {shown}"
