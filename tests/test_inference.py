"""The inference executor, run directly (no Celery): correctness, cache, adapters, specs.

Every expected output is computed independently with plain transformers / peft
calls (one ``model.generate`` per prompt), never with meshq code.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.core.errors import SpecError, TaskCancelled
from app.core.task_spec import parse_task_spec
from cli.tiny_model import build_tiny_model
from tasks.executors.inference import InferenceExecutor, cut_at_stop, plan_batches
from tasks.executors.models import ModelCache
from tasks.executors.progress import RecordingProgress

MAX_NEW = 10
PROMPTS = [
    "Hi",
    "The quick brown fox jumps over the lazy dog. " * 12,  # ~120 tokens
    "Question: What is the capital of France? Answer:",
    "a",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 100 1000.",
    "def add(a, b):",
    "Once upon a time there was a small model " * 5,
    "Workers send heartbeats",
    "Translate to French: hello →",
    "x y",
]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """The CPUs are shared: one thread keeps the tests from fighting over them."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny model, same architecture and tokenizer, other random weights."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model-seed1") / "model", size="test", seed=1)


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter on the tiny model with non-zero weights (so it changes the outputs)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                        init_lora_weights=False)  # random A and B: the default B = 0 would be a no-op
    out = tmp_path_factory.mktemp("adapter") / "lora"
    get_peft_model(base, config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def executor() -> InferenceExecutor:
    return InferenceExecutor(ModelCache())


def reference(model_dir: Path, prompts: list[str], max_new_tokens: int = MAX_NEW,
              adapter: Path | None = None, add_special_tokens: bool = True) -> list[dict[str, Any]]:
    """Per-prompt ``model.generate`` (greedy), one prompt at a time, no padding."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    eos = model.generation_config.eos_token_id
    results = []
    with torch.inference_mode():
        for prompt in prompts:
            enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=add_special_tokens)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
            new = out[0, enc.input_ids.shape[1]:].tolist()
            results.append({"output": tokenizer.decode(new, skip_special_tokens=True),
                            "prompt_tokens": enc.input_ids.shape[1], "completion_tokens": len(new),
                            "finish_reason": "stop" if new and new[-1] == eos else "length"})
    return results


def make_spec(model_dir: Path | str, prompts: list[str] | None = None, **inference: Any) -> dict[str, Any]:
    return {"taskType": "inference",
            "model": {"source": {"identifier": str(model_dir)}, "transformers": {"device_map": "cpu"}},
            "data": {"type": "list", "items": PROMPTS if prompts is None else prompts},
            "inference": {"max_new_tokens": MAX_NEW, **inference}}


def run(executor: InferenceExecutor, raw: dict[str, Any], tmp_path: Path,
        progress: RecordingProgress | None = None) -> dict[str, Any]:
    return executor.run(parse_task_spec(raw), tmp_path, progress or RecordingProgress())


@pytest.fixture(scope="module")
def base_reference(tiny_model_dir: Path) -> list[dict[str, Any]]:
    return reference(tiny_model_dir, PROMPTS)


# -- correctness ------------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [None, 3, 1])
def test_batched_greedy_equals_per_prompt_generate(executor, tiny_model_dir, base_reference, tmp_path,
                                                   batch_size) -> None:
    options = {} if batch_size is None else {"batch_size": batch_size}
    result = run(executor, make_spec(tiny_model_dir, **options), tmp_path)
    items = result["items"]
    assert [item["index"] for item in items] == list(range(len(PROMPTS)))
    assert [item["prompt"] for item in items] == PROMPTS  # input order, though batches are sorted
    assert [item["output"] for item in items] == [ref["output"] for ref in base_reference]
    assert [item["finish_reason"] for item in items] == [ref["finish_reason"] for ref in base_reference]
    # Usage counts real tokens: the long prompt would multiply them if padding were counted.
    prompt_tokens = sum(ref["prompt_tokens"] for ref in base_reference)
    completion_tokens = sum(ref["completion_tokens"] for ref in base_reference)
    assert result["usage"]["prompt_tokens"] == prompt_tokens
    assert result["usage"]["completion_tokens"] == completion_tokens
    assert result["usage"]["total_tokens"] == prompt_tokens + completion_tokens
    assert result["usage"]["num_requests"] == len(PROMPTS)
    assert result["usage"]["latency_sec"] > 0 and result["tokens_per_s"] > 0
    expected_batches = 1 if batch_size is None else -(-len(PROMPTS) // batch_size)
    assert result["batches"] == expected_batches


def test_temperature_zero_is_greedy_decoding(executor, tiny_model_dir, base_reference, tmp_path) -> None:
    """``temperature: 0`` (vLLM's and OpenAI-style APIs' greedy) is accepted and decodes greedily, even
    with ``do_sample: true`` (a random tiny model samples other tokens at temperature 1), with a note."""
    greedy = [ref["output"] for ref in base_reference]
    result = run(executor, make_spec(tiny_model_dir, temperature=0), tmp_path / "plain")
    assert [item["output"] for item in result["items"]] == greedy and "notes" not in result
    result = run(executor, make_spec(tiny_model_dir, temperature=0, do_sample=True, seed=3), tmp_path / "sampled")
    assert [item["output"] for item in result["items"]] == greedy
    assert result["notes"] == ["inference.temperature: 0 means greedy decoding; do_sample: true had no effect"]
    sampled = run(executor, make_spec(tiny_model_dir, temperature=1.0, do_sample=True, seed=3), tmp_path / "t1")
    assert [item["output"] for item in sampled["items"]] != greedy  # the first check could not pass by chance
    with pytest.raises(SpecError, match=r"spec\.inference\.temperature"):
        parse_task_spec(make_spec(tiny_model_dir, temperature=-0.5))


def test_stop_strings_cut_output(executor, tiny_model_dir, base_reference, tmp_path) -> None:
    # A stop string taken from the middle of one reference output, so it really occurs.
    sample = next(ref["output"] for ref in base_reference if len(ref["output"]) >= 6)
    stop = sample[2:4]
    result = run(executor, make_spec(tiny_model_dir, stop=[stop, "never-generated-zzz"]), tmp_path)
    hits = 0
    for item, ref in zip(result["items"], base_reference, strict=True):
        expected, found = cut_at_stop(ref["output"], [stop])
        assert item["output"] == expected
        assert item["finish_reason"] == ("stop" if found else ref["finish_reason"])
        hits += found
    assert hits >= 1
    # Rows that stopped early generated fewer tokens than without the stop string.
    assert result["usage"]["completion_tokens"] < sum(ref["completion_tokens"] for ref in base_reference)


def test_eos_ends_output_with_finish_reason_stop(executor, tiny_model_dir, tmp_path) -> None:
    """Make a token the greedy decoder emits the model's eos: generation ends there."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    enc = tokenizer(PROMPTS[2], return_tensors="pt")
    with torch.inference_mode():
        generated = model.generate(**enc, max_new_tokens=3, do_sample=False)[0, enc.input_ids.shape[1]:]
    new_eos = int(generated[1])  # the second token prompt 2 generates
    model_dir = tmp_path / "eos-model"
    shutil.copytree(tiny_model_dir, model_dir)
    generation = json.loads((model_dir / "generation_config.json").read_text())
    generation["eos_token_id"] = new_eos
    (model_dir / "generation_config.json").write_text(json.dumps(generation))
    expected = reference(model_dir, PROMPTS)
    assert expected[2]["finish_reason"] == "stop"
    result = run(executor, make_spec(model_dir, batch_size=4), tmp_path)
    assert [i["output"] for i in result["items"]] == [e["output"] for e in expected]
    assert [i["finish_reason"] for i in result["items"]] == [e["finish_reason"] for e in expected]
    assert result["usage"]["completion_tokens"] == sum(e["completion_tokens"] for e in expected)


def test_system_prompt_and_chat_templates(executor, tiny_model_dir, tmp_path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = PROMPTS[:4]
    system = "You answer briefly."

    plain = run(executor, make_spec(tiny_model_dir, prompts, system_prompt=system), tmp_path)
    assert [i["output"] for i in plain["items"]] == [
        r["output"] for r in reference(tiny_model_dir, [f"{system}\n\n{p}" for p in prompts])]
    assert [i["prompt"] for i in plain["items"]] == prompts  # the user's prompt, not the rendered one

    chat = run(executor, make_spec(tiny_model_dir, prompts, system_prompt=system, chat_template=True), tmp_path)
    rendered = [tokenizer.apply_chat_template([{"role": "system", "content": system},
                                               {"role": "user", "content": p}],
                                              tokenize=False, add_generation_prompt=True) for p in prompts]
    assert rendered[0].startswith("<|system|>You answer briefly.")
    assert [i["output"] for i in chat["items"]] == [
        r["output"] for r in reference(tiny_model_dir, rendered, add_special_tokens=False)]

    template = "Q: {{ messages[-1]['content'] }}\nA:"
    custom = run(executor, make_spec(tiny_model_dir, prompts, chat_template=template), tmp_path)
    assert [i["output"] for i in custom["items"]] == [
        r["output"] for r in reference(tiny_model_dir, [f"Q: {p}\nA:" for p in prompts],
                                       add_special_tokens=False)]


def test_dataset_file_prompts(executor, tiny_model_dir, base_reference, tmp_path) -> None:
    prompts = PROMPTS[:5]
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "question": p}) + "\n" for i, p in enumerate(prompts)))
    spec = make_spec(tiny_model_dir)
    spec["data"] = {"type": "dataset", "path": str(jsonl), "column": "question"}
    result = run(executor, spec, tmp_path)
    assert [i["prompt"] for i in result["items"]] == prompts
    assert [i["output"] for i in result["items"]] == [r["output"] for r in base_reference[:5]]

    spec["data"]["column"] = "text"
    with pytest.raises(SpecError, match=r"column 'text' not found") as err:
        run(executor, spec, tmp_path)
    assert err.value.field == "spec.data.column"


