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

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .anatomy import decoder_layers


@dataclass
class _Wiring:
    """What a block's ``forward`` is made of: its own forward, checkpointing, compiled or not."""

    forward: Callable[..., Any]
    checkpointing: str = "none"  # none | recompute | offload
    compiled: bool = False


def _wiring(block: nn.Module) -> _Wiring:
    wiring = block.__dict__.get("_qlora_wiring")
    if wiring is None:
        # The block's own forward: an instance attribute someone set, else its class's (transformers 5.24's
        # checkpointing wrapper included: with its flag off, it calls the layer's forward as is).
        own = block.__dict__.get("forward") or type(block).forward.__get__(block)
        wiring = block._qlora_wiring = _Wiring(own)
    return wiring


def _checkpointed(block: nn.Module, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``forward`` under non-reentrant checkpointing while training with gradients (as transformers does)."""
    if block.training and torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def _offloaded(block: nn.Module, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """:func:`_checkpointed` with what it saves (the block's input) held in pinned host memory."""
    with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
        return _checkpointed(block, forward, *args, **kwargs)


def _wire(block: nn.Module) -> None:
    w = _wiring(block)
    if w.checkpointing == "recompute":
        run = partial(_checkpointed, block, w.forward)
        block.forward = torch.compile(run) if w.compiled else run
    elif w.checkpointing == "offload":
        block.forward = partial(_offloaded, block, torch.compile(w.forward) if w.compiled else w.forward)
    else:
        block.forward = torch.compile(w.forward) if w.compiled else w.forward


def block_checkpointing(block: nn.Module) -> str:
    """``none``, ``recompute`` or ``offload``: what :func:`set_activation_checkpointing` set for a block."""
    return _wiring(block).checkpointing


def set_activation_checkpointing(model: nn.Module, mode: str, every_n: int = 1) -> None:
    """Turns non-reentrant activation checkpointing on for the decoder layers ``mode`` selects.

    ``full`` and ``offload``: every layer; ``every_n_layers``: layers 0, n, 2n, ...; ``none``: no layer.
    Set per layer here (rather than through transformers' own arguments, which differ across releases), so
    they work on every transformers 4.46+, compiled or not.
    """
    for index, layer in enumerate(decoder_layers(model)):
        layer.gradient_checkpointing = False  # transformers' own: this module checkpoints instead
        on = mode in ("full", "offload") or (mode == "every_n_layers" and index % max(every_n, 1) == 0)
        _wiring(layer).checkpointing = ("offload" if mode == "offload" else "recompute") if on else "none"
        _wire(layer)


def compile_blocks(model: nn.Module) -> int:
    """``torch.compile`` every block of the model's largest ``nn.ModuleList`` (its decoder layers).

    Compiling block by block keeps compile time to one block's graph, reused for all of them, with the
    4-bit layers traced into it (``nf4_matmul.dequantize_traced``: whole-block weights call no
    bitsandbytes). Only ``forward`` compiles: module hooks (FSDP2's gathers and reshards, as torchtitan
    compiles blocks) stay outside the graph, so dynamo never traces the collectives.

    Returns:
        How many blocks were compiled.
    """
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        return 0
    blocks = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
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
    first = next(iter(breaks), None)
    return sum(breaks.values()), None if first is None else str(first).strip().splitlines()[0]
