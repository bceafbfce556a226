"""The original templates' vocabulary (SEED-SPEC.md) parses with its meaning, and stays strict."""

from __future__ import annotations

from typing import Any

import pytest

from app.core.errors import SpecError
from app.core.task_spec import BaseTaskSpec, parse_task_spec
from app.core.task_spec.schema import SECTION_TYPES, TASK_SPEC_MODELS
from app.core.task_spec.sizes import format_size, parse_cpu, parse_size
from app.core.task_spec.validation import FIELD_ORDER
from pipelines.template import parse_pipeline

MODEL = {"source": {"type": "huggingface", "identifier": "/models/tiny"}}
LIST_DATA = {"type": "list", "items": ["Q: a?"]}


def inference(**extra: Any) -> dict[str, Any]:
    return {"taskType": "inference", "model": MODEL, "data": LIST_DATA, **extra}


def refused(raw: Any) -> SpecError:
    with pytest.raises(SpecError) as caught:
        parse_task_spec(raw)
    return caught.value


@pytest.mark.parametrize(("section", "original", "meshq", "value"), [
    ("inference", "max_tokens", "max_new_tokens", 7),
    ("training", "steps", "max_steps", 30),
    ("training", "per_device_train_batch_size", "batch_size", 3),
    ("training", "save_freq", "save_steps", 11),
])
def test_original_spellings_are_aliases(section: str, original: str, meshq: str, value: int) -> None:
    base = inference() if section == "inference" else {"taskType": "sft", "model": MODEL, "data": {"prompts": ["x"]}}
    spec = parse_task_spec({**base, section: {original: value}})
    assert getattr(getattr(spec, section), meshq) == value
    # both spellings: the same value is fine, different values are an error naming the field
    assert getattr(getattr(parse_task_spec({**base, section: {original: value, meshq: value}}), section),
                   meshq) == value
    error = refused({**base, section: {original: value, meshq: value + 1}})
    assert error.field == f"spec.{section}.{meshq}" and original in str(error)


def test_model_config_is_the_older_spelling_of_dtype_and_device_map() -> None:
    spec = parse_task_spec({"taskType": "sft", "data": {"prompts": ["x"]},
                            "model": {**MODEL, "config": {"fp16": True, "device_map_auto": True}}})
    assert spec.model is not None
    assert spec.model.transformers.dtype == "float16" and spec.model.transformers.device_map == "auto"
    error = refused({"taskType": "sft", "data": {"prompts": ["x"]},
                     "model": {**MODEL, "config": {"fp16": True}, "transformers": {"dtype": "bfloat16"}}})
    assert error.field == "spec.model.config" and "fp16 true, but transformers.dtype is 'bfloat16'" in str(error)


def test_source_trust_remote_code_is_the_transformers_option() -> None:
    spec = parse_task_spec(inference(model={"source": {**MODEL["source"], "trust_remote_code": True}}))
    assert spec.model is not None and spec.model.transformers.trust_remote_code is True


def test_taskid_is_task_id() -> None:
    spec = parse_task_spec(inference(checkpoint={"load": {"type": "http", "taskId": "abc-1"}}))
    assert spec.checkpoint is not None and spec.checkpoint.load is not None
    assert spec.checkpoint.load.task_id == "abc-1"
    assert refused(inference(checkpoint={"load": {"type": "http", "taskId": "../x"}})).field == \
        "spec.checkpoint.load.task_id"


@pytest.mark.parametrize(("text", "expected"), [
    ("16Gi", 16 * 1024**3), ("32GiB", 32 * 1024**3), ("512Mi", 512 * 1024**2), ("1.5G", 1_500_000_000),
    ("64gi", 64 * 1024**3), (1024, 1024), ("100", 100),
])
def test_sizes(text: Any, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["16 gigs", "-1Gi", "Gi", "", "16Qi", True, "16 Gi B"])
def test_bad_sizes(text: Any) -> None:
    with pytest.raises(ValueError, match="is not a size like 16Gi"):
        parse_size(text)


def test_cpu_and_size_formatting() -> None:
    assert parse_cpu(16) == 16 and parse_cpu("16") == 16 and parse_cpu("500m") == 0.5
    with pytest.raises(ValueError):
        parse_cpu("lots")
    assert format_size(16 * 1024**3) == "16Gi" and format_size(1536) == "1536B"


def test_hardware_requirements() -> None:
    spec = parse_task_spec(inference(resources={"replicas": 2, "hardware": {
        "cpu": "4", "memory": "16Gi", "gpu": {"count": 1, "type": "nvidia-a100-80gb", "memory": "46Gi"}}}))
    assert spec.resources is not None and spec.resources.hardware is not None
    hardware = spec.resources.hardware
    assert hardware.cpu_cores == 4 and hardware.memory_bytes == 16 * 1024**3
    assert hardware.gpu is not None and hardware.gpu.memory_bytes == 46 * 1024**3
    assert spec.shards == 2
    error = refused(inference(resources={"hardware": {"memory": "16 gigs"}}))
    assert error.field == "spec.resources.hardware.memory"
    assert str(error) == "spec.resources.hardware.memory: '16 gigs' is not a size like 16Gi"
    assert refused(inference(resources={"hardware": {"gpu": {"count": -1}}})).field == \
        "spec.resources.hardware.gpu.count"


