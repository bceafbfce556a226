"""The original-form templates (``pipelines/examples/original/``) run unchanged on real workers.

Each file is submitted as a user would — Python API, ``meshq submit``, ``POST /api/v1/tasks``
or a plain Celery ``apply_async`` — with only ``${MODEL_ID}`` pointed at the tiny model;
datasets named by hub id come from a local Hugging Face datasets cache built by the test,
and the workers' ``HF_ENDPOINT`` is a recording server that must see no request at all.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from app.core.errors import PipelineError
from pipelines import EXAMPLES_DIR, Pipeline
from tests.conftest import ROOT, http_server
from tests.hf_cache import INSTRUCTION_ROWS, QUESTION_ROWS, build_example_caches

ORIGINAL = EXAMPLES_DIR / "original"
TEMPLATES = sorted(p.name for p in ORIGINAL.glob("*.yaml"))


class HubHandler(http.server.BaseHTTPRequestHandler):
    """Stands in for the Hugging Face hub: records every request (there must be none)."""

    requests_seen: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        type(self).requests_seen.append(self.path)
        self.send_response(404)
        self.end_headers()

    do_HEAD = do_POST = do_GET  # noqa: N815

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def offline_hub(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Worker environment: the example datasets in a local cache, the hub a recording server."""
    cache = build_example_caches(tmp_path / "hf-datasets")
    HubHandler.requests_seen = []
    with http_server(HubHandler) as hub:
        yield {"HF_DATASETS_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf-home"), "HF_ENDPOINT": hub}
    assert HubHandler.requests_seen == [], "a worker tried to reach the hub"


def template(name: str, model_dir: Path) -> Pipeline:
    return Pipeline.from_yaml(ORIGINAL / name, env={"MODEL_ID": str(model_dir)})


def test_every_original_template_parses(tiny_model_dir: Path) -> None:
    assert TEMPLATES == ["echo.yaml", "gpu_inference.yaml", "inference_dataset.yaml", "inference_export_dpo.yaml",
                         "inference_export_sft.yaml", "inference_list.yaml", "inference_vllm.yaml",
                         "lora_sft_adapter_sources.yaml", "lora_sft_two_stage.yaml", "sft_two_stage.yaml"]
    for name in TEMPLATES:
        pipeline = template(name, tiny_model_dir)
        assert pipeline.document["apiVersion"] == "mloc/v1", name
    assert [s.task_type for s in template("lora_sft_two_stage.yaml", tiny_model_dir).stages] == \
        ["lora_sft", "inference"]


def test_inference_and_echo_templates_run_on_a_worker(worker_factory, redis_client, tiny_model_dir: Path,
                                                      offline_hub: dict[str, str]) -> None:
    import datasets

    worker = worker_factory(worker_id="orig1", env=offline_hub)

    echo_run = template("echo.yaml", tiny_model_dir).submit()
    assert echo_run.warnings == []  # cpu 1, memory 512Mi: this worker has that
    echo = echo_run.wait(timeout=60)["echo"]
    # output_dir: the task's own directory on its worker, as the original results name it
    assert echo["output_dir"] == str(worker.results_dir.resolve() / echo["task_id"])
    assert (Path(echo["output_dir"]) / "responses.json").is_file()
    assert echo["echo"]["data"]["payload"] == {"hello": "world"}
    assert echo["slo"]["seconds"] == 60 and echo["slo"]["exceeded"] is False
    assert any("/ignored/by/current-worker" in note for note in echo["notes"])
    status = echo_run.status()
    assert status["metadata"]["owner"] == "platform-team"
    assert status["metadata"]["annotations"]["description"].startswith("Checks that a worker")

    listed = template("inference_list.yaml", tiny_model_dir).submit().wait(timeout=120)["inference"]
    assert len(listed["items"]) == 3 and listed["usage"]["completion_tokens"] <= 3 * 8
    assert Path(listed["output_dir"]).name == listed["task_id"]
    assert "warnings" not in listed  # responses.json and manifest.json were there

    by_dataset = template("inference_dataset.yaml", tiny_model_dir).submit().wait(timeout=120)["inference"]
    expected = datasets.Dataset.from_list(QUESTION_ROWS[:8]).shuffle(seed=7).to_list()[:5]
    assert [item["prompt"] for item in by_dataset["items"]] == [row["question"] for row in expected]
    assert [item["metadata"] for item in by_dataset["items"]] == [
        {"question_id": row["id"], "reference": row["answer"]} for row in expected]

    vllm = template("inference_vllm.yaml", tiny_model_dir).submit().wait(timeout=120)["inference"]
    assert vllm["backend"] == "transformers" and len(vllm["items"]) == 2
    assert any(note.startswith("model.vllm: this worker has no vLLM engine") for note in vllm["notes"])

    # A hub id the cache lacks fails at once, saying so (the recording hub sees nothing).
    document = template("inference_dataset.yaml", tiny_model_dir).document
    document["spec"]["data"]["url"] = "nobody/not-cached"
    with pytest.raises(PipelineError) as caught:
        Pipeline.from_dict(document).submit().wait(timeout=120)
    assert "'nobody/not-cached' is not in the local Hugging Face datasets cache" in str(caught.value)
    assert "spec.data.url" in str(caught.value)


