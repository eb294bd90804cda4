"""The tiny random Llama the tests save with ``save_pretrained`` and load back through the real path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers

TINY = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


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
        from lightning_qlora.tokenizer import build_byte_tokenizer

        build_byte_tokenizer().save_pretrained(path)
    return model
