"""The tiny random Llama the tests save with ``save_pretrained`` and load back through the real path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers

from lightning_qlora.bench import MODELS

# The one tiny Llama of the suite, shared with the benchmark's CPU harness: 64 wide (the smallest width
# the default 64-block NF4 accepts), 2 layers.
TINY: dict[str, Any] = dict(MODELS["tiny"]["config"])

# The micro Llama the Hydra tests build from a config: the tiny one with 1 layer, untied head, and no
# vocab_size (a model built from a config takes the tokenizer's).
MICRO_LLAMA: dict[str, Any] = {
    "model_type": "llama",
    **{k: v for k, v in TINY.items() if k != "vocab_size"},
    "num_hidden_layers": 1,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}


def tiny_llama_config(**overrides: Any) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(**{**TINY, **overrides})


def save_tiny_llama(
    path: str | Path, tokenizer: bool = False, seed: int = 0, **overrides: Any
) -> transformers.PreTrainedModel:
    """Saves a seeded random tiny Llama (and the byte tokenizer if asked) to ``path``; returns the model."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_llama_config(**overrides))
    model.save_pretrained(path)
    if tokenizer:
        from lightning_qlora.data import build_byte_tokenizer

        build_byte_tokenizer().save_pretrained(path)
    return model


def tiny_qlora_llama(
    quantized: bool = True, dropout: float = 0.0, **overrides: Any
) -> transformers.PreTrainedModel:
    """The seeded tiny Llama converted by the plugin on the CPU (float32; 4-bit in blocks of 32 when
    ``quantized``, else a 16-bit base), LoRA r=4 on every linear layer, in train mode, no KV cache."""
    from lightning_qlora import LoRAConfig, QLoRAPrecision, QuantConfig

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_llama_config(**overrides))
    quant = QuantConfig(compute_dtype=torch.float32, blocksize=32) if quantized else None
    lora = LoRAConfig(r=4, dropout=dropout)
    QLoRAPrecision(quant=quant, lora=lora, compute_dtype=torch.float32).convert_module(model).to("cpu")
    model.train()
    model.config.use_cache = False
    return model