def test_dataset_from_url(executor, tiny_model_dir, base_reference, tmp_path) -> None:
    """``data.url``: the file is downloaded into the task directory, then read like a local one."""
    import functools
    from http.server import SimpleHTTPRequestHandler

    from tests.conftest import http_server

    served = tmp_path / "served"
    served.mkdir()
    (served / "prompts.csv").write_text("prompt\n" + "".join(f'"{p}"\n' for p in PROMPTS[2:5]))
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    with http_server(handler) as base:
        spec = make_spec(tiny_model_dir)
        spec["data"] = {"type": "dataset", "url": f"{base}/prompts.csv"}
        result = run(executor, spec, tmp_path / "task")
    assert [i["prompt"] for i in result["items"]] == PROMPTS[2:5]
    assert [i["output"] for i in result["items"]] == [r["output"] for r in base_reference[2:5]]
    assert (tmp_path / "task" / "inputs" / "prompts.csv").is_file()


# -- the warm model cache ----------------------------------------------------------------
def test_second_task_reuses_model_and_other_model_replaces_it(tiny_model_dir, other_model_dir,
                                                              base_reference, tmp_path) -> None:
    executor = InferenceExecutor(ModelCache())
    first = run(executor, make_spec(tiny_model_dir), tmp_path)
    assert first["model_cache"]["hit"] is False and first["model_cache"]["loads"] == 1
    assert first["model_cache"]["load_sec"] > 0

    second = run(executor, make_spec(tiny_model_dir), tmp_path)
    assert second["model_cache"] == {"hit": True, "load_sec": 0.0, "loads": 1, "hits": 1}
    assert second["items"] == first["items"]

    other = run(executor, make_spec(other_model_dir), tmp_path)
    assert other["model_cache"]["hit"] is False and other["model_cache"]["loads"] == 2
    assert other["model"]["path"] == str(other_model_dir.resolve())
    other_outputs = [i["output"] for i in other["items"]]
    assert other_outputs == [r["output"] for r in reference(other_model_dir, PROMPTS)]
    assert other_outputs != [r["output"] for r in base_reference]

    # Back to the first model: the cache held only the other one, so it loads again.
    again = run(executor, make_spec(tiny_model_dir), tmp_path)
    assert again["model_cache"]["hit"] is False and again["model_cache"]["loads"] == 3
    assert again["items"] == first["items"]

    # A different dtype is a different model too.
    spec = make_spec(tiny_model_dir)
    spec["model"]["transformers"]["dtype"] = "bfloat16"
    bf16 = run(executor, spec, tmp_path)
    assert bf16["model_cache"]["hit"] is False and bf16["model"]["dtype"] == "bfloat16"


