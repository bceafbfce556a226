"""The original templates' fields act as SEED-SPEC.md says (executors and helpers run directly).

Datasets (slicing, shuffle, saved datasets, the local hub cache), metadata columns,
``jsonl_export``, ``model.adapters``, archives by ``taskId`` alone, destinations
(method, headers, timeout), ``output.artifacts``, ``sloSeconds``, training knobs.
Routing has its own file (test_capability_routing.py); templates through real
workers are in test_original_templates.py.
"""

from __future__ import annotations

import http.server
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.core.errors import ArtifactError, SpecError
from app.core.settings import reset_settings
from app.core.task_spec import parse_task_spec
from tasks.executors.data import read_records, sample, slice_rows
from tasks.executors.inference import InferenceExecutor, adapter_checkpoint
from tasks.executors.jsonl_export import export_rows
from tasks.executors.models import ModelCache
from tasks.executors.progress import RecordingProgress
from tasks.executors.ranks import RankPlan, deepspeed_config, plan_ranks
from tasks.executors.training import multi_gpu_note, training_precision
from tasks.executors.training_data import IGNORE_INDEX, pack_rows
from tasks.outcome import annotate
from tests.conftest import http_server
from tests.hf_cache import QUESTION_ROWS, SUPPORT_QUESTIONS, build_example_caches

ROWS = [{"id": i, "q": f"question {i}"} for i in range(10)]


