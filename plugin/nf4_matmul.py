"""The 4-bit matmul: ``x @ W.T`` for a frozen bitsandbytes 4-bit ``W``, in the three forms a step runs.

* Eager: :class:`EagerMatmul4bit` (and the adapter's fused function in :mod:`.lora`) dequantize with
  bitsandbytes (:func:`dequantize`), once in the forward and once in the backward, saving nothing but a
  reference to the packed weight.
* Under torch.compile: :class:`TracedMatmul4bit` (and :mod:`.lora`'s ``_PackedLinearWithLoRA``)
  dequantize with :func:`dequantize_traced`, the same arithmetic in plain torch ops, which the compiler
  fuses into one kernel: no bitsandbytes call in a compiled step.
* Under torch.compile, a weight :func:`traceable` refuses (a last block cut short): the opaque op
  :func:`dequantize_matmul`, over bitsandbytes' own ops on plain tensors (:func:`dequantize_packed`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import torch
from torch import Tensor


class EagerMatmul4bit(torch.autograd.Function):
    """``x @ dequantize(W).T`` for a frozen 4-bit ``W`` (a ``Params4bit``), in eager mode.

    The base weight gets no gradient, so the backward needs neither ``x`` nor the dequantized
    weight: it dequantizes once more and returns ``grad @ W``. Saving nothing keeps activation
    memory at what a frozen 16-bit layer would cost.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: bnb.nn.Params4bit) -> Tensor:
        ctx.weight = weight
        return x @ dequantize(weight).to(x.dtype).t()

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, None]:
        grad = None
        if ctx.needs_input_grad[0]:
            grad = grad_output @ dequantize(ctx.weight).to(grad_output.dtype)
        return grad, None


def packed_weight(weight: bnb.nn.Params4bit) -> tuple[tuple, tuple[Tensor, ...]]:
    """A quantized weight as plain tensors plus a tuple of constants, for :func:`dequantize_packed`.

    The tensors are the packed data and the ones the ``QuantState`` holds (no copies).
    """
    spec, constants = quant_constants(weight.quant_state)
    return spec, (weight.data, *constants)


def quant_constants(qs: bnbF.QuantState) -> tuple[tuple, tuple[Tensor, ...]]:
    """A ``QuantState`` as the constants and tensors :func:`dequantize_packed` takes after the packed data."""
    tensors: tuple[Tensor, ...] = (qs.absmax,)
    nested = (0, torch.float32)
    if qs.nested:
        tensors += (qs.state2.absmax, qs.state2.code, qs.offset)
        nested = (qs.state2.blocksize, qs.state2.dtype)
    return (qs.blocksize, qs.quant_type, tuple(qs.shape), qs.dtype, *nested), tensors


def dequantize_packed(spec: tuple, tensors: Sequence[Tensor]) -> Tensor:
    """What :func:`dequantize` computes, through bitsandbytes' registered ops on plain tensors."""
    blocksize, quant_type, shape, dtype, nested_blocksize, nested_dtype = spec
    packed, absmax = tensors[:2]
    if len(tensors) > 2:
        nested_absmax, nested_code, offset = tensors[2:]
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(
            absmax, nested_absmax, nested_code, nested_blocksize, nested_dtype
        )
        absmax = (absmax + offset).float()
    return torch.ops.bitsandbytes.dequantize_4bit.default(
        packed, absmax, blocksize, quant_type, list(shape), dtype
    )


_CODE_TABLES: dict[tuple[str, torch.device], Tensor] = {}


def code_table(quant_type: str, device: torch.device) -> Tensor:
    """The 16 values a 4-bit code stands for (bitsandbytes' own table), cached per device."""
    key = (quant_type, device)
    if key not in _CODE_TABLES:
        _CODE_TABLES[key] = bnbF.get_4bit_type(quant_type, device="cpu").to(device)
    return _CODE_TABLES[key]


def traceable(spec: tuple, tensors: Sequence[Tensor]) -> bool:
    """Whether :func:`dequantize_traced` handles this weight: whole blocks, two codes per byte."""
    blocksize, quant_type, shape = spec[:3]
    n = math.prod(shape)
    packed = tensors[0]
    return (
        quant_type in ("nf4", "fp4")
        and n % blocksize == 0
        and packed.is_contiguous()
        and packed.numel() * packed.element_size() * 2 == n
    )