def test_rewritten_model_directory_is_reloaded(tiny_model_dir, other_model_dir, tmp_path) -> None:
    """Same path, new files: never the stale model from the cache."""
    executor = InferenceExecutor(ModelCache())
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    first = run(executor, make_spec(model_dir), tmp_path)
    shutil.rmtree(model_dir)
    shutil.copytree(other_model_dir, model_dir)
    second = run(executor, make_spec(model_dir), tmp_path)
    assert second["model_cache"]["hit"] is False
    assert second["items"] != first["items"]


def test_hub_id_resolved_from_local_cache(executor, tiny_model_dir, base_reference, tmp_path,
                                          monkeypatch) -> None:
    """A hub id loads from the local Hugging Face cache (laid out as the hub client does)."""
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--meshq--tiny-llama"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    spec = make_spec("meshq/tiny-llama", PROMPTS[:3])
    spec["model"]["source"]["revision"] = "main"
    result = run(executor, spec, tmp_path)
    assert [i["output"] for i in result["items"]] == [r["output"] for r in base_reference[:3]]
    assert result["model"]["path"] == str(repo / "snapshots" / commit)

    spec["model"]["source"]["revision"] = "v2"
    with pytest.raises(SpecError, match="nor a model in the local Hugging Face cache at revision 'v2'") as err:
        run(executor, spec, tmp_path)
    assert err.value.field == "spec.model.source.identifier"


