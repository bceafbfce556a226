"""The tiny ``vllm`` model loads in vLLM and its greedy tokens equal transformers' (the base
the executor tests build on)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here (make install-vllm; make test-vllm)")


def test_vllm_loads_the_tiny_vllm_model_and_agrees_with_transformers(tmp_path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    from cli.tiny_model import build_tiny_model

    directory = str(build_tiny_model(tmp_path / "model", size="vllm"))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    prompts = ["Hello there", "Question: What colour is the sky? Answer:", "def add(a, b):" * 5]
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.inference_mode():
        expected = [model.generate(torch.tensor([x]), max_new_tokens=12, do_sample=False)[0, len(x):].tolist()
                    for x in ids]
    llm = LLM(model=directory, dtype="float32", max_model_len=512, enforce_eager=True)
    outputs = llm.generate([{"prompt_token_ids": x} for x in ids], SamplingParams(temperature=0, max_tokens=12),
                           use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outputs] == expected
