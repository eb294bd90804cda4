"""The work of one training step per token, and the card's matrix-product peak it is measured against.

The benchmark's "% matmul peak" column is ``tokens/s per GPU x flops_per_token / matmul_peak``: the share
of what the card's bf16 matrix products reach (measured in the same call) that the step's arithmetic used.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch

from .bench_common import LORA


def layer_linears(config: Mapping[str, Any]) -> list[tuple[int, int]]:
    """(in, out) of one Llama-style decoder layer's linear layers: q, k, v, o, gate, up, down."""
    h = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or h // heads
    q = heads * head_dim
    kv = (config.get("num_key_value_heads") or heads) * head_dim
    i = config["intermediate_size"]
    return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]


def flop_terms(config: Mapping[str, Any], seq: int, lora_r: int = LORA["r"]) -> dict[str, float]:
    """FLOPs per token of a LoRA / QLoRA training step with full activation checkpointing, by term.

    For a Llama-style decoder (``L`` layers, hidden ``h``, query width ``q = heads x head_dim``, key/value
    width ``kv``, MLP width ``i``, vocabulary ``V``, sequence length ``s``, adapter rank ``r``), counting a
    multiply-add as 2 FLOPs::

        N = L (h q + 2 h kv + q h + 3 h i)       the decoder's linear weights (frozen, 4- or 16-bit)
        A = L r [(h + q) + 2 (h + kv) + (q + h) + 3 (h + i)]    the adapters' weights

        linear     = 6 N       2N forward + 2N recompute + 2N input gradient; a frozen weight has no
                               weight gradient, so the 4N of the usual 6N backward is only 2N here
        head       = 4 V h     forward + input gradient; outside the checkpointed layers, not recomputed
        adapters   = 8 A       forward + recompute + input gradient + weight gradient (2A each)
        attention  = 16 L s q  QK^T and AV are 2 s q each (4 L s q a pass, non-causal, as PaLM's MFU
                               counts them; a causal kernel skips about half), for the forward, the
                               recompute and the backward (2 passes: dQ, dK from dS; dV, dP from dO)

    Embedding lookups, norms, activations, softmax and the loss are not counted (elementwise), nor the
    input gradient of the first layer (its input, the frozen embedding, needs none). Every mode and model
    is measured against this same count, also a row that recomputes less (``--max-memory-gib``): its
    share then says how fast it went, not how busy the card was. For Llama-2-7B at 2048 tokens it is
    44.0 GFLOP per token (linear 38.9, attention 4.3, head 0.5, adapters 0.3).

    Args:
        config: the transformers config kwargs of the model (``MODELS[name]["config"]``).
        seq: tokens per sequence.
        lora_r: adapter rank; every linear layer of the decoder is adapted (``all-linear``).

    Returns:
        ``linear``, ``head``, ``adapters``, ``attention`` and their ``total``.
    """
    h = config["hidden_size"]
    layers = config["num_hidden_layers"]
    shapes = layer_linears(config)
    q = shapes[0][1]
    n = layers * sum(a * b for a, b in shapes)
    adapters = layers * lora_r * sum(a + b for a, b in shapes)
    terms = {
        "linear": 6.0 * n,
        "head": 4.0 * config["vocab_size"] * h,
        "adapters": 8.0 * adapters,
        "attention": 16.0 * layers * seq * q,
    }
    terms["total"] = sum(terms.values())
    return terms


def flops_per_token(config: Mapping[str, Any], seq: int, lora_r: int = LORA["r"]) -> float:
    """The total of :func:`flop_terms`."""
    return flop_terms(config, seq, lora_r)["total"]


def matmul_peak(device: torch.device, n: int | None = None, iters: int | None = None) -> tuple[float, str]:
    """FLOP/s that ``n x n x n`` matrix products reach on ``device``: the best of 3 timed loops.

    On a GPU in bf16 at 8192 (the bound a transformer's large products approach); on a CPU in float32 at
    512 (the harness check: small and quick, its figure means little).

    Returns:
        FLOP/s, and a label saying what was measured (``"bf16 8192^3"``).
    """
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 512)
    iters = iters or (50 if cuda else 5)
    dtype = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    out = torch.empty(n, n, device=device, dtype=dtype)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    for _ in range(max(iters // 5, 2)):  # warm-up: clocks up, cuBLAS heuristics chosen
        torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(3):
        sync()
        start = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b, out=out)
        sync()
        best = min(best, time.perf_counter() - start)
    del a, b, out
    if cuda:
        torch.cuda.empty_cache()
    name = str(dtype).removeprefix("torch.").replace("bfloat16", "bf16")
    return 2.0 * n**3 * iters / best, f"{name} {n}^3"
