"""How each decoder block runs: activation checkpointing, torch.compile, and which of the two wraps the other.

transformers checkpoints a layer's ``__call__`` in 5.17 (outside a compiled block) and its ``forward`` in
5.24 (inside): the same run recomputed whole blocks on one release and let the compiler choose on the other,
and ``offload``'s host copies broke each compiled block's graph on 5.24 (dynamo does not trace
``save_on_cpu``). So this module owns both: transformers' own checkpointing flag stays off, and each block's
``forward`` becomes one of

* recompute (``full``, ``every_n_layers``): the checkpoint inside the compiled forward, so the compiler's
  partitioner recomputes in the backward only what the backward reads (not the block's last matrix
  product, whose output only the next block reads);
* offload: the checkpoint and its host copies outside, the forward compiled inside;
* none: the forward, compiled or not.

Module hooks (FSDP2's gathers) run around ``forward``, outside both: a recompute never gathers again.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
    noop_context_fn,
)

from .anatomy import decoder_layers


@dataclass
class _Wiring:
    """How a block's ``forward`` is made: checkpointing, compiled or not, around its own forward."""

    own_forward: Callable[..., Any] | None  # an instance attribute set before this module wired the block
    checkpointing: str = "none"  # none | recompute | offload
    compiled: bool = False

    def forward(self, block: nn.Module) -> Callable[..., Any]:
        """The block's own forward: the instance attribute, else its class's, bound now (FSDP2 swaps the
        class; transformers 5.24's checkpointing wrapper, its flag off, calls the layer's forward as is)."""
        return self.own_forward or type(block).forward.__get__(block)


def _wiring(block: nn.Module) -> _Wiring:
    wiring = block.__dict__.get("_qlora_wiring")
    if wiring is None:
        wiring = block._qlora_wiring = _Wiring(block.__dict__.get("forward"))
    return wiring


# What a layer may be given as its KV cache: a recompute would append to it a second time.
_CACHE_KWARGS = ("past_key_values", "past_key_value", "cache", "layer_past")


def _recomputes(block: nn.Module) -> bool:
    """Checkpointing applies while training with gradients, as transformers' own does; else a plain call."""
    return block.training and torch.is_grad_enabled()