def test_everything_else_in_the_table_parses() -> None:
    spec = parse_task_spec(inference(
        enforce_cpu=True, sloSeconds=30, parallel={"enabled": True, "max_shards": 4},
        data={"type": "dataset", "url": "squad", "name": "plain_text", "split": "train[:2%]", "column": "q",
              "shuffle": True, "seed": 3, "metadata_columns": {"id": "qid"}, "max_samples": 5, "notes": "n"},
        inference={"max_tokens": 8, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "do_sample": True,
                   "repetition_penalty": 1.1, "system_prompt": "s"},
        postprocess={"jsonl_export": {"path": "pairs.jsonl", "required_fields": ["prompt"], "fields": {
            "prompt": {"from": "prompt"}, "chosen": {"from": "output"}, "id": {"from": "metadata", "key": "qid"},
            "source": {"value": "meshq"}}}},
        output={"destination": {"type": "http", "url": "http://o/api/v1/results", "method": "POST",
                                "timeoutSec": 30, "headers": {"Authorization": "Bearer t"},
                                "path": "/ignored/by/current-worker"}, "artifacts": ["responses.json"]},
        model={**MODEL, "transformers": {"device_map": "auto", "low_cpu_mem_usage": True},
               "vllm": {"tensor_parallel_size": 1, "gpu_memory_utilization": 0.8, "max_model_len": 2048,
                        "trust_remote_code": False},
               "adapters": [{"type": "lora", "url": "http://o/a.zip", "apply": "merge"}]}))
    assert spec.shards == 4 and spec.enforce_cpu and spec.sloSeconds == 30
    assert spec.inference_data().metadata_columns == {"id": "qid"}
    training = parse_task_spec({
        "taskType": "lora_sft", "model": {**MODEL, "config": {"fp16": False}},
        "data": {"dataset_name": "org/set", "config_name": "c", "split": "train[:200]", "prompt_column": "q",
                 "response_column": "a", "separator": "\n", "max_samples": 10},
        "training": {"num_train_epochs": 1, "steps": 5, "per_device_train_batch_size": 2,
                     "gradient_accumulation_steps": 1, "learning_rate": 1e-4, "max_seq_length": 64, "seed": 1,
                     "logging_steps": 1, "save_freq": 5, "save_strategy": "steps", "save_model": True,
                     "bf16": False, "fp16": False, "gradient_checkpointing": True, "packing": False,
                     "allow_multi_gpu": True, "visible_devices": "0,1", "auto_deepspeed_stage": 2,
                     "deepspeed": {"zero_optimization": {"stage": 2}}, "log_with": "none",
                     "tracker_project_name": "p"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "bias": "none", "target_modules": ["q_proj"],
                 "task_type": "CAUSAL_LM", "use_rslora": True}})
    assert training.training_data().name == "c" and training.training is not None
    assert training.training.max_steps == 5 and training.lora is not None and training.lora.use_rslora


def test_dpo_and_ppo_fields() -> None:
    dpo = parse_task_spec({"taskType": "dpo", "model": MODEL, "training": {"beta": 0.1},
                           "data": {"preferences": [{"prompt": "p", "chosen": "c", "rejected": "r"}]}})
    assert dpo.training is not None and dpo.training.beta == 0.1
    ppo = parse_task_spec({"taskType": "ppo", "model": MODEL, "reward_model": {"identifier": "/rm", "type": "sentiment"},
                           "data": {"jsonl": {"path": "q.jsonl", "query_field": "query"}},
                           "generation": {"max_new_tokens": 8, "temperature": 0.7, "do_sample": True},
                           "training": {"mini_batch_size": 2, "ppo_epochs": 1, "target_kl": 0.1, "steps": 3}})
    assert ppo.generation is not None and ppo.generation.max_new_tokens == 8
    assert refused({"taskType": "dpo", "model": MODEL,
                    "data": {"preferences": [{"prompt": "p", "chosen": "c"}]}}).field == "spec.data.preferences.0.rejected"
    assert refused({"taskType": "dpo", "model": MODEL, "training": {"beta": -1},
                    "data": {"preferences": [{"prompt": "p", "chosen": "c", "rejected": "r"}]}}).field == \
        "spec.training.beta"
    assert refused({"taskType": "ppo", "model": MODEL, "data": {"prompts": ["q"]}}).field == "spec.reward_model"
    assert refused({"taskType": "sft", "model": MODEL, "data": {"prompts": ["q"]},
                    "training": {"beta": 0.1}}).field == "spec.training"


