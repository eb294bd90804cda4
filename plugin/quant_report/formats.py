"""The 4-bit formats: their codebooks, quantizers and the checks on formats and block sizes.

Each quantizer returns what it would store (the packed codes, the per-block constants, any
fixed tables) and the values decoded back from those stored tensors alone, so the measured
error and the measured bytes describe the same stored form. The bitsandbytes formats call the
real ``bitsandbytes.functional.quantize_4bit`` / ``dequantize_4bit``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

# The block sizes bitsandbytes 0.50.2 accepts for 4-bit quantization (measured on CPU);
# 16 and 8192 raise a bare "invalid blocksize" deep inside, so we check up-front.
BNB_BLOCKSIZES: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DEFAULT_BLOCKSIZES: tuple[int, ...] = (32, 64, 128, 256)

FORMATS: dict[str, str] = {
    "int4_minmax": "int4 min-max",
    "int4_absmax": "int4 absmax",
    "fp4": "fp4 (bnb)",
    "fp4_dq": "fp4 + dq (bnb)",
    "nf4": "nf4 (bnb)",
    "nf4_dq": "nf4 + dq (bnb)",
    "std_quantile": "std-normalised quantiles",
}
DEFAULT_FORMATS: tuple[str, ...] = (
    "int4_minmax",
    "int4_absmax",
    "fp4",
    "fp4_dq",
    "nf4",
    "nf4_dq",
    "std_quantile",
)


# --------------------------------------------------------------------------------------------
# Codebooks
# --------------------------------------------------------------------------------------------


def _normal_icdf(p: torch.Tensor) -> torch.Tensor:
    """Inverse CDF of N(0, 1) in float64 (scipy may not be installed; torch's is exact enough)."""
    p = p.to(torch.float64)
    return torch.distributions.Normal(torch.zeros((), dtype=torch.float64), 1.0).icdf(p)


def nf4_offset() -> float:
    """The outermost quantile used for NF4, as in the QLoRA paper.

    A symmetric 16-level quantile grid would place its extremes at ``1 - 1/(2*16)``; NF4 has 8
    positive and 7 negative levels, whose grids end at ``1 - 1/(2*15)`` and ``1 - 1/(2*16)``.
    bitsandbytes uses their mean, 0.9677083.

    Returns:
        The offset, 0.96770833...
    """
    return ((1 - 1 / (2 * 15)) + (1 - 1 / (2 * 16))) / 2


def derive_nf4_codebook(offset: float | None = None) -> torch.Tensor:
    """Derive the NF4 code from the normal quantiles (bitsandbytes ``create_normal_map``).

    8 positive levels at the quantiles ``linspace(offset, 0.5, 9)[:-1]``, 7 negative levels
    mirrored from ``linspace(offset, 0.5, 8)[:-1]``, and an exact 0; sorted and divided by the
    largest so the code spans [-1, 1] and a block normalised by its absmax maps onto it.

    Args:
        offset: outermost quantile; defaults to :func:`nf4_offset`.

    Returns:
        The 16 levels, ascending, float32 (index = the 4-bit code).
    """
    offset = nf4_offset() if offset is None else offset
    pos = _normal_icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -_normal_icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (levels / levels.max()).to(torch.float32)


def bnb_codebook(quant_type: str = "nf4") -> torch.Tensor:
    """bitsandbytes' own 16-entry table for ``quant_type`` ("nf4" or "fp4"), float32 on CPU."""
    import bitsandbytes.functional as bnbf

    return bnbf.get_4bit_type(quant_type, device="cpu").to(torch.float32)


def std_quantile_levels() -> torch.Tensor:
    """The textbook shortcut's 16 levels: N(0, 1) quantiles at ``(i + 0.5) / 16``, float32."""
    return _normal_icdf((torch.arange(16, dtype=torch.float64) + 0.5) / 16).to(torch.float32)


# --------------------------------------------------------------------------------------------
# Quantizers: each returns what it would store, and the values it decodes back from that
# --------------------------------------------------------------------------------------------


@dataclass
class Quantized:
    """The stored form of one quantized tensor and its decoded values.

    Attributes:
        dequantized: the values decoded from the stored tensors, flat, float32.
        block_tensors: stored tensors whose size grows with the number of weights.
        table_tensors: stored tensors of fixed size (code tables, offsets).
    """

    dequantized: torch.Tensor
    block_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    table_tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def block_bytes(self) -> int:
        """Bytes of the tensors that scale with the weight count."""
        return sum(t.numel() * t.element_size() for t in self.block_tensors.values())

    @property
    def table_bytes(self) -> int:
        """Bytes of the fixed-size tables stored with this tensor."""
        return sum(t.numel() * t.element_size() for t in self.table_tensors.values())


def validate_blocksizes(blocksizes: Iterable[int]) -> tuple[int, ...]:
    """Check block sizes against what bitsandbytes' 4-bit kernels accept.

    Args:
        blocksizes: the requested block sizes.

    Returns:
        The block sizes, deduplicated, ascending.

    Raises:
        ValueError: naming the bad value and the allowed ones.
    """
    out = sorted({int(b) for b in blocksizes})
    if not out:
        raise ValueError(f"no block size given; choose from {', '.join(map(str, BNB_BLOCKSIZES))}")
    bad = [b for b in out if b not in BNB_BLOCKSIZES]
    if bad:
        raise ValueError(
            f"block size {', '.join(map(str, bad))} is not supported by bitsandbytes 4-bit "
            f"quantization; choose from {', '.join(map(str, BNB_BLOCKSIZES))}"
        )
    return tuple(out)


def validate_formats(formats: Iterable[str]) -> tuple[str, ...]:
    """Check format keys against :data:`FORMATS`.

    Args:
        formats: the requested format keys.

    Returns:
        The formats, deduplicated, in the order given.

    Raises:
        ValueError: naming the unknown keys and the known ones.
    """
    out = tuple(dict.fromkeys(formats))
    bad = [f for f in out if f not in FORMATS]
    if bad or not out:
        raise ValueError(f"unknown format {', '.join(bad) or '(none)'}; choose from {', '.join(FORMATS)}")
    return out


def _blocks(x: torch.Tensor, blocksize: int) -> list[torch.Tensor]:
    """Split a flat tensor into 2-D views of whole blocks and, if any, the shorter last block.

    The tail is kept as its own block (as bitsandbytes does) rather than padded: padding would
    shift the tail's mean and standard deviation.
    """
    n_full = x.numel() // blocksize
    parts = []
    if n_full:
        parts.append(x[: n_full * blocksize].view(n_full, blocksize))
    if x.numel() % blocksize:
        parts.append(x[n_full * blocksize :].view(1, -1))
    return parts


def _pack4(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes (values 0..15) two to a byte, as the stored form would be."""
    c = codes.reshape(-1).to(torch.uint8)
    if c.numel() % 2:
        c = torch.cat([c, c.new_zeros(1)])
    return (c[0::2] << 4) | c[1::2]


def _unpack4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    return torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:numel].to(torch.int64)


def _quantize_int4_minmax(x: torch.Tensor, blocksize: int) -> Quantized:
    codes, lows, scales = [], [], []
    for b in _blocks(x, blocksize):
        lo, hi = b.amin(1, keepdim=True), b.amax(1, keepdim=True)
        # A constant block has zero range; any positive scale then decodes it exactly to lo.
        scale = torch.where(hi > lo, (hi - lo) / 15, torch.ones_like(lo))
        codes.append(((b - lo) / scale).round().clamp(0, 15).reshape(-1))
        lows.append(lo.reshape(-1))
        scales.append(scale.reshape(-1))
    lo, scale = torch.cat(lows), torch.cat(scales)
    packed = _pack4(torch.cat(codes))
    # Decode from the stored bytes only, so the error matches what the storage can hold.
    q = _unpack4(packed, x.numel()).to(torch.float32)
    per_block = torch.arange(x.numel(), device=x.device) // blocksize
    deq = q * scale[per_block] + lo[per_block]
    return Quantized(deq, {"packed": packed, "min": lo, "scale": scale})


def _quantize_int4_absmax(x: torch.Tensor, blocksize: int) -> Quantized:
    # Symmetric levels -7..7 (code 8 = 0): zero stays exact and the block's absmax is hit
    # exactly; the 16th code is unused, the usual price of a symmetric absmax int4.
    codes, absmaxes = [], []
    for b in _blocks(x, blocksize):
        am = b.abs().amax(1, keepdim=True)
        scale = torch.where(am > 0, am / 7, torch.ones_like(am))
        codes.append(((b / scale).round().clamp(-7, 7) + 8).reshape(-1))
        absmaxes.append(am.reshape(-1))
    absmax = torch.cat(absmaxes)
    packed = _pack4(torch.cat(codes))
    q = _unpack4(packed, x.numel()).to(torch.float32) - 8
    deq = q * (absmax / 7)[torch.arange(x.numel(), device=x.device) // blocksize]
    return Quantized(deq, {"packed": packed, "absmax": absmax})


def _quantize_std_quantile(x: torch.Tensor, blocksize: int) -> Quantized:
    levels = std_quantile_levels().to(x.device)
    edges = (levels[1:] + levels[:-1]) / 2
    codes, means, stds = [], [], []
    for b in _blocks(x, blocksize):
        mu = b.mean(1, keepdim=True)
        # Sample std (correction 1), the textbook choice; a 1-element block has none (nan) and a
        # constant block has 0: both decode to the mean exactly with std = 0.
        sd = torch.nan_to_num(b.std(1, keepdim=True), nan=0.0)
        z = (b - mu) / torch.where(sd > 0, sd, torch.ones_like(sd))
        codes.append(torch.bucketize(z, edges).reshape(-1))
        means.append(mu.reshape(-1))
        stds.append(sd.reshape(-1))
    mean, std = torch.cat(means), torch.cat(stds)
    packed = _pack4(torch.cat(codes))
    per_block = torch.arange(x.numel(), device=x.device) // blocksize
    deq = levels[_unpack4(packed, x.numel())] * std[per_block] + mean[per_block]
    return Quantized(deq, {"packed": packed, "mean": mean, "std": std}, {"levels": levels})


def _quantize_bnb(x: torch.Tensor, blocksize: int, quant_type: str, double_quant: bool) -> Quantized:
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(
        x, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
    )
    deq = bnbf.dequantize_4bit(packed, state).reshape(-1).to(torch.float32)
    block = {"packed": packed, "absmax": state.absmax}
    tables = {"code": state.code}
    if state.nested:
        block["nested_absmax"] = state.state2.absmax
        tables["nested_code"] = state.state2.code
        tables["offset"] = torch.as_tensor(state.offset)
    return Quantized(deq, block, tables)


def quantize(
    x: torch.Tensor, fmt: str, blocksize: int, device: torch.device | str | None = None
) -> Quantized:
    """Quantize a tensor block-wise in one format and decode it back.

    The tensor is treated as one flat stream of weights: blocks run across rows, as they do in
    bitsandbytes' storage. We also *must* flatten for bitsandbytes: 0.50.2 on CPU returns wrong
    values when a 2-D tensor is quantized with a block size (256..1024) larger than its last
    dimension, e.g. a (64, 128) weight at block 256, while the flattened tensor is correct.

    Args:
        x: any floating tensor; converted to float32 (exact for fp16/bf16 weights).
        fmt: one of :data:`FORMATS`.
        blocksize: one of :data:`BNB_BLOCKSIZES`.
        device: where to quantize (default the CPU). The quality study passes the model's device:
            quantizing 100M weights in 12 configurations on a CPU takes minutes, on a GPU seconds.

    Returns:
        The stored tensors and the decoded values (on ``device``).

    Raises:
        ValueError: for an unknown format or unsupported block size.
    """
    validate_blocksizes([blocksize])
    validate_formats([fmt])
    flat = x.detach().to("cpu" if device is None else device, torch.float32).reshape(-1).contiguous()
    if fmt == "int4_minmax":
        return _quantize_int4_minmax(flat, blocksize)
    if fmt == "int4_absmax":
        return _quantize_int4_absmax(flat, blocksize)
    if fmt == "std_quantile":
        return _quantize_std_quantile(flat, blocksize)
    quant_type, _, dq = fmt.partition("_")
    return _quantize_bnb(flat, blocksize, quant_type, double_quant=dq == "dq")