# -- checkpoints -------------------------------------------------------------------------
def test_lora_adapter_applied(executor, tiny_model_dir, adapter_dir, base_reference, tmp_path) -> None:
    spec = make_spec(tiny_model_dir, batch_size=4)
    spec["checkpoint"] = {"load": {"type": "local", "path": str(adapter_dir)}}
    result = run(executor, spec, tmp_path)
    outputs = [i["output"] for i in result["items"]]
    assert outputs == [r["output"] for r in reference(tiny_model_dir, PROMPTS, adapter=adapter_dir)]
    assert outputs != [r["output"] for r in base_reference]
    assert result["model"]["adapter"] == str(adapter_dir.resolve())

    # Same base + adapter: a cache hit; the base alone afterwards: not the adapted model.
    assert run(executor, spec, tmp_path)["model_cache"]["hit"] is True
    base = run(executor, make_spec(tiny_model_dir), tmp_path)
    assert base["model_cache"]["hit"] is False and base["model"]["adapter"] is None
    assert [i["output"] for i in base["items"]] == [r["output"] for r in base_reference]


def test_lora_adapter_from_archive(executor, tiny_model_dir, adapter_dir, tmp_path) -> None:
    """A zipped adapter (as training uploads it) is unpacked into the worker's cache and applied."""
    from app.artifacts.archive import make_archive

    archive = make_archive(adapter_dir, "zip", dest=tmp_path / "lora.zip")
    task_dir = tmp_path / "results" / "task-1"
    spec = make_spec(tiny_model_dir, PROMPTS[:4])
    spec["checkpoint"] = {"load": {"type": "local", "path": str(archive.path), "sha256": archive.sha256}}
    result = run(executor, spec, task_dir)
    assert [i["output"] for i in result["items"]] == [
        r["output"] for r in reference(tiny_model_dir, PROMPTS[:4], adapter=adapter_dir)]
    assert str(tmp_path / "results" / ".cache") in result["model"]["adapter"]


def test_load_model_and_tokenizer_for_other_executors(tiny_model_dir, adapter_dir) -> None:
    """The loader training uses: spec options, optional adapter, trainable or frozen."""
    from app.core.task_spec import ModelSpec
    from tasks.executors.models import load_model_and_tokenizer

    model_spec = ModelSpec.model_validate({"source": {"identifier": str(tiny_model_dir)},
                                           "transformers": {"device_map": "cpu", "dtype": "float32"}})
    model, tokenizer = load_model_and_tokenizer(model_spec, adapter_dir=adapter_dir, is_trainable=True)
    assert model.training and any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    assert tokenizer.pad_token == "<|pad|>"
    frozen, _ = load_model_and_tokenizer(model_spec, dtype="bfloat16")
    assert not frozen.training and str(frozen.dtype) == "torch.bfloat16"
    with pytest.raises(SpecError, match="no adapter_config.json") as err:
        load_model_and_tokenizer(model_spec, adapter_dir=tiny_model_dir)
    assert err.value.field == "spec.checkpoint.load.path"


def test_full_model_checkpoint_replaces_base(executor, tiny_model_dir, other_model_dir, tmp_path) -> None:
    spec = make_spec(tiny_model_dir, PROMPTS[:4])
    spec["checkpoint"] = {"load": {"type": "local", "path": str(other_model_dir)}}
    result = run(executor, spec, tmp_path)
    assert [i["output"] for i in result["items"]] == [
        r["output"] for r in reference(other_model_dir, PROMPTS[:4])]
    assert result["model"]["path"] == str(other_model_dir.resolve())


