"""How much GPU memory a QLoRA step needs, from the model's shapes: before anything is loaded.

The estimate adds what lives through the step (4-bit and 16-bit weights, adapters with their
gradients and AdamW state, the activations each decoder layer keeps for the backward under the
chosen checkpointing) and the largest transient on top (one layer's recompute, the chunked loss).
It drives ``model.activation_checkpointing=auto`` (the fastest setting that fits a budget), the
pre-flight's "will it fit?" check and ``lightning-qlora-estimate``.

Per token and decoder layer of a Llama-style block (hidden ``h``, key/value width ``kv``, MLP width
``i``), a layer that is not checkpointed keeps, in the compute dtype: the two RMSNorm inputs upcast to
fp32 and their outputs (2 x (2h + h)), the rotated q and k, v, the attention output and its
projection input (4h + 2kv), and the MLP's gate, activation, up and product (4i) = 18h + 4kv + 8i
bytes at 16 bits. A checkpointed layer keeps only its input (h); offloaded, not even that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

GIB = 1024**3
CHECKPOINTING = ("none", "full", "every_n_layers", "offload", "auto")
# Allocator slack, CUDA context excluded (it is not in torch.cuda.max_memory_allocated): fragmentation
# and the small tensors not modelled (RoPE tables, masks, norms' statistics).
SLACK = 1.05
# What a compiled block keeps, relative to the eager model above: inductor recomputes cheap elementwise
# results (the norms' fp32 copies, SiLU) in the backward instead of saving them. Fitted to the H200
# peaks of Llama-2-7B (2 x 2048) and Llama-3.2-1B (4 x 2048) shapes with one layer in five checkpointed.
COMPILED_KEEP = 0.72


@dataclass
class Shapes:
    """The shapes of a decoder-only transformer that memory depends on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_hf(cls, config: Any) -> Shapes:
        heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        return cls(
            hidden=int(config.hidden_size),
            intermediate=int(config.intermediate_size),
            layers=int(config.num_hidden_layers),
            heads=heads,
            kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=head_dim,
            vocab=int(config.vocab_size),
            tied=bool(getattr(config, "tie_word_embeddings", False)),
        )

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of one decoder layer's linear layers: q, k, v, o, gate, up, down."""
        h, kv, i = self.hidden, self.kv_heads * self.head_dim, self.intermediate
        q = self.heads * self.head_dim
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]


@dataclass
class Estimate:
    """Bytes by part; ``total`` is the predicted peak of ``torch.cuda.max_memory_allocated``."""

    parts: dict[str, float] = field(default_factory=dict)
    checkpointing: str = "full"
    every_n_layers: int = 1

    @property
    def total(self) -> float:
        return sum(self.parts.values()) * SLACK

    def table(self) -> str:
        rows = [f"  {name:<34} {value / GIB:8.2f} GiB" for name, value in self.parts.items()]
        rows.append(f"  {'total (x' + str(SLACK) + ' allocator slack)':<34} {self.total / GIB:8.2f} GiB")
        return "\n".join(rows)


def four_bit_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> float:
    """Packed 4-bit codes plus their block constants (fp32 absmax; with double quant 8-bit absmax + fp32
    per 256 blocks): 4.127 bits per weight for NF4 + DQ at block size 64."""
    blocks = numel / blocksize
    constants = blocks * (1 + 4 / 256) if double_quant else blocks * 4
    return numel / 2 + constants


def activation_bytes_per_token(shapes: Shapes, dtype_bytes: int = 2) -> dict[str, float]:
    """Bytes one decoder layer keeps per token for the backward: not checkpointed (``none``),
    checkpointed (its input only) and offloaded (nothing on the GPU)."""
    h, kv, i = shapes.hidden, shapes.kv_heads * shapes.head_dim, shapes.intermediate
    scale = dtype_bytes / 2
    full = (18 * h + 4 * kv + 8 * i) * scale
    return {"none": full, "checkpointed": h * dtype_bytes, "offloaded": 0.0}


def checkpointed_layers(layers: int, mode: str, every_n: int) -> tuple[int, int]:
    """(checkpointed, offloaded) layer counts for a mode; the rest keep their activations."""
    if mode == "none":
        return 0, 0
    if mode == "offload":
        return 0, layers
    if mode == "every_n_layers":
        return math.ceil(layers / max(int(every_n), 1)), 0
    return layers, 0  # full


