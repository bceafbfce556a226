"""inference → ``jsonl_export`` of preference pairs → dpo → inference, across two workers that
share nothing but the orchestrator: the export and the trained model travel over HTTP.

The pairs prefer a reference answer (a dataset column carried as metadata) to the model's own
greedy answer; after dpo the model ranks them the other way round.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import requests

from pipelines import Pipeline
from tests.test_dpo import answer_logprob

QUESTIONS = [{"question": "Q: What is the capital of France?\nA:", "answer": " Paris"},
             {"question": "Q: What colour is the sky?\nA:", "answer": " Blue"},
             {"question": "Q: How many legs does a spider have?\nA:", "answer": " Eight"}]


def document(questions: Path) -> dict[str, Any]:
    prompts = {"type": "dataset", "path": str(questions), "column": "question"}
    return {
        "apiVersion": "meshq/v1", "kind": "Pipeline", "metadata": {"name": "inference-export-dpo"},
        "spec": {
            "model": {"source": {"identifier": "${env:MESHQ_MODEL}"}, "transformers": {"device_map": "cpu"}},
            "output": {"destination": {"type": "http"}},
            "stages": [
                {"name": "gen", "tags": ["gen"], "spec": {
                    "taskType": "inference",
                    "data": {**prompts, "metadata_columns": {"answer": "reference"}},
                    "inference": {"max_new_tokens": 4, "do_sample": False},
                    "postprocess": {"jsonl_export": {
                        "path": "exports/preferences.jsonl",
                        "fields": {"prompt": {"from": "prompt"},
                                   "chosen": {"from": "metadata", "key": "reference"},
                                   "rejected": {"from": "output"}},
                        "required_fields": ["prompt", "chosen", "rejected"]}}}},
                {"name": "align", "tags": ["train"], "spec": {
                    "taskType": "dpo",
                    "data": {"jsonl": {"url": "${gen.result.jsonl_export.url}"}, "separator": ""},
                    "training": {"steps": 12, "batch_size": 3, "learning_rate": 5.0e-3, "beta": 0.1,
                                 "lr_scheduler_type": "constant", "save_freq": 1000}}},
                {"name": "check", "tags": ["gen"], "spec": {
                    "taskType": "inference",
                    "data": prompts,
                    "inference": {"max_new_tokens": 4, "do_sample": False},
                    "checkpoint": {"load": {"type": "http", "url": "${align.result.final_model_archive_url}",
                                            "sha256": "${align.result.final_model_archive_sha256}"}}}},
            ],
        },
    }


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_inference_export_dpo_inference_over_http(server_factory, worker_factory, redis_client,
                                                  tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    server = server_factory()
    to_server = {"ORCHESTRATOR_BASE_URL": server.base_url}
    generator = worker_factory("gen", worker_id="generator", env=to_server)
    trainer = worker_factory("train", worker_id="trainer", env=to_server)
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(row) + "\n" for row in QUESTIONS))

    run = Pipeline.from_dict(document(questions), env={"MESHQ_MODEL": str(tiny_model_dir)}).submit()
    results = run.wait(timeout=600)
    gen, align, check = results["gen"], results["align"], results["check"]
    assert [gen["worker_id"], align["worker_id"], check["worker_id"]] == ["generator", "trainer", "generator"]

    # The export went to the orchestrator and the trainer read it from there.
    export = gen["jsonl_export"]
    assert export["rows"] == 3 and export["skipped"] == 0
    assert export["url"].startswith(server.base_url)
    exported = [json.loads(line) for line in requests.get(export["url"], timeout=30).text.splitlines()]
    assert [row["chosen"] for row in exported] == [q["answer"] for q in QUESTIONS]
    assert [row["rejected"] for row in exported] == [item["output"] for item in gen["items"]]
    assert not (trainer.results_dir / gen["task_id"]).exists()
    assert align["samples"] == 3 and align["steps"] == 12 and align["reward_accuracy_last"] == 1.0

    # The last stage generated with the dpo model, fetched by URL onto the generator's disk.
    assert align["final_model_archive_url"].startswith(server.base_url)
    assert check["model"]["path"] != str(tiny_model_dir)
    assert str(generator.results_dir) in check["model"]["path"]
    # The model's own answers were the rejected ones: it no longer gives them.
    before = {item["prompt"]: item["output"] for item in gen["items"]}
    after = {item["prompt"]: item["output"] for item in check["items"]}
    assert all(after[prompt] != before[prompt] for prompt in before), (before, after)

    # And it now ranks every chosen answer above the rejected one by more than the base model did.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trained = AutoModelForCausalLM.from_pretrained(align["final_model_path"])
    for row in exported:
        def margin(model: Any, row: dict[str, str] = row) -> float:
            return (answer_logprob(model, tokenizer, row["prompt"], row["chosen"])
                    - answer_logprob(model, tokenizer, row["prompt"], row["rejected"]))
        assert margin(trained) > margin(base) + 1.0, row


EXAMPLE = Path(__file__).resolve().parent.parent / "pipelines" / "examples" / "answers_then_dpo.yaml"
EXAMPLE_DATA = EXAMPLE.parent / "data"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_shipped_answers_then_dpo_example_runs_with_its_data(server_factory, worker_factory,
                                                                 tiny_model_dir: Path) -> None:
    """The example as shipped, set up as its header says (its questions file in the repository, the
    generating worker's MESHQ_DATA_DIRS), with fewer dpo steps: every stage succeeds."""
    from pipelines.template import load_file

    server = server_factory()
    to_server = {"ORCHESTRATOR_BASE_URL": server.base_url}
    worker_factory("gen", worker_id="example-gen", env={**to_server, "MESHQ_DATA_DIRS": str(EXAMPLE_DATA)})
    worker_factory("train", worker_id="example-train", env=to_server)
    document = load_file(EXAMPLE)
    align = next(stage for stage in document["spec"]["stages"] if stage["name"] == "align")
    align["spec"]["training"]["max_steps"] = 4
    questions = EXAMPLE_DATA / "questions.jsonl"
    env = {"MESHQ_MODEL": str(tiny_model_dir), "MESHQ_QUESTIONS": str(questions)}
    results = Pipeline.from_dict(document, env=env).submit().wait(timeout=600)
    rows = [json.loads(line) for line in questions.read_text().splitlines()]
    assert results["generate"]["jsonl_export"]["rows"] == len(rows) == 8
    assert results["align"]["steps"] == 4 and results["align"]["worker_id"] == "example-train"
    assert [item["prompt"] for item in results["check"]["items"]] == [row["question"] for row in rows]
