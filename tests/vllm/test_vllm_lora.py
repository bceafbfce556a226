"""LoRA adapters on the vLLM backend, through a real worker from ``.venv-vllm``: an adapter
trained by a meshq ``lora_sft`` task (on the same worker: the training releases the engine)
makes vLLM answer what it was trained to, served with vLLM's LoRA support, not merged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here (make install-vllm; make test-vllm)")

PAIRS = [{"prompt": "Q: What is the capital of France?\nA:", "response": " Paris"},
         {"prompt": "Q: What colour is the sky?\nA:", "response": " Blue"},
         {"prompt": "Q: How many legs does a spider have?\nA:", "response": " Eight"}]
PROMPTS = [pair["prompt"] for pair in PAIRS]
ANSWERS = [pair["response"] for pair in PAIRS]


def run(raw: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
    from app.celery import app
    from tasks.submit import submit_task

    return app.AsyncResult(submit_task(raw).task_id).get(timeout=timeout)


def inference(model_dir: Path, **extra: Any) -> dict[str, Any]:
    return {"taskType": "inference",
            "model": {"source": {"identifier": str(model_dir)}, "transformers": {"device_map": "cpu"},
                      **extra.pop("model", {})},
            "data": {"type": "list", "items": PROMPTS},
            "inference": {"max_new_tokens": 8, "backend": "vllm"}, **extra}


def test_an_adapter_trained_by_lora_sft_changes_vllm_outputs_to_the_trained_answers(worker_factory,
                                                                                     tiny_model_dir) -> None:
    worker = worker_factory()
    base = run(inference(tiny_model_dir))
    assert base["backend"] == "vllm" and [i["output"] for i in base["items"]] != ANSWERS

    trained = run({"taskType": "lora_sft",
                   "model": {"source": {"identifier": str(tiny_model_dir)}, "transformers": {"device_map": "cpu"}},
                   "data": {"prompts": PAIRS, "separator": ""},
                   "training": {"learning_rate": 5e-3, "lr_scheduler_type": "constant", "max_steps": 150,
                                "batch_size": 3, "save_steps": 1000},
                   "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}})
    archive, digest = trained["final_lora_archive"], trained["final_lora_archive_sha256"]
    # The training task needed the memory: the worker released its warm engine first.
    worker_log = Path(worker.env["MESHQ_LOG_FILE"]).read_text()
    assert "releasing vLLM engine" in worker_log

    adapted = run(inference(tiny_model_dir, checkpoint={"load": {"type": "local", "path": archive,
                                                                 "sha256": digest}}))
    assert adapted["backend"] == "vllm"
    assert [i["output"] for i in adapted["items"]] == ANSWERS
    assert adapted["engine"]["lora_rank"] == 16 and adapted["model"]["adapter_merged"] is False
    assert digest in adapted["model"]["adapter"]  # unpacked once per archive digest

    # The original spelling (model.adapters, apply: merge) is served the same way, with a note,
    # by the warm engine and the same unpacked adapter.
    again = run(inference(tiny_model_dir, model={"adapters": [{"path": archive, "apply": "merge"}]}))
    assert [i["output"] for i in again["items"]] == ANSWERS
    assert again["model_cache"]["hit"] is True and again["model"]["adapter"] == adapted["model"]["adapter"]
    assert any(note.startswith("model.adapters: apply merge: vLLM serves the adapter") for note in again["notes"])
    # The warm LoRA engine serves the base model too.
    plain = run(inference(tiny_model_dir))
    assert plain["model_cache"]["hit"] is True and plain["items"] == base["items"]