def test_every_way_in_accepts_an_original_template(worker_factory, server_factory, redis_client, redis_url,
                                                   tiny_model_dir: Path) -> None:
    """meshq submit, POST /api/v1/tasks and a plain apply_async, on the echo template."""
    from tasks import echo as echo_task

    worker_factory(worker_id="ways")
    server = server_factory()
    path = ORIGINAL / "echo.yaml"
    submitted = subprocess.run([sys.executable, "-m", "cli.main", "submit", str(path), "--wait", "--json"],
                               cwd=ROOT, env={**os.environ, "REDIS_URL": redis_url}, capture_output=True,
                               text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stderr
    report = json.loads(submitted.stdout)
    assert report["state"] == "SUCCESS" and report["metadata"]["project"] == "fleet-checks"
    assert report["stages"]["echo"]["worker_id"] == "ways"

    reply = requests.post(f"{server.base_url}/api/v1/tasks", data=path.read_bytes(),
                          headers={"Content-Type": "application/yaml"}, timeout=30)
    assert reply.status_code == 202, reply.text
    assert reply.json()["queue"] == "tasks.need.cpu=1.mem=512Mi" and reply.json()["warnings"] == []
    from app.celery import app

    assert app.AsyncResult(reply.json()["id"]).get(timeout=60)["worker_id"] == "ways"
    view = requests.get(f"{server.base_url}/api/v1/tasks/{reply.json()['id']}", timeout=30).json()
    assert view["state"] == "SUCCESS" and view["metadata"]["name"] == "echo-smoke"

    spec = template("echo.yaml", tiny_model_dir).stages[0].spec
    assert echo_task.apply_async(args=[spec]).get(timeout=60)["echo"]["data"]["payload"] == {"hello": "world"}


def test_the_gpu_template_waits_for_an_a100(worker_factory, redis_client, tiny_model_dir: Path) -> None:
    worker_factory(worker_id="cpu-only")
    run = template("gpu_inference.yaml", tiny_model_dir).submit()
    assert len(run.warnings) == 1 and "cpu-only: gpus 0 < 1 nvidia-a100-80gb >= 40Gi" in run.warnings[0]
    assert run.status()["state"] == "PENDING"
    a100 = {"gpus": [{"name": "NVIDIA A100-SXM4-80GB", "memory_total_bytes": 80 * 1024**3}]}
    worker_factory(worker_id="a100-fake", env={"MESHQ_FAKE_HARDWARE": json.dumps(a100)})
    result = run.wait(timeout=120)["inference"]
    assert result["worker_id"] == "a100-fake" and len(result["items"]) == 1
    assert result["model"]["device"] == "cpu"  # a fake GPU: the work still runs on what is there


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_training_templates_run(worker_factory, server_factory, redis_client, tiny_model_dir: Path,
                                offline_hub: dict[str, str]) -> None:
    server = server_factory()
    worker = worker_factory(worker_id="trainer", env={**offline_hub, "ORCHESTRATOR_BASE_URL": server.base_url})

    sft = template("sft_two_stage.yaml", tiny_model_dir).submit().wait(timeout=600)
    assert sft["sft"]["samples"] == 4 and sft["sft"]["steps"] == 40
    url = sft["sft"]["final_model_archive_url"]
    assert url.startswith(server.base_url) and url.endswith("/final_model.zip")
    assert sft["infer"]["model"]["path"] != str(tiny_model_dir)  # the fine-tuned model, fetched by URL
    assert [item["prompt"] for item in sft["infer"]["items"]] == ["Say hello:", "Count to three:"]

    lora = template("lora_sft_two_stage.yaml", tiny_model_dir).submit().wait(timeout=600)
    trained = lora["lora"]
    assert trained["samples"] == len(INSTRUCTION_ROWS) and trained["gradient_checkpointing"] is True
    config = json.loads((Path(trained["final_lora_path"]) / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and config["bias"] == "none"
    # allow_multi_gpu on a worker with one CPU rank (MESHQ_CPU_RANKS unset): one process, as asked.
    assert trained["world_size"] == 1 and trained["strategy"] == "single-process"
    # auto_deepspeed_stage on one rank: a note (DeepSpeed not installed here, or nothing to shard over).
    assert any(n.startswith("training.deepspeed, training.auto_deepspeed_stage: ") for n in trained["notes"])
    assert lora["infer"]["model"]["adapter_merged"] is True
    log = (worker.results_dir / trained["task_id"] / "logs" / "training_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log if "loss" in json.loads(line)][:3] == [1, 5, 10]

    chained = template("inference_export_sft.yaml", tiny_model_dir).submit().wait(timeout=600)
    export = chained["gen"]["jsonl_export"]
    assert export["rows"] + export["skipped"] == 3 and export["path"].endswith("exports/pairs.jsonl")
    rows = [json.loads(line) for line in Path(export["path"]).read_text().splitlines()]
    assert all(row["source"] == "self-distillation" and row["response"] for row in rows)
    assert chained["distil"]["samples"] == export["rows"] and "final_model_path" in chained["distil"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_several_sources_on_two_workers_that_share_nothing(worker_factory, server_factory, redis_client,
                                                           tiny_model_dir: Path) -> None:
    """Each stage's input is named several ways; the next stage runs on a worker with its own
    RESULTS_DIR and data roots, so the earlier worker's path is not readable there and the
    uploaded copy is used — the result says so."""
    server = server_factory()
    # Each worker reads only the model and its own RESULTS_DIR: the other's files are out of reach.
    isolated = {"ORCHESTRATOR_BASE_URL": server.base_url, "MESHQ_DATA_DIRS": str(tiny_model_dir)}
    generator = worker_factory("generate", worker_id="gen-box", env=isolated)
    trainer = worker_factory("train", worker_id="train-box", env=isolated)
    assert generator.results_dir != trainer.results_dir

    pairs = template("inference_export_dpo.yaml", tiny_model_dir).submit().wait(timeout=600)
    gen, prefer = pairs["gen"], pairs["prefer"]
    assert (gen["worker_id"], prefer["worker_id"]) == ("gen-box", "train-box")
    export = gen["jsonl_export"]
    assert Path(export["path"]).is_relative_to(generator.results_dir.resolve())
    assert export["url"].startswith(server.base_url)
    rows = [json.loads(line) for line in Path(export["path"]).read_text().splitlines()]
    assert rows and all(row["rejected"] == " I do not know." and row["chosen"] for row in rows)
    assert prefer["sources"] == {"spec.data.jsonl": "url"}
    assert any(note.startswith("spec.data.jsonl: used url (spec.data.jsonl.path") and "data roots" in note
               for note in prefer["notes"])
    assert prefer["samples"] == export["rows"] and "final_lora_path" in prefer

    adapted = template("lora_sft_adapter_sources.yaml", tiny_model_dir).submit().wait(timeout=600)
    lora, infer = adapted["lora"], adapted["infer"]
    assert (lora["worker_id"], infer["worker_id"]) == ("train-box", "gen-box")
    assert infer["sources"] == {"spec.model.adapters[0]": "url"}
    assert infer["model"]["adapter_merged"] is True and len(infer["items"]) == 2
    # The adapter came from the uploaded archive, unpacked in the inference worker's own cache.
    assert Path(infer["model"]["adapter"]).is_relative_to(generator.results_dir.resolve() / ".cache")

    # On the worker that trained it, the same adapter is read from its path.
    same_box = template("lora_sft_adapter_sources.yaml", tiny_model_dir).document
    same_box["spec"]["stages"][1]["tags"] = ["train"]
    again = Pipeline.from_dict(same_box).submit().wait(timeout=600)
    assert again["infer"]["worker_id"] == "train-box"
    assert again["infer"]["sources"] == {"spec.model.adapters[0]": "path"}
    assert again["infer"]["model"]["adapter"] == again["lora"]["final_lora_path"]


@pytest.mark.timeout(600)
def test_the_export_then_sft_template_runs_on_two_workers_with_their_own_results(
        worker_factory, server_factory, redis_client, tiny_model_dir: Path) -> None:
    """The sft stage names the export by its path on the worker that ran "gen" and by its
    uploaded URL: a worker with another RESULTS_DIR (which cannot read the path) trains from
    the URL."""
    server = server_factory()
    own_files_only = {"ORCHESTRATOR_BASE_URL": server.base_url, "MESHQ_DATA_DIRS": ""}
    exporter = worker_factory("gen", worker_id="exporter", env=own_files_only)
    worker_factory("train", worker_id="trainer", env=own_files_only)
    document = template("inference_export_sft.yaml", tiny_model_dir).document
    document["spec"]["stages"][0]["tags"] = ["gen"]      # gen on the exporter,
    document["spec"]["stages"][1]["tags"] = ["train"]    # distil on the other machine
    results = Pipeline.from_dict(document, env={"MODEL_ID": str(tiny_model_dir)}).submit().wait(timeout=400)
    assert (results["gen"]["worker_id"], results["distil"]["worker_id"]) == ("exporter", "trainer")
    assert Path(results["gen"]["jsonl_export"]["path"]).is_relative_to(exporter.results_dir.resolve())
    assert results["distil"]["sources"] == {"spec.data.jsonl": "url"}
    assert results["distil"]["samples"] == results["gen"]["jsonl_export"]["rows"] > 0