def test_each_task_type_has_exactly_its_sections() -> None:
    """Each member of TaskSpec declares the shared fields and the sections of its task type(s),
    nothing more: a section added to the base for one type shows up here."""
    shared = {"taskType", "tags", "resources", "enforce_cpu", "sloSeconds", "data", "output"}
    assert set(BaseTaskSpec.model_fields) == shared
    for task_type, member in TASK_SPEC_MODELS.items():
        # sft shares its member with lora_sft (the lora section is refused for sft)
        types = ("sft", "lora_sft") if task_type in ("sft", "lora_sft") else (task_type,)
        sections = {name for name, users in SECTION_TYPES.items() if set(types) & set(users)}
        assert set(member.model_fields) == shared | sections, task_type
    assert set(TASK_SPEC_MODELS["ppo"].model_fields) - shared == {
        "model", "checkpoint", "training", "lora", "reward_model", "generation"}
    assert set(TASK_SPEC_MODELS["echo"].model_fields) - shared == {"echo"}


def test_every_section_has_a_place_in_the_order_errors_are_listed_in() -> None:
    """A spec's first problem names the error's field (FIELD_ORDER): a section added to a member
    without a place there would be reported after every other, whatever the user got wrong."""
    fields = set().union(*(member.model_fields for member in TASK_SPEC_MODELS.values()))
    assert fields == set(FIELD_ORDER)
    assert len(FIELD_ORDER) == len(set(FIELD_ORDER))


@pytest.mark.parametrize(("task_type", "section", "message"), [
    ("inference", "training", "not allowed for taskType 'inference'"),
    ("inference", "lora", "only allowed for taskType lora_sft, dpo, ppo, not 'inference'"),
    ("sft", "lora", "only allowed for taskType lora_sft, dpo, ppo, not 'sft'"),
    ("sft", "generation", "only allowed for taskType 'ppo', not 'sft'"),
    ("lora_sft", "parallel", "only allowed for taskType 'inference', not 'lora_sft'"),
    ("ppo", "postprocess", "only allowed for taskType 'inference', not 'ppo'"),
    ("inference", "echo", "only allowed for taskType 'echo', not 'inference'"),
    ("echo", "model", "not allowed for taskType 'echo'"),
    ("echo", "checkpoint", "not allowed for taskType 'echo'"),
    ("echo", "training", "not allowed for taskType 'echo'"),
])
def test_a_section_of_another_task_type_is_refused_naming_it(task_type: str, section: str, message: str) -> None:
    raw = {"echo": {"taskType": "echo"}, "inference": inference(),
           "ppo": {"taskType": "ppo", "model": MODEL, "reward_model": {"identifier": "/rm"},
                   "data": {"prompts": ["q"]}}}.get(task_type) or {"taskType": task_type, "model": MODEL,
                                                                    "data": {"prompts": ["q"]}}
    error = refused({**raw, section: {}})
    assert (error.field, str(error)) == (f"spec.{section}", f"spec.{section}: {message}")
    assert parse_task_spec({**raw, section: None}).taskType == task_type  # an empty section is no section


@pytest.mark.parametrize(("raw", "field"), [
    (inference(inference={"max_tokenz": 3}), "spec.inference.max_tokenz"),
    (inference(resources={"hardwear": {}}), "spec.resources.hardwear"),
    (inference(model={**MODEL, "vllm": {"tensor_paralel_size": 2}}), "spec.model.vllm.tensor_paralel_size"),
    (inference(model={"source": {"type": "s3", "identifier": "x"}}), "spec.model.source.type"),
    (inference(output={"destination": {"method": "GET"}}), "spec.output.destination.method"),
    (inference(parallel={"enabled": True, "max_shards": 0}), "spec.parallel.max_shards"),
    (inference(postprocess={"jsonl_export": {"fields": {"a": {"from": "outputs"}}}}),
     "spec.postprocess.jsonl_export.fields.a.from"),
    (inference(postprocess={"jsonl_export": {"path": "../x.jsonl", "fields": {"a": {"from": "output"}}}}),
     "spec.postprocess.jsonl_export.path"),
    (inference(model={**MODEL, "adapters": [{"type": "lora"}]}), "spec.model.adapters.0.path"),
])
def test_misspelt_or_wrong_fields_still_name_their_path(raw: dict[str, Any], field: str) -> None:
    assert refused(raw).field == field


@pytest.mark.parametrize("task_type", ["agent", "rag"])
def test_agent_and_rag_are_refused_before_their_placeholders(task_type: str) -> None:
    document = {"apiVersion": "mloc/v1", "kind": "AgentTask", "metadata": {"name": "a", "owner": "o"},
                "spec": {"taskType": task_type, "tools": {"qdrant": {"api_key": "${QDRANT_API_KEY}"}}}}
    with pytest.raises(SpecError) as caught:
        parse_pipeline(document, env={})
    assert caught.value.field == "spec.taskType"
    assert f"'{task_type}' needs outside services" in str(caught.value)


def test_bare_environment_placeholders_expand_like_env() -> None:
    document = {"apiVersion": "mloc/v1", "kind": "InferenceTask", "metadata": {"name": "x", "project": "p"},
                "spec": {**inference(), "model": {"source": {"identifier": "${MODEL_DIR}"}}}}
    template = parse_pipeline(document, env={"MODEL_DIR": "/models/tiny"})
    assert template.stages[0].spec["model"]["source"]["identifier"] == "/models/tiny"
    with pytest.raises(SpecError, match=r"\$\{MODEL_DIR\}: environment variable MODEL_DIR is not set"):
        parse_pipeline(document, env={})
