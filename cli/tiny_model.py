"""Build a tiny Llama-architecture causal LM and tokenizer locally (no model hub).

Random weights; a byte-level BPE tokenizer trained with ``tokenizers`` on a small
built-in corpus; saved with ``save_pretrained`` (safetensors) so it loads through
the same ``from_pretrained`` path as a real model. Used by tests, the demo and
benchmarks (``meshq tiny-model DIR --size test|vllm|bench|gpu|llama-1b``).

Every size has a head size (hidden / heads) that vLLM's CPU attention supports (32, 64,
80, 96, 112, 128, ...), so both inference engines load each of them. ``vllm`` is the
shape the vLLM tests use: weights drawn wider than the default initialiser's, so
greedy outputs differ from prompt to prompt instead of repeating one token, which
makes "the two engines agree token for token" a real comparison. ``llama-1b`` has
the layer shape of Llama 3.2 1B (with this small vocabulary: ~1.0B parameters) for
benchmarks on a GPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Sizes: hidden, layers, heads, kv heads, intermediate, vocab.
SIZES: dict[str, dict[str, int]] = {
    "test": {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 4, "intermediate_size": 352, "vocab_size": 2048},   # ~1M params
    "bench": {"hidden_size": 512, "num_hidden_layers": 9, "num_attention_heads": 8,
              "num_key_value_heads": 8, "intermediate_size": 1536, "vocab_size": 2048},  # ~30M params
    "gpu": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
            "num_key_value_heads": 12, "intermediate_size": 2560, "vocab_size": 2048},  # ~100M params
    "vllm": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 4, "intermediate_size": 704, "vocab_size": 2048},    # ~3.7M params
    "llama-1b": {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "intermediate_size": 8192, "vocab_size": 2048},  # ~1.0B params
}
# Standard deviation of the random weights where it is not the Llama default (0.02):
# with 0.02 a tiny model repeats one token whatever the prompt.
INIT_STD: dict[str, float] = {"vllm": 0.1}

CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
meshq runs batch inference, full fine-tuning and LoRA fine-tuning on a fleet of GPU and CPU workers.
Workers send heartbeats to Redis and consume queues that match their tags.
Question: What is the capital of France? Answer: Paris.
Question: What colour is the sky? Answer: Blue.
Question: How many legs does a spider have? Answer: Eight.
Translate to French: hello → bonjour. Translate to German: thank you → danke.
def add(a, b):\n    return a + b\n
Once upon a time there was a small model that learned to repeat short answers.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 100 1000.
The pipeline trains an adapter, uploads it to the orchestrator, and runs inference elsewhere.
Celery is a distributed task queue; Flower watches its workers; Redis is the broker.
"""

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(vocab_size: int) -> Any:
    """Byte-level BPE trained on ``CORPUS``; every byte is encodable, so any prompt works."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>", unk_token="<|unk|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(out_dir: str | Path, size: str = "test", seed: int = 0) -> Path:
    """Write config, safetensors weights and tokenizer to ``out_dir``; return it."""
    if size not in SIZES:
        raise ValueError(f"size: {size!r} is not one of {', '.join(SIZES)}")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dims: dict[str, Any] = dict(SIZES[size])
    tokenizer = build_tokenizer(dims["vocab_size"])
    torch.manual_seed(seed)
    config = LlamaConfig(
        **dims,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=INIT_STD.get(size, 0.02),
    )
    config.vocab_size = len(tokenizer)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def parameter_count(model_dir: str | Path) -> int:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return sum(p.numel() for p in model.parameters())