def _checkpointed(block: nn.Module, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``forward`` under non-reentrant checkpointing when :func:`_recomputes`, without a KV cache (as
    transformers: the recompute would update it twice)."""
    if not _recomputes(block):
        return forward(*args, **kwargs)
    if kwargs.get("use_cache") or any(kwargs.get(key) is not None for key in _CACHE_KWARGS):
        warnings.warn(
            "lightning-qlora: activation checkpointing runs the decoder layers without a KV cache "
            "(use_cache=False); pass use_cache=False while training",
            stacklevel=2,
        )
        kwargs = {**kwargs, "use_cache": False, **{key: None for key in _CACHE_KWARGS if key in kwargs}}
    # The keywords bound first, so none of them is taken for one of checkpoint's own.
    context = _recompute_all if torch.compiler.is_compiling() else noop_context_fn
    return checkpoint(partial(forward, **kwargs), *args, use_reentrant=False, context_fn=context)


def _must_recompute(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    # Called per op while the compiler traces the block (not per step). Selective checkpointing under
    # torch.compile does not support in-place ops (torch's caution, filtered below for being unspecific):
    # the 4-bit and 16-bit LoRA blocks of transformers' layers have none (test_blocks), a user's may.
    # Python's default warning filter shows each op's message once.
    if op._schema.is_mutable:
        warnings.warn(
            f"lightning-qlora: a compiled, checkpointed decoder block runs the in-place op {op}, which torch "
            "may recompute wrongly there; set model.compile=false or model.activation_checkpointing=offload",
            stacklevel=2,
        )
    return CheckpointPolicy.MUST_RECOMPUTE


def _recompute_all() -> tuple[Any, Any]:
    """A traced checkpoint's policy: every op recomputed, the 4-bit layers' autograd functions too.

    A plain checkpoint only marks its ops as preferred for recompute, and torch 2.11's partitioner did not
    carry the mark into an autograd function's graph: it saved every adapted layer's input and low-rank
    product (7B at 4 x 2048: a peak of 26.1 GiB for full checkpointing; 7.84 with this policy). Ops whose
    outputs the backward never reads (the block's last matrix product) are still not recomputed.
    """
    return create_selective_checkpoint_contexts(_must_recompute)


class _WithoutTorchsContextFnCaution(logging.Filter):
    """Drops torch's one-time caution about ``context_fn`` under torch.compile: :func:`_must_recompute` names
    the in-place op it is about when a block has one, and says nothing when none has."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "context_fn is passed to torch.utils.checkpoint" not in record.getMessage()


logging.getLogger("torch._higher_order_ops.wrap").addFilter(_WithoutTorchsContextFnCaution())


def _offloaded(block: nn.Module, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """:func:`_checkpointed` with what it saves (the block's input) held in pinned host memory."""
    if not _recomputes(block):
        return forward(*args, **kwargs)
    with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
        return _checkpointed(block, forward, *args, **kwargs)


def _wire(block: nn.Module) -> None:
    w = _wiring(block)
    forward = w.forward(block)
    if w.checkpointing == "recompute":
        eager = partial(_checkpointed, block, forward)
        compiled = torch.compile(eager) if w.compiled else None
    elif w.checkpointing == "offload":
        eager = partial(_offloaded, block, forward)
        compiled = partial(_offloaded, block, torch.compile(forward)) if w.compiled else None
    else:
        eager = forward
        compiled = torch.compile(forward) if w.compiled else None
    if compiled is not None:
        block.forward = partial(_compiled_unless_cached, block, compiled, eager)
    elif w.checkpointing != "none" or w.own_forward is not None:
        block.forward = eager
    else:  # the class's own again: no instance attribute (nor a reference cycle through one)
        block.__dict__.pop("forward", None)


def _compiled_unless_cached(
    block: nn.Module, compiled: Callable[..., Any], eager: Callable[..., Any], *args: Any, **kwargs: Any
) -> Any:
    """A compiled block's forward, eager where it is given a KV cache outside training (generation): there
    each layer (its cache index is guarded) and each decode length is a graph of its own, and the samples
    before training filled dynamo's per-function limit (4-layer default: 8 compiles, 31 s on CPU), after
    which the training step ran uncompiled."""
    cached = not _recomputes(block) and any(kwargs.get(key) is not None for key in _CACHE_KWARGS)
    return (eager if cached else compiled)(*args, **kwargs)


def block_checkpointing(block: nn.Module) -> str:
    """``none``, ``recompute`` or ``offload``: what :func:`set_activation_checkpointing` set for a block."""
    return _wiring(block).checkpointing


def set_activation_checkpointing(model: nn.Module, mode: str, every_n: int = 1) -> None:
    """Turns non-reentrant activation checkpointing on for the decoder layers ``mode`` selects.

    ``full`` and ``offload``: every layer; ``every_n_layers``: layers 0, n, 2n, ...; ``none``: no layer.
    Set per layer here (rather than through transformers' own arguments, which differ across releases), so
    they work alike on every transformers 4.52+, compiled or not.

    Raises:
        ValueError: a mode other than ``none`` for a model without decoder layers transformers can checkpoint.
    """
    layers = decoder_layers(model)
    if mode != "none" and not layers:
        raise ValueError(
            f"activation_checkpointing={mode!r}: {type(model).__name__} has no decoder layers to checkpoint "
            "(transformers' GradientCheckpointingLayer); use activation_checkpointing=none"
        )
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = False  # transformers' own: this module checkpoints instead
        on = mode in ("full", "offload") or (mode == "every_n_layers" and index % max(every_n, 1) == 0)
        _wiring(layer).checkpointing = ("offload" if mode == "offload" else "recompute") if on else "none"
        _wire(layer)


def compile_blocks(model: nn.Module) -> int:
    """``torch.compile`` every decoder layer (:func:`~lightning_qlora.anatomy.decoder_layers`; for a model
    without them, every block of its largest ``nn.ModuleList``).

    Compiling block by block keeps compile time to one block's graph, reused for all of them, with the
    4-bit layers traced into it (``nf4_matmul.dequantize_traced``: whole-block weights call no
    bitsandbytes). Only ``forward`` compiles: module hooks (FSDP2's gathers and reshards, as torchtitan
    compiles blocks) stay outside the graph, so dynamo never traces the collectives.

    Returns:
        How many blocks were compiled.
    """
    blocks = decoder_layers(model)  # the blocks checkpointing wires: one wiring per block
    if not blocks:  # a model of the user's own: its largest list of blocks
        lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
        if not lists:
            return 0
        blocks = list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters())))
    import torch._dynamo

    # The blocks differ only in constants like layer_idx; each may get its own guard entry.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 2 * len(blocks))
    torch._dynamo.config.accumulated_cache_size_limit = max(
        torch._dynamo.config.accumulated_cache_size_limit, 4 * len(blocks)
    )
    for block in blocks:
        _wiring(block).compiled = True
        _wire(block)
    return len(blocks)


def graph_breaks() -> tuple[int, str | None]:
    """How many graph breaks torch.compile has had in this process, and the first one's reason (one line)."""
    from torch._dynamo.utils import counters

    breaks = counters["graph_break"]
    return sum(breaks.values()), _first_reason(breaks)


def uncompiled_calls() -> tuple[int, str | None]:
    """How many times torch.compile gave up on a function in this process and ran it eagerly (its per-function
    recompile limit reached, or an error it falls back from), and the first reason (one line)."""
    from torch._dynamo.utils import counters

    frames = counters["frames"]
    return frames["total"] - frames["ok"], _first_reason(counters["unimplemented"])


def _first_reason(reasons: Any) -> str | None:
    """The first line of the first of dynamo's counted reasons, or None."""
    first = next(iter(reasons), None)
    return None if first is None else str(first).strip().splitlines()[0]