@pytest.fixture
def table(tmp_path: Path) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The example datasets in a local datasets cache this process reads (offline)."""
    import datasets

    cache = build_example_caches(tmp_path / "hf-datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return cache


# -- datasets -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("split", "ids"), [
    ("train", list(range(10))), ("train[:3]", [0, 1, 2]), ("validation[2:5]", [2, 3, 4]),
    ("train[:20%]", [0, 1]), ("train[-2:]", [8, 9]), ("test[50%:60%]", [5]),
])
def test_a_file_is_one_split_sliced_as_datasets_does(table: Path, split: str, ids: list[int]) -> None:
    assert [r["id"] for r in read_records(str(table), split=split)] == ids


@pytest.mark.parametrize(("split", "message"), [
    ("train[:x]", r"slices look like train\[:200\]"), ("train[:3]+test[:3]", "a single file is one split")])
def test_bad_splits_name_the_field(table: Path, split: str, message: str) -> None:
    with pytest.raises(SpecError, match=message) as caught:
        read_records(str(table), split=split)
    assert caught.value.field == "spec.data.split"


def test_shuffle_is_datasets_permutation_then_max_samples() -> None:
    import datasets

    expected = datasets.Dataset.from_list(ROWS).shuffle(seed=7).to_list()
    assert sample(ROWS, shuffle=True, seed=7) == expected
    assert sample(ROWS, shuffle=True, seed=7, max_samples=3) == expected[:3]
    assert sample(ROWS, max_samples=2) == ROWS[:2] and sample(ROWS) == ROWS
    assert slice_rows(ROWS, "train[:5]") == ROWS[:5]


def test_a_saved_dataset_directory_and_its_splits(tmp_path: Path) -> None:
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                          "validation": datasets.Dataset.from_list(ROWS[:4])}).save_to_disk(tmp_path / "saved")
    assert [r["id"] for r in read_records(str(tmp_path / "saved"), split="validation[:2]")] == [0, 1]
    assert len(read_records(str(tmp_path / "saved"), split="train[:50%]+validation")) == 9
    with pytest.raises(SpecError, match="splits here: train, validation") as caught:
        read_records(str(tmp_path / "saved"), split="test")
    assert caught.value.field == "spec.data.split"


def test_a_saved_dataset_reads_only_its_own_files(tmp_path: Path) -> None:
    """Its ``state.json`` names the arrow files ``load_from_disk`` opens: a name that leads out
    of the directory (here to a dataset outside the data roots) is refused, never read."""
    import datasets

    outside = Path(tempfile.mkdtemp(prefix="meshq-outside-"))
    try:
        datasets.Dataset.from_list([{"id": 99, "q": "outside-secret"}]).save_to_disk(outside / "other")
        datasets.Dataset.from_list(ROWS).save_to_disk(tmp_path / "saved")
        state = json.loads((tmp_path / "saved" / "state.json").read_text())
        escape = os.path.relpath(next((outside / "other").glob("*.arrow")), tmp_path / "saved")
        state["_data_files"] = [{"filename": escape}]
        (tmp_path / "saved" / "state.json").write_text(json.dumps(state))
        with pytest.raises(SpecError, match="not a saved dataset") as caught:
            read_records(str(tmp_path / "saved"), field="spec.data.url")
        assert caught.value.field == "spec.data.url" and "outside-secret" not in str(caught.value)
    finally:
        shutil.rmtree(outside, ignore_errors=True)


def test_a_hub_id_reads_the_local_cache_only(hub_cache: Path) -> None:
    rows = read_records(SUPPORT_QUESTIONS, name="plain", split="train[:4]", field="spec.data.url")
    assert rows == QUESTION_ROWS[:4]
    with pytest.raises(SpecError, match="'other': not in the local cache") as caught:
        read_records(SUPPORT_QUESTIONS, name="other", field="spec.data.url")
    assert caught.value.field == "spec.data.name"
    with pytest.raises(SpecError) as caught:
        read_records("nobody/nothing", field="spec.data.url")
    assert caught.value.field == "spec.data.url"
    assert "'nobody/nothing' is not in the local Hugging Face datasets cache" in str(caught.value)
    assert "workers do not download datasets" in str(caught.value)
    # A path outside the data roots (app.core.data_roots) is refused without saying whether it exists.
    with pytest.raises(SpecError, match="outside the directories this worker reads data from"):
        read_records("./no/such/dir", field="spec.data.url")


# -- inference: dataset, metadata, export -------------------------------------------------------
def inference_spec(model_dir: Path, data: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"taskType": "inference", "model": {"source": {"identifier": str(model_dir)}},
            "data": data, "inference": {"max_tokens": 3}, **extra}


def test_dataset_prompts_carry_metadata_and_export_them(tiny_model_dir: Path, hub_cache: Path,
                                                         tmp_path: Path) -> None:
    import datasets

    spec = parse_task_spec(inference_spec(tiny_model_dir, {
        "type": "dataset", "url": SUPPORT_QUESTIONS, "name": "plain", "split": "train[:8]", "column": "question",
        "shuffle": True, "seed": 3, "max_samples": 5, "metadata_columns": {"id": "qid", "answer": "reference"}},
        postprocess={"jsonl_export": {"path": "out/pairs.jsonl", "required_fields": ["prompt", "reference"],
                                      "fields": {"prompt": {"from": "prompt"}, "completion": {"from": "output"},
                                                 "reference": {"from": "metadata", "key": "reference"},
                                                 "origin": {"value": "meshq"}}}}))
    result = InferenceExecutor(ModelCache()).run(spec, tmp_path, RecordingProgress())
    expected = datasets.Dataset.from_list(QUESTION_ROWS[:8]).shuffle(seed=3).to_list()[:5]
    assert [i["prompt"] for i in result["items"]] == [r["question"] for r in expected]
    assert [i["metadata"] for i in result["items"]] == [{"qid": r["id"], "reference": r["answer"]} for r in expected]
    export = result["jsonl_export"]
    assert export["path"] == str(tmp_path / "out" / "pairs.jsonl") and export["rows"] == 5
    rows = [json.loads(line) for line in Path(export["path"]).read_text().splitlines()]
    assert rows == [{"prompt": i["prompt"], "completion": i["output"], "reference": i["metadata"]["reference"],
                     "origin": "meshq"} for i in result["items"]]
    with pytest.raises(SpecError, match="column 'nope' not found") as caught:
        InferenceExecutor(ModelCache()).run(parse_task_spec(inference_spec(tiny_model_dir, {
            "type": "dataset", "url": SUPPORT_QUESTIONS, "column": "question", "metadata_columns": ["nope"]})),
            tmp_path, RecordingProgress())
    assert caught.value.field == "spec.data.metadata_columns"


def test_required_fields_leave_out_incomplete_rows() -> None:
    export = parse_task_spec({"taskType": "inference", "model": {"source": {"identifier": "m"}},
                              "data": {"type": "list", "items": ["a"]},
                              "postprocess": {"jsonl_export": {
                                  "fields": {"p": {"from": "prompt"}, "o": {"from": "output"},
                                             "id": {"from": "metadata", "key": "qid"}},
                                  "required_fields": ["o", "id"]}}}).postprocess
    assert export is not None and export.jsonl_export is not None
    items = [{"prompt": "a", "output": "x", "metadata": {"qid": 1}},
             {"prompt": "b", "output": "", "metadata": {"qid": 2}},      # empty generation
             {"prompt": "c", "output": "y", "metadata": {"qid": None}},  # no id
             {"prompt": "d", "output": "z"}]                             # no metadata at all
    rows, skipped = export_rows(items, export.jsonl_export)
    assert rows == [{"p": "a", "o": "x", "id": 1}] and skipped == 3


def test_a_literal_field_writes_its_value_in_every_row() -> None:
    """``from: literal`` with any JSON value: a fixed column, e.g. a fixed rejected answer for dpo."""
    export = parse_task_spec({"taskType": "inference", "model": {"source": {"identifier": "m"}},
                              "data": {"type": "list", "items": ["a"]},
                              "postprocess": {"jsonl_export": {
                                  "fields": {"prompt": {"from": "prompt"}, "chosen": {"from": "output"},
                                             "rejected": {"from": "literal", "value": "I don't know."},
                                             "tags": {"from": "literal", "value": {"source": "gen", "n": [1]}},
                                             "note": {"from": "literal", "value": None}},
                                  "required_fields": ["chosen", "rejected"]}}}).postprocess
    assert export is not None and export.jsonl_export is not None
    rows, skipped = export_rows([{"prompt": "a", "output": "x"}, {"prompt": "b", "output": ""}],
                                export.jsonl_export)
    assert rows == [{"prompt": "a", "chosen": "x", "rejected": "I don't know.",
                     "tags": {"source": "gen", "n": [1]}, "note": None}]
    assert skipped == 1  # required_fields still apply to the generated columns


def test_a_literal_field_needs_a_value() -> None:
    with pytest.raises(SpecError, match=r"spec\.postprocess\.jsonl_export\.fields\.rejected.*value: required with "
                                        r"from: literal"):
        parse_task_spec({"taskType": "inference", "model": {"source": {"identifier": "m"}},
                         "data": {"type": "list", "items": ["a"]},
                         "postprocess": {"jsonl_export": {"fields": {"rejected": {"from": "literal"}}}}})


# -- adapters -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                        init_lora_weights=False)
    out = tmp_path_factory.mktemp("adapter") / "lora"
    get_peft_model(base, config).save_pretrained(out)
    return out


def test_model_adapters_are_checkpoint_load_merged_or_attached(tiny_model_dir: Path, adapter_dir: Path,
                                                               tmp_path: Path) -> None:
    prompts = ["Question: What colour is the sky? Answer:", "def add(a, b):"]
    executor = InferenceExecutor(ModelCache())

    def outputs(**model: Any) -> tuple[list[str], dict[str, Any]]:
        raw = inference_spec(tiny_model_dir, {"type": "list", "items": prompts}, inference={"max_tokens": 8})
        raw["model"].update(model)
        result = executor.run(parse_task_spec(raw), tmp_path, RecordingProgress())
        return [i["output"] for i in result["items"]], result["model"]

    attached, attached_model = outputs(adapters=[{"type": "lora", "path": str(adapter_dir), "apply": "attach"}])
    merged, merged_model = outputs(adapters=[{"type": "lora", "path": str(adapter_dir), "apply": "merge"}])
    base, _ = outputs()
    assert merged == attached and merged != base
    assert merged_model["adapter_merged"] is True and attached_model["adapter_merged"] is False
    assert merged_model["adapter"] == str(adapter_dir.resolve())
    with pytest.raises(SpecError, match="2 adapters given") as caught:
        adapter_checkpoint(parse_task_spec(inference_spec(tiny_model_dir, {"type": "list", "items": ["x"]}) | {
            "model": {"source": {"identifier": "m"}, "adapters": [{"path": "a"}, {"path": "b"}]}}).model.adapters)
    assert caught.value.field == "spec.model.adapters"
    load, merge = adapter_checkpoint(parse_task_spec({**inference_spec(tiny_model_dir, {"type": "list", "items": ["x"]}),
                                                      "model": {"source": {"identifier": "m"},
                                                                "adapters": [{"taskId": "t-1"}]}}).model.adapters)
    assert load is not None and (load.type, load.task_id, load.filename, merge) == ("http", "t-1", None, True)


class FilesHandler(http.server.BaseHTTPRequestHandler):
    """An orchestrator's ``GET /api/v1/results/{task}/files`` listing (per task id)."""

    listings: dict[str, list[str]] = {}

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        task_id = self.path.split("/")[4]
        body = json.dumps({"task_id": task_id, "files": [{"filename": n} for n in self.listings[task_id]]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def orchestrator_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    def use(base: str) -> None:
        monkeypatch.setenv("ORCHESTRATOR_BASE_URL", base)
        reset_settings()

    yield use
    reset_settings()


def test_task_id_without_filename_picks_that_tasks_archive(orchestrator_settings: Any) -> None:
    from app.artifacts.checkpoints import checkpoint_url
    from app.artifacts.retry import RetryPolicy
    from app.core.task_spec import CheckpointLoad

    FilesHandler.listings = {"one": ["final_lora.zip", "responses.json"], "two": ["final_lora.zip", "final_model.zip"],
                             "none": ["responses.json"]}
    with http_server(FilesHandler) as base:
        orchestrator_settings(base)
        policy = RetryPolicy(retries=0, backoff_s=0.01)
        url = checkpoint_url(CheckpointLoad(type="http", task_id="one"), policy)
        assert url == f"{base}/api/v1/results/one/files/final_lora.zip" and "None" not in url
        assert checkpoint_url(CheckpointLoad(type="http", task_id="two", filename="final_model.zip"), policy) == \
            f"{base}/api/v1/results/two/files/final_model.zip"
        for task_id, message in [("two", "more than one"), ("none", "has no final_lora/final_model")]:
            with pytest.raises(ArtifactError, match=message):
                checkpoint_url(CheckpointLoad(type="http", task_id=task_id), policy)


def test_an_input_named_several_ways_takes_the_first_that_works(server_factory, tiny_model_dir: Path,
                                                                adapter_dir: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """path (missing here) → url (404 on the orchestrator) → taskId (its archive): the taskId
    wins, the notes say why the others were passed over; one source alone keeps its error."""
    import shutil

    import requests

    from tasks.sources import pick_sources

    server = server_factory()
    archive = shutil.make_archive(str(tmp_path / "final_lora"), "zip", adapter_dir)
    with open(archive, "rb") as body:
        stored = requests.post(f"{server.base_url}/api/v1/results/trained-1/files",
                               files={"file": ("final_lora.zip", body)}, timeout=30)
    assert stored.status_code == 201, stored.text
    monkeypatch.setenv("ORCHESTRATOR_BASE_URL", server.base_url)
    monkeypatch.setenv("RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("MESHQ_UPLOAD_RETRIES", "0")
    reset_settings()
    try:
        missing = tmp_path / "elsewhere" / "final_lora"  # inside the data roots, but not on this worker
        raw = {"taskType": "inference", "model": {"source": {"identifier": str(tiny_model_dir)}, "adapters": [
            {"type": "lora", "path": str(missing), "url": f"{server.base_url}/api/v1/results/trained-1/files/gone.zip",
             "taskId": "trained-1", "apply": "merge"}]}, "data": {"type": "list", "items": ["a"]}}
        out_dir = tmp_path / "results" / "task-1"
        narrowed, used = pick_sources(parse_task_spec(raw), out_dir)
        assert used.used == {"spec.model.adapters[0]": "taskId"}
        [note] = used.notes
        assert note.startswith("spec.model.adapters[0]: used taskId (spec.model.adapters[0].path ")
        assert "does not exist on this worker" in note and "url could not be fetched" in note
        adapter = narrowed.model.adapters[0]
        assert (adapter.url, adapter.task_id) == (None, None)
        assert (Path(adapter.path) / "adapter_config.json").is_file()

        # A jsonl file named by path and url: the path where it can be read.
        data = tmp_path / "pairs.jsonl"
        data.write_text('{"prompt": "p", "response": "r"}\n')
        sft = {"taskType": "sft", "model": {"source": {"identifier": str(tiny_model_dir)}},
               "data": {"jsonl": {"path": str(data), "url": "http://127.0.0.1:9/never.jsonl"}}}
        narrowed, used = pick_sources(parse_task_spec(sft), out_dir)
        assert (narrowed.data.jsonl.path, narrowed.data.jsonl.url) == (str(data), None)
        assert used.used == {"spec.data.jsonl": "path"}

        # One source alone is not picked from: it keeps its own error where it is used.
        alone = {**raw, "model": {**raw["model"], "adapters": [{"type": "lora", "path": str(missing)}]}}
        spec = parse_task_spec(alone)
        assert pick_sources(spec, out_dir) == (spec, type(used)())
    finally:
        reset_settings()


# -- destination, artifacts, slo ----------------------------------------------------------------
class RecordingHandler(http.server.BaseHTTPRequestHandler):
    """Records method, path and headers; answers uploads as the orchestrator does."""

    seen: list[tuple[str, str, dict[str, str]]] = []

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        type(self).seen.append((self.command, self.path, dict(self.headers)))
        body = json.dumps({"url": f"http://files.example{self.path}/stored"} if self.path.endswith("/files")
                          else {}).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_PUT = _answer  # noqa: N815 (http.server naming)

    def log_message(self, *args: Any) -> None:
        pass


def test_destination_method_headers_and_export_upload(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from app.artifacts.delivery import deliver_result
    from app.artifacts.retry import RetryPolicy
    from app.core.task_spec import Destination

    export = tmp_path / "pairs.jsonl"
    export.write_text('{"a": 1}\n')
    RecordingHandler.seen = []
    caplog.set_level(logging.DEBUG)
    with http_server(RecordingHandler) as base:
        destination = Destination(type="http", url=f"{base}/hook", method="PUT", timeoutSec=7,
                                  headers={"Authorization": "Bearer s3cret-token", "X-Team": "qa"})
        result = deliver_result("t-9", destination, {"worker_id": "w", "jsonl_export": {"path": str(export),
                                                                                       "rows": 1}},
                                policy=RetryPolicy(retries=0, backoff_s=0.01))
    (upload_method, upload_path, upload_headers), (method, path, headers) = RecordingHandler.seen
    assert (upload_method, upload_path) == ("POST", "/hook/t-9/files")
    assert (method, path) == ("PUT", "/hook")
    for sent in (upload_headers, headers):
        assert sent["Authorization"] == "Bearer s3cret-token" and sent["X-Team"] == "qa"
    assert result["jsonl_export"]["url"] == "http://files.example/hook/t-9/files/stored"
    assert "s3cret-token" not in caplog.text


def test_artifacts_slo_and_notes(tmp_path: Path) -> None:
    (tmp_path / "final_lora").mkdir()
    spec = parse_task_spec({"taskType": "echo", "sloSeconds": 5, "model": None,
                            "output": {"destination": {"type": "local", "path": "/ignored/by/current-worker"},
                                       "artifacts": ["responses.json", "final_lora/", "final_model", "../etc"]}})
    result = annotate({"notes": ["from the executor"]}, spec, tmp_path, runtime_s=7.25)
    assert result["slo"] == {"seconds": 5, "runtime_sec": 7.25, "exceeded": True}
    assert result["warnings"] == ["output.artifacts: 'final_model' is missing from the task directory",
                                  "output.artifacts: '../etc' is not a path inside the task directory; not checked",
                                  "sloSeconds: the task ran 7.2 s, over its 5 s target"]
    assert result["notes"][0] == "from the executor" and "/ignored/by/current-worker" in result["notes"][1]
    quick = annotate({}, parse_task_spec({"taskType": "echo", "sloSeconds": 5}), tmp_path, runtime_s=0.5)
    assert quick == {"slo": {"seconds": 5, "runtime_sec": 0.5, "exceeded": False}}
    assert annotate({}, parse_task_spec({"taskType": "echo"}), tmp_path, 0.1) == {}


def test_enforce_cpu_with_a_cuda_device_map_is_refused() -> None:
    with pytest.raises(SpecError) as caught:
        parse_task_spec({"taskType": "inference", "enforce_cpu": True, "data": {"type": "list", "items": ["x"]},
                         "model": {"source": {"identifier": "m"}, "transformers": {"device_map": "cuda"}}})
    assert caught.value.field == "spec.enforce_cpu"


# -- training knobs -----------------------------------------------------------------------------
def training(model: dict[str, Any] | None = None, **options: Any) -> Any:
    return parse_task_spec({"taskType": "sft", "data": {"prompts": ["x"]}, "training": options,
                            "model": {"source": {"identifier": "m"}, **(model or {})}})


def test_float16_weights_are_never_trained_as_such() -> None:
    older = training({"config": {"fp16": True}})
    assert older.training is not None
    cpu = training_precision(older, older.training, "cpu")
    assert (cpu.master_dtype, cpu.fp16, cpu.bf16, cpu.name) == ("float32", False, False, "float32")
    assert "model.config.fp16: this CPU worker trained in float32" in cpu.notes[0]
    cuda = training_precision(older, older.training, "cuda")
    assert (cuda.master_dtype, cuda.fp16, cuda.name) == ("float32", True, "fp16")
    assert "fp16 mixed precision over float32 weights" in cuda.notes[0]
    plain = training()
    assert plain.training is not None
    assert training_precision(plain, plain.training, "cpu").notes == ()
    amp = training(fp16=True)
    assert amp.training is not None
    with pytest.raises(SpecError, match="needs a CUDA device"):
        training_precision(amp, amp.training, "cpu")


def test_multi_gpu_settings_plan_the_ranks_of_a_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """allow_multi_gpu: one rank per owned GPU or per visible_devices id (a foreign id is an error
    naming the field), MESHQ_CPU_RANKS on a CPU worker; without it one rank, as before."""
    spec = training(allow_multi_gpu=True, visible_devices="0,1")
    assert spec.training is not None
    assert plan_ranks(spec.training, "cuda", 4, 1) == RankPlan(2, "nccl", (0, 1))
    assert plan_ranks(training(allow_multi_gpu=True).training, "cuda", 3, 1) == RankPlan(3, "nccl", (0, 1, 2))
    with pytest.raises(SpecError, match=r"spec\.training\.visible_devices: GPU 3 is not one of this worker's 2 GPU"):
        plan_ranks(training(allow_multi_gpu=True, visible_devices=[0, 3]).training, "cuda", 2, 1)
    on_cpu = plan_ranks(spec.training, "cpu", 0, 2)
    assert (on_cpu.world_size, on_cpu.backend) == (2, "gloo")
    assert on_cpu.notes == ("training.visible_devices: no effect on a CPU worker (MESHQ_CPU_RANKS sets its ranks)",)
    plain = training(visible_devices="0")
    assert plain.training is not None and plan_ranks(plain.training, "cuda", 2, 4).world_size == 1
    zero = training(allow_multi_gpu=True, deepspeed={"zero_optimization": {"stage": 2}})
    assert zero.training is not None
    monkeypatch.setattr("tasks.executors.ranks.deepspeed_installed", lambda: False)
    without = plan_ranks(zero.training, "cpu", 0, 2)
    assert without.strategy == "ddp" and without.notes[0].startswith(
        "training.deepspeed, training.auto_deepspeed_stage: DeepSpeed is not installed on this worker")
    monkeypatch.setattr("tasks.executors.ranks.deepspeed_installed", lambda: True)
    with_it = plan_ranks(zero.training, "cpu", 0, 2)
    assert (with_it.strategy, with_it.notes) == ("deepspeed-zero2", ())
    one_rank = plan_ranks(zero.training, "cpu", 0, 1)
    assert (one_rank.world_size, one_rank.strategy) == (1, "ddp")
    assert one_rank.notes == ("training.deepspeed, training.auto_deepspeed_stage: no effect with one rank on this "
                              "worker (one process)",)
    assert deepspeed_config(zero.training) == {"zero_optimization": {"stage": 2}}
    auto = training(allow_multi_gpu=True, auto_deepspeed_stage=1, batch_size=3)
    assert deepspeed_config(auto.training)["zero_optimization"] == {"stage": 1}  # type: ignore[index]
    assert deepspeed_config(auto.training)["train_micro_batch_size_per_gpu"] == "auto"  # type: ignore[index]
    # ppo's own loop is one process: the settings say so there.
    note = multi_gpu_note(spec.training, 0)
    assert note is not None and note.startswith("training.allow_multi_gpu, training.visible_devices: no effect "
                                                "for ppo")
    assert multi_gpu_note(training().training, 1) is None  # type: ignore[arg-type]


def test_packing_fills_blocks_and_keeps_the_prompt_masks() -> None:
    m = IGNORE_INDEX
    rows = [{"input_ids": [1, 2, 3], "labels": [m, 2, 3]}, {"input_ids": [4, 5], "labels": [m, 5]},
            {"input_ids": [6, 7, 8, 9], "labels": [m, m, 8, 9]}]
    assert pack_rows(rows, 4) == [{"input_ids": [1, 2, 3, 4], "labels": [m, 2, 3, m]},
                                  {"input_ids": [5, 6, 7, 8], "labels": [5, m, m, 8]},
                                  {"input_ids": [9], "labels": [9]}]