def dequantize_traced(
    spec: tuple, table: Tensor, tensors: Sequence[Tensor], backward: bool = False
) -> Tensor:
    """What :func:`dequantize_packed` computes, in plain torch ops: under torch.compile one fused kernel
    instead of two bitsandbytes calls (each a Python function, a device guard and a ctypes launch).

    Exactly bitsandbytes' arithmetic: a code's table value times its block's float32 absmax (with double
    quantization: the nested code's value times the nested absmax, plus the offset), rounded once to the
    compute dtype. Two codes per byte, the first in the high nibble. ``table``: the type's 16 values
    (:func:`code_table`, made before tracing).

    ``backward=True`` spells the same arithmetic with other ops. Spelled alike, the compiler's common
    subexpression elimination merges the backward's dequantization into the forward's, and the partitioner
    then saves the 16-bit weight for the backward instead of dequantizing again: a whole weight per layer,
    and every layer's without activation checkpointing (the first traced version did: 7B at batch 4 peaked
    at 7.73 GiB on an H200, where one opaque op of the same arithmetic peaked at 7.37).
    """
    blocksize, quant_type, shape, dtype, nested_blocksize, _nested_dtype = spec
    packed, absmax = tensors[:2]
    if len(tensors) > 2:
        nested_absmax, nested_code, offset = tensors[2:]
        # Each block of nested_blocksize codes shares one nested absmax: broadcast over the codes viewed as rows,
        # the last row padded when cut short. Indexing with arange(n) // nested_blocksize instead was miscompiled
        # by inductor (torch 2.13, CPU) whenever n was not a multiple: values past the last whole block unset.
        n = absmax.numel()
        codes = absmax.int()
        if n % nested_blocksize:
            codes = torch.nn.functional.pad(codes, (0, -n % nested_blocksize))
        rows = nested_code[codes].view(-1, nested_blocksize)
        absmax = (rows * nested_absmax.view(-1, 1) + offset).view(-1)[:n]
    codes = packed.view(torch.uint8).reshape(-1)
    if backward:
        high = torch.div(codes, 16, rounding_mode="floor")
        both = torch.stack((high, codes - high * 16), dim=-1).reshape(-1)
        values = torch.index_select(table, 0, both.long())
    else:
        both = torch.stack((codes >> 4, codes & 15), dim=-1).reshape(-1)
        values = table[both.int()]
    return (values.view(-1, blocksize) * absmax.float().view(-1, 1)).view(shape).to(dtype)


# Under torch.compile, a weight dequantize_traced does not take (a last block cut short) is this one opaque
# op. bitsandbytes' own ops must not be traced: traced, they gave wrong input gradients on CUDA (finite
# forward, gradient norms 1e5x eager's, then NaN; even with the aot_eager backend). dequantize_traced
# calls none of them.
@torch.library.custom_op("lightning_qlora::dequantize_matmul", mutates_args=())
def dequantize_matmul(
    x: Tensor,
    packed: list[Tensor],
    blocksize: int,
    quant_type: str,
    shape: list[int],
    dtype: torch.dtype,
    nested_blocksize: int,
    nested_dtype: torch.dtype,
    linear: bool,
) -> Tensor:
    """``x @ W.T`` (``linear=True``) or ``x @ W`` for the packed 4-bit ``W`` of :func:`packed_weight`."""
    weight = dequantize_packed((blocksize, quant_type, shape, dtype, nested_blocksize, nested_dtype), packed)
    weight = weight.to(x.dtype)
    return x @ (weight.t() if linear else weight)


@dequantize_matmul.register_fake
def _(x, packed, blocksize, quant_type, shape, dtype, nested_blocksize, nested_dtype, linear):
    return x.new_empty(*x.shape[:-1], shape[0] if linear else shape[1])


def _dequantize_matmul_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    ctx.save_for_backward(*inputs[1])
    ctx.spec = inputs[2:]


def _dequantize_matmul_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    *spec, linear = ctx.spec
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = dequantize_matmul(grad, list(ctx.saved_tensors), *spec, not linear)
    return grad_x, [None] * len(ctx.saved_tensors), *([None] * len(ctx.spec))


dequantize_matmul.register_autograd(_dequantize_matmul_backward, setup_context=_dequantize_matmul_setup)


class TracedMatmul4bit(torch.autograd.Function):
    """``x @ W.T`` for torch.compile to trace: ``W`` dequantized by :func:`dequantize_traced` in the forward and
    again in the backward (the backward's spelled apart, see there); only the packed bytes are saved."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, spec: tuple, table: Tensor, *packed: Tensor) -> Tensor:
        ctx.spec = spec
        ctx.save_for_backward(table, *packed)
        return x @ dequantize_traced(spec, table, packed).to(x.dtype).t()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        table, *packed = ctx.saved_tensors
        weight = dequantize_traced(ctx.spec, table, packed, backward=True).to(grad.dtype)
        return grad @ weight, None, None, *([None] * len(packed))


def weight_value(weight: Tensor) -> Tensor:
    """The 16-bit value of a frozen weight: a ``Params4bit`` dequantized, a dense tensor as is."""
    return dequantize(weight) if isinstance(weight, bnb.nn.Params4bit) else weight


def dequantize(weight: bnb.nn.Params4bit) -> Tensor:
    """The 16-bit weight (in the quantization's compute dtype) recovered by bitsandbytes."""
    return bnbF.dequantize_4bit(weight.data, weight.quant_state)