# -- progress and cancellation -----------------------------------------------------------
def test_progress_after_each_batch_and_cancel(executor, tiny_model_dir, tmp_path) -> None:
    progress = RecordingProgress()
    run(executor, make_spec(tiny_model_dir, batch_size=2, max_new_tokens=2), tmp_path, progress)
    reports = progress.reports
    assert [r["done"] for r in reports] == [0, 2, 4, 6, 8, 10]
    assert all(r["total"] == len(PROMPTS) for r in reports)
    assert all(r["tokens_per_s"] > 0 for r in reports[1:])

    cancelling = RecordingProgress(cancel_after=3)  # cancelled once three reports were made
    with pytest.raises(TaskCancelled, match="after 4 of 10 prompts"):
        run(executor, make_spec(tiny_model_dir, batch_size=2, max_new_tokens=2), tmp_path, cancelling)


# -- bad specs ---------------------------------------------------------------------------
def _no_weights(model_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "no-weights"
    target.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, target)
    return target


def _no_config(model_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "no-config"
    shutil.copytree(model_dir, target)
    (target / "config.json").unlink()
    return target


@pytest.mark.parametrize(("mutate", "field", "message"), [
    (lambda s, d, t: s["inference"].update(temprature=0.5), "spec.inference.temprature", "unknown field"),
    (lambda s, d, t: s["inference"].update(max_new_tokens="many"), "spec.inference.max_new_tokens",
     "valid integer"),
    (lambda s, d, t: s["data"].update(items=[]), "spec.data.items", "at least one prompt"),
    (lambda s, d, t: s["model"]["source"].update(identifier=str(t / "nowhere")),
     "spec.model.source.identifier", "does not exist"),
    (lambda s, d, t: s["model"]["source"].update(identifier=str(_no_weights(d, t))),
     "spec.model.source.identifier", "has no weights"),
    (lambda s, d, t: s["model"]["source"].update(identifier=str(_no_config(d, t))),
     "spec.model.source.identifier", "has no config.json"),
    (lambda s, d, t: s["model"]["source"].update(identifier="no-such-org/no-such-model"),
     "spec.model.source.identifier", "local Hugging Face cache"),
    (lambda s, d, t: s.update(checkpoint={"load": {"type": "local", "path": str(t / "gone")}}),
     "spec.checkpoint.load.path", "does not exist"),
    (lambda s, d, t: s["data"].update(type="dataset", items=None, path=str(t / "missing.jsonl")),
     "spec.data.path", "does not exist"),
    (lambda s, d, t: s["data"].update(items=["ok", ""]), "spec.data.items", "prompt 1 is empty"),
    (lambda s, d, t: s["inference"].update(max_new_tokens=600), "spec.inference.max_new_tokens",
     "exceeds the model's context of 512"),
])
def test_bad_spec_names_the_field(executor, tiny_model_dir, tmp_path, mutate, field, message) -> None:
    spec = make_spec(tiny_model_dir, ["hello"])
    mutate(spec, tiny_model_dir, tmp_path)
    with pytest.raises(SpecError) as err:
        run(executor, spec, tmp_path)
    assert err.value.field == field
    assert message in str(err.value) and str(err.value).startswith(field)


def test_adapter_as_model_identifier_is_explained(executor, adapter_dir, tmp_path) -> None:
    with pytest.raises(SpecError, match="is a LoRA adapter, not a model") as err:
        run(executor, make_spec(adapter_dir, ["hello"]), tmp_path)
    assert err.value.field == "spec.model.source.identifier"


# -- pure helpers ------------------------------------------------------------------------
@pytest.mark.parametrize(("lengths", "batch_size", "budget", "expected"), [
    ([3, 10, 1, 7], 2, 10_000, [[1, 3], [0, 2]]),
    ([5, 5, 5], 2, 10_000, [[0, 1], [2]]),
    ([3, 10, 1, 7], None, 10_000, [[1, 3, 0, 2]]),
    # 2 rows x (10 + 10) = 40 > 30: the long prompt gets a batch of its own.
    ([3, 10, 1, 7], None, 30, [[1], [3], [0, 2]]),
    ([4] * 5, None, 10_000, [[0, 1], [2, 3], [4]]),  # max_batch=2 in this case
])
def test_plan_batches(lengths, batch_size, budget, expected) -> None:
    max_batch = 2 if lengths == [4] * 5 else 32
    batches = plan_batches(lengths, 10, batch_size, max_batch=max_batch, token_budget=budget)
    assert batches == expected
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))


@pytest.mark.parametrize(("text", "stops", "expected"), [
    ("hello world", ["wor"], ("hello ", True)),
    ("hello world", ["o", "ll"], ("he", True)),  # the earliest occurrence wins
    ("hello", ["x", ""], ("hello", False)),
    ("hello", [], ("hello", False)),
])
def test_cut_at_stop(text, stops, expected) -> None:
    assert cut_at_stop(text, stops) == expected