def estimate(
    shapes: Shapes,
    batch: int,
    seq: int,
    *,
    checkpointing: str = "full",
    every_n_layers: int = 1,
    lora_r: int = 16,
    quantized: bool = True,
    blocksize: int = 64,
    double_quant: bool = True,
    dtype_bytes: int = 2,
    loss_chunk: int = 2048,
    optimizer_states: int = 2,
    compiled: bool = False,
) -> Estimate:
    """The peak GPU memory of one training step (see the module docstring for the model).

    Args:
        shapes: the model's shapes (:meth:`Shapes.from_hf`).
        batch: sequences per step (per GPU).
        seq: tokens per sequence.
        checkpointing: ``none`` | ``full`` | ``every_n_layers`` | ``offload``.
        every_n_layers: with ``every_n_layers``, one layer in ``n`` is checkpointed.
        lora_r: adapter rank, on every linear layer of the decoder (``all-linear``).
        quantized: 4-bit base (else 16-bit LoRA).
        blocksize: 4-bit block size.
        double_quant: 8-bit block constants.
        dtype_bytes: bytes of the compute dtype.
        loss_chunk: tokens per chunk of the output head + cross-entropy.
        optimizer_states: fp32 tensors the optimizer keeps per adapter weight (AdamW: 2).
        compiled: decoder blocks run under ``torch.compile``, which keeps fewer intermediates
            (:data:`COMPILED_KEEP` of eager's, measured).
    """
    tokens = batch * seq
    per_layer = shapes.linears()
    linear_numel = shapes.layers * sum(a * b for a, b in per_layer)
    base = four_bit_bytes(linear_numel, blocksize, double_quant) if quantized else linear_numel * dtype_bytes
    embed = shapes.vocab * shapes.hidden * dtype_bytes * (1 if shapes.tied else 2)
    norms = (2 * shapes.layers + 1) * shapes.hidden * dtype_bytes
    adapter_numel = shapes.layers * sum(lora_r * (a + b) for a, b in per_layer)
    per_token = activation_bytes_per_token(shapes, dtype_bytes)
    if compiled:
        per_token["none"] *= COMPILED_KEEP
    n_ckpt, n_off = checkpointed_layers(shapes.layers, checkpointing, every_n_layers)
    n_kept = shapes.layers - n_ckpt - n_off
    kept = tokens * (
        n_kept * per_token["none"] + n_ckpt * per_token["checkpointed"] + n_off * per_token["offloaded"]
    )
    # The largest transient: a checkpointed layer recomputed in the backward holds its activations
    # again, plus the gradient flowing through it; the loss holds one chunk's fp32 logits and their
    # bf16 product, and the hidden-state gradient it computes in its forward.
    recompute = tokens * per_token["none"] if (n_ckpt or n_off) else 0.0
    dequantized = max(a * b for a, b in per_layer) * dtype_bytes if quantized else 0.0
    grad_stream = 2 * tokens * shapes.hidden * dtype_bytes
    chunk = min(loss_chunk or tokens, tokens)
    # logits in the compute dtype, their fp32 copy, and logsumexp's fp32 temporary
    loss = chunk * shapes.vocab * (8 + dtype_bytes) + tokens * shapes.hidden * dtype_bytes * 2
    parts = {
        "4-bit linear weights" if quantized else "16-bit linear weights": base,
        "embeddings + head + norms (16-bit)": embed + norms,
        "adapters (fp32) + grads + optimizer": adapter_numel * 4 * (2 + optimizer_states),
        "activations kept for the backward": kept,
        "largest transient (recompute/loss)": max(recompute + dequantized + grad_stream, loss),
    }
    return Estimate(parts=parts, checkpointing=checkpointing, every_n_layers=every_n_layers)


def candidates(layers: int) -> list[tuple[str, int]]:
    """Checkpointing settings from fastest (least recompute) to leanest."""
    out: list[tuple[str, int]] = [("none", 1)]
    for n in sorted({layers, *range(8, 1, -1)}, reverse=True):
        if 1 < n <= layers:
            out.append(("every_n_layers", n))
    return out + [("full", 1), ("offload", 1)]


def choose_checkpointing(budget_gib: float, shapes: Shapes, batch: int, seq: int, **kwargs: Any) -> Estimate:
    """The fastest checkpointing setting whose estimated peak fits ``budget_gib``.

    Raises:
        ValueError: not even offloading fits; the message carries the leanest estimate's table.
    """
    leanest = None
    for mode, n in candidates(shapes.layers):
        est = estimate(shapes, batch, seq, checkpointing=mode, every_n_layers=n, **kwargs)
        if est.total <= budget_gib * GIB:
            return est
        leanest = est
    assert leanest is not None
    raise ValueError(
        f"model.max_memory_gib={budget_gib:g} is too small for {batch} x {seq} tokens even with activation "
        f"checkpointing offloaded: about {leanest.total / GIB:.1f} GiB needed; lower data.batch_size or "
        f"data.max_length, or raise the budget. Estimate: "
        + "; ".join(f"{k} {v / GIB:.2f} GiB" for k, v in leanest.parts.items())
    )
