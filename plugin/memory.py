"""How much GPU memory a QLoRA step needs, from the model's shapes: before anything is loaded.

The estimate adds what lives through the step (4-bit and 16-bit weights, adapters with their
gradients and AdamW state, the activations each decoder layer keeps for the backward under the
chosen checkpointing) and the largest transient on top (one layer's recompute, the chunked loss).
It drives ``model.activation_checkpointing=auto`` (the fastest setting that fits a budget), the
pre-flight's "will it fit?" check and ``lightning-qlora-estimate`` (:mod:`lightning_qlora.estimate`).

Per token and decoder layer of a Llama-style block (hidden ``h``, key/value width ``kv``, MLP width
``i``), a layer that is not checkpointed keeps, in the compute dtype: the two RMSNorm inputs upcast to
fp32 and their outputs (2 x (2h + h)), the rotated q and k, v, the attention output and its
projection input (4h + 2kv), and the MLP's gate, activation, up and product (4i) = 18h + 4kv + 8i
bytes at 16 bits. A checkpointed layer keeps only its input (h); offloaded, not even that.

The weights are either derived from the same shapes (every decoder linear layer 4-bit and adapted,
:meth:`Weights.from_shapes`) or counted on the model itself built on the meta device and converted by
the plugin (:func:`count_weights`), which follows ``lora.target_modules`` and ``quant.skip_modules``
exactly. Under data parallelism each GPU holds all of it (DDP adds a bucket per adapter gradient);
under FSDP each GPU holds ``1/N`` of the packed 4-bit bytes, the 16-bit weights and the adapters with
their gradients and optimizer state, but every quantization constant (each layer keeps its own whole),
all of its activations, and the layers FSDP gathers for compute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

GIB = 1024**3
CHECKPOINTING = ("none", "full", "every_n_layers", "offload", "auto")
STRATEGIES = ("ddp", "fsdp")
# Allocator slack, CUDA context excluded (it is not in torch.cuda.max_memory_allocated): fragmentation
# and the small tensors not modelled (RoPE tables, masks, norms' statistics).
SLACK = 1.05
# What a compiled block keeps, relative to the eager model above: inductor recomputes cheap elementwise
# results (the norms' fp32 copies, SiLU) in the backward instead of saving them. Fitted to the H200
# peaks of Llama-2-7B (2 x 2048) and Llama-3.2-1B (4 x 2048) shapes with one layer in five checkpointed.
COMPILED_KEEP = 0.72
# FSDP gathers a layer's full weights for its forward and backward and prefetches the next one while it
# computes: two layers are whole at once, besides the root unit (embeddings, head), which FSDP2 keeps
# gathered from the forward to the end of the backward.
FSDP_GATHERED_LAYERS = 2

# The parts of an estimate (``Estimate.parts`` keys), in the order the table prints them.
PACKED = "4-bit weights"
CONSTANTS = "quantization constants"
LINEAR16 = "16-bit linear weights"
DENSE = "embeddings, head, norms"
ADAPTERS = "adapters + grads + optimizer state"
GATHERED = "layers gathered by FSDP"
ACTIVATIONS = "activations"
TRANSIENT = "largest transient"


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


def packed_bytes(numel: int, storage_bytes: int = 1) -> int:
    """The packed 4-bit codes of one weight: two per byte, in whole elements of the storage dtype
    (bitsandbytes' ``quantize_4bit``)."""
    per_element = 2 * storage_bytes
    return (numel + 1) // per_element * storage_bytes


def constant_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """The block constants of one 4-bit weight: an fp32 absmax per block; with double quant an 8-bit
    absmax per block, an fp32 absmax per 256 of those and one fp32 offset."""
    blocks = math.ceil(numel / blocksize)
    return blocks + 4 * math.ceil(blocks / 256) + 4 if double_quant else 4 * blocks


def four_bit_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> float:
    """Packed 4-bit codes plus their block constants: 4.127 bits per weight for NF4 + DQ at block size 64."""
    return packed_bytes(numel) + constant_bytes(numel, blocksize, double_quant)


@dataclass
class Weights:
    """What a model holds before its first step, in bytes (adapters in parameters).

    Attributes:
        packed: 4-bit codes of the quantized linear layers.
        constants: their block constants (absmax, and the nested ones under double quantization).
        linear16: linear layers of the decoder kept in the compute dtype (all of them with ``quant=none``).
        dense: everything else frozen, in its dtype: embeddings, output head, norms, biases, buffers.
        root: the part of ``packed + linear16 + dense`` outside the decoder layers (embeddings, head, final
            norm): FSDP's root unit.
        adapters: adapter parameters (float32, trained).
        largest_quantized: elements of the largest 4-bit weight (dequantized whole in its matmul).
        layers: decoder layers.
    """

    packed: float
    constants: float
    linear16: float
    dense: float
    root: float
    adapters: int
    largest_quantized: int
    layers: int

    @classmethod
    def from_shapes(
        cls,
        shapes: Shapes,
        lora_r: int = 16,
        quantized: bool = True,
        blocksize: int = 64,
        double_quant: bool = True,
        dtype_bytes: int = 2,
    ) -> Weights:
        """Every linear layer of every decoder layer 4-bit (or 16-bit) and adapted with rank ``lora_r``; the
        embeddings and the (untied) head in the compute dtype."""
        per_layer = shapes.linears()
        numel = shapes.layers * sum(a * b for a, b in per_layer)
        embed = shapes.vocab * shapes.hidden * dtype_bytes * (1 if shapes.tied else 2)
        norms = (2 * shapes.layers + 1) * shapes.hidden * dtype_bytes
        return cls(
            packed=shapes.layers * sum(packed_bytes(a * b) for a, b in per_layer) if quantized else 0,
            constants=(
                shapes.layers * sum(constant_bytes(a * b, blocksize, double_quant) for a, b in per_layer)
                if quantized
                else 0
            ),
            linear16=0 if quantized else numel * dtype_bytes,
            dense=embed + norms,
            root=embed + shapes.hidden * dtype_bytes,
            adapters=shapes.layers * sum(lora_r * (a + b) for a, b in per_layer),
            largest_quantized=max(a * b for a, b in per_layer) if quantized else 0,
            layers=shapes.layers,
        )

    def layer_bytes(self) -> float:
        """One decoder layer's weights and adapters, whole (what FSDP gathers for it)."""
        frozen = self.packed + self.linear16 + self.dense - self.root
        return (frozen + 4 * self.adapters) / max(self.layers, 1)


def count_weights(model: Any) -> Weights:
    """:class:`Weights` counted on a model the plugin converted (on the meta device: nothing allocated).

    A :class:`~lightning_qlora.nf4.Linear4bit` counts its packed bytes and block constants as bitsandbytes
    will make them (``nf4.weight_bytes_by_dtype`` of the quantized model gives the same); trainable
    parameters are adapters; every other parameter and buffer counts in its own dtype.
    """
    import torch

    from .anatomy import decoder_layers
    from .nf4 import Linear4bit, named_linears

    layers = decoder_layers(model)
    inside = {id(t) for layer in layers for t in [*layer.parameters(), *layer.buffers()]}
    base_linears = [m for _, m in named_linears(model)]  # adapters' own linear layers are not among them
    w = Weights(
        packed=0,
        constants=0,
        linear16=0,
        dense=0,
        root=0,
        adapters=0,
        largest_quantized=0,
        layers=len(layers),
    )
    counted: set[int] = set()
    for module in base_linears:
        if not isinstance(module, Linear4bit):
            continue
        weight, numel = module.weight, module.in_features * module.out_features
        storage = getattr(weight, "quant_storage", torch.uint8)
        packed = packed_bytes(numel, storage.itemsize)
        w.packed += packed
        w.constants += constant_bytes(numel, module.blocksize, module.double_quant)
        w.largest_quantized = max(w.largest_quantized, numel)
        w.root += 0 if id(weight) in inside else packed
        counted.add(id(weight))
    linear_weights = {id(m.weight) for m in base_linears}
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in counted:
            continue
        counted.add(id(tensor))
        size = tensor.numel() * tensor.element_size()
        if tensor.requires_grad:
            w.adapters += tensor.numel()
        elif id(tensor) in inside and id(tensor) in linear_weights:
            w.linear16 += size
        else:
            w.dense += size
            w.root += 0 if id(tensor) in inside else size
    return w


@dataclass
class Estimate:
    """Bytes by part, per GPU; ``total`` is the predicted peak of ``torch.cuda.max_memory_allocated``."""

    parts: dict[str, float] = field(default_factory=dict)
    checkpointing: str = "full"
    every_n_layers: int = 1
    transient: str = ""  # what the largest transient is, for the table: "one layer's recompute", ...

    @property
    def slack(self) -> float:
        """What :data:`SLACK` adds to the parts."""
        return sum(self.parts.values()) * (SLACK - 1)

    @property
    def total(self) -> float:
        return sum(self.parts.values()) * SLACK

    @property
    def mode(self) -> str:
        """The checkpointing setting, as the table names it: ``full``, ``every_n_layers (1 in 4)``, ..."""
        if self.checkpointing == "every_n_layers":
            return f"every_n_layers (1 in {self.every_n_layers})"
        return self.checkpointing

    def table(self) -> str:
        rows = [f"  {name:<34} {value / GIB:8.2f} GiB" for name, value in self.parts.items()]
        rows.append(f"  {'total (x' + str(SLACK) + ' allocator slack)':<34} {self.total / GIB:8.2f} GiB")
        return "\n".join(rows)


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
    optimizer_states: float = 2,
    compiled: bool = False,
    weights: Weights | None = None,
    devices: int = 1,
    strategy: str = "ddp",
    gathered_layers: int = FSDP_GATHERED_LAYERS,
) -> Estimate:
    """The peak GPU memory of one training step, per GPU (see the module docstring for the model).

    Args:
        shapes: the model's shapes (:meth:`Shapes.from_hf`).
        batch: sequences per step (per GPU).
        seq: tokens per sequence.
        checkpointing: ``none`` | ``full`` | ``every_n_layers`` | ``offload``.
        every_n_layers: with ``every_n_layers``, one layer in ``n`` is checkpointed.
        lora_r: adapter rank, on every linear layer of the decoder (``all-linear``); unused with ``weights``.
        quantized: 4-bit base (else 16-bit LoRA); unused with ``weights``.
        blocksize: 4-bit block size; unused with ``weights``.
        double_quant: 8-bit block constants; unused with ``weights``.
        dtype_bytes: bytes of the compute dtype.
        loss_chunk: tokens per chunk of the output head + cross-entropy (0: one chunk).
        optimizer_states: fp32 tensors the optimizer keeps per adapter weight (AdamW: 2; 8-bit AdamW: 0.5).
        compiled: decoder blocks run under ``torch.compile``, which keeps fewer intermediates
            (:data:`COMPILED_KEEP` of eager's, measured).
        weights: the model's weights as counted (:func:`count_weights`); default
            :meth:`Weights.from_shapes` with the four settings above.
        devices: GPUs the run trains on (ranks, all nodes together).
        strategy: ``ddp`` (each GPU holds the whole model) or ``fsdp`` (the weights, adapters and optimizer
            state are sharded over ``devices``; the quantization constants are not).
        gathered_layers: under FSDP, decoder layers whole at once besides the root unit (all of them when
            FSDP keeps them from the forward to the backward, or shards the model as one unit).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not supported; use one of {STRATEGIES}")
    if weights is None:
        weights = Weights.from_shapes(shapes, lora_r, quantized, blocksize, double_quant, dtype_bytes)
    tokens = batch * seq
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
    dequantized = weights.largest_quantized * dtype_bytes
    grad_stream = 2 * tokens * shapes.hidden * dtype_bytes
    chunk = min(loss_chunk or tokens, tokens)
    # logits in the compute dtype, their fp32 copy, and logsumexp's fp32 temporary
    loss = chunk * shapes.vocab * (8 + dtype_bytes) + tokens * shapes.hidden * dtype_bytes * 2
    adapters = weights.adapters * 4 * (2 + optimizer_states)  # fp32 weight, gradient, optimizer state
    sharded = strategy == "fsdp" and devices > 1
    share = 1 / devices if sharded else 1.0
    if strategy == "ddp" and devices > 1:
        adapters += weights.adapters * 4  # DDP's bucket: a second copy of the gradients to all-reduce
    dense = weights.dense
    if strategy == "fsdp" and shapes.tied:  # FSDP2Strategy gives a tied head a copy of its own (shard_model)
        dense += shapes.vocab * shapes.hidden * dtype_bytes
    parts = {
        PACKED: weights.packed * share,
        CONSTANTS: weights.constants,  # each layer keeps its own whole, on every GPU
        LINEAR16: weights.linear16 * share,
        DENSE: dense * share,
        ADAPTERS: adapters * share,
    }
    if sharded:
        gathered = min(gathered_layers, weights.layers) * weights.layer_bytes()
        parts[GATHERED] = (weights.root + gathered) * (1 - share)
    parts[ACTIVATIONS] = kept
    layer_pass = recompute + dequantized + grad_stream
    # Saving under FSDP gathers every adapter whole at once (sharding.gathered_adapters), between steps.
    saving = weights.adapters * 4 * (1 - share) if sharded else 0.0
    parts[TRANSIENT] = max(layer_pass, loss, saving)
    parts = {k: v for k, v in parts.items() if v or k in (ACTIVATIONS, TRANSIENT)}
    if saving > max(layer_pass, loss):
        transient = "the adapters gathered for saving"
    elif loss >= layer_pass:
        transient = f"loss over {chunk} tokens"
    else:
        transient = "one layer's recompute" if recompute else "one layer's backward"
    return Estimate(parts, checkpointing, every_n_layers, transient)


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


def over_budget(peak_bytes: int, budget_gib: float, estimate: Estimate | None = None) -> str | None:
    """The warning for a measured peak above ``model.max_memory_gib``, or None when it fits.

    The budget chose a setting from an estimate; a step that measured more means the estimate missed (a
    torch release that saves more than it models, say), and the user should hear it before the card does.
    """
    if peak_bytes <= budget_gib * GIB:
        return None
    told = f" (estimated {estimate.total / GIB:.2f} GiB for {estimate.mode})" if estimate is not None else ""
    return (
        f"warning: the first step's peak GPU memory is {peak_bytes / GIB:.2f} GiB, over "
        f"model.max_memory_gib={budget_gib:g}{told}; lower data.batch_size or set "
        "model.activation_checkpointing=full or offload"
    )
