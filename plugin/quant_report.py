"""The quantization report: what each 4-bit format costs, in error and in bits, on your weights.

``lightning-qlora-quant-report`` quantizes weights block-wise at several block sizes with

- uniform int4 with min-max scaling (two fp32 constants per block) and with absmax scaling
  (one fp32 constant per block, symmetric levels -7..7 so that 0 is exact);
- bitsandbytes FP4 and NF4, each with and without double quantization (the real
  ``bitsandbytes.functional.quantize_4bit`` / ``dequantize_4bit``, not re-implementations);
- the textbook shortcut that normalises each block by its mean and standard deviation and
  snaps to the 16 normal quantiles ``(i + 0.5) / 16`` (two fp32 constants per block),

on seeded standard-normal samples and, optionally, on the linear weights of a model, layer by
layer and in total. It reports MSE, MAE and max error, the storage cost in bits per weight
measured from the bytes the quantized tensors hold, a comparison at equal storage, and the NF4
codebook derived from the normal quantiles next to bitsandbytes' own table. Output: a markdown
table (stdout and ``report.md``), ``report.csv``, ``codebook.png`` and ``error_vs_bits.png``;
with ``--wandb`` the tables and figures are logged to a W&B run.

Storage accounting. Every format's quantized form is a set of tensors. Those whose size grows
with the number of weights (the packed 4-bit codes, one or two constants per block, the
nested constants of double quantization) are *block bytes*; ``bits_per_weight`` is
``8 * block_bytes / numel``, the cost on a large tensor (NF4 + double quant at 64: 4.127).
Those of fixed size (the 16-entry code table, the 256-entry table of the nested 8-bit
quantizer, its offset) are *table bytes*: bitsandbytes saves them with every quantized weight,
so ``bits_per_weight_with_tables`` adds them, spread over that tensor's own weights (and, for
a model total, every tensor's tables over all weights). Both come from ``numel * element_size``
of the actual tensors, not from formulas.

The weight source is pluggable: :func:`evaluate_weights` takes any iterable of
``(name, tensor)`` pairs, so a recipe's model can be passed through
:func:`linear_weights_from_module` (or a state dict through :func:`select_linear_weights`).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

__all__ = [
    "BNB_BLOCKSIZES",
    "DEFAULT_BLOCKSIZES",
    "FORMATS",
    "Measurement",
    "Quantized",
    "Report",
    "bnb_codebook",
    "build_report",
    "derive_nf4_codebook",
    "equal_storage",
    "evaluate_weights",
    "linear_weights_from_checkpoint",
    "linear_weights_from_module",
    "main",
    "measure",
    "model_from_config",
    "nf4_offset",
    "normal_samples",
    "quantize",
    "render_markdown",
    "select_linear_weights",
    "std_quantile_levels",
    "validate_blocksizes",
    "write_report",
]

# The block sizes bitsandbytes 0.50.2 accepts for 4-bit quantization (measured on CPU);
# 16 and 8192 raise a bare "invalid blocksize" deep inside, so we check up-front.
BNB_BLOCKSIZES: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DEFAULT_BLOCKSIZES: tuple[int, ...] = (32, 64, 128, 256)
# Same stream as ``torch.manual_seed(0); torch.randn(4096, 1024)``, the ANCHORS reference.
DEFAULT_SAMPLES = 4096 * 1024
DEFAULT_OUT = "outputs/quant_report"
# Nested (double) quantization in bitsandbytes quantizes the fp32 absmax in blocks of 256.
DQ_NESTED_BLOCKSIZE = 256
# A format may spend up to this many bits/weight more than the budget and still count as
# "equal storage" (NF4 + double quant at 64 costs 4.127 against 4.125 for absmax at 256).
EQUAL_STORAGE_TOLERANCE = 0.01

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

# Tensors that are 2-D but are not linear layers' weights: token/position embeddings and the
# output head (often tied to the embedding). They are left out unless asked for.
_EMBEDDING_RE = re.compile(
    r"(embed|(^|\.)(wte|wpe|lm_head|shared|output|embed_out|word_embeddings|position_embeddings)\.weight$)"
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


def _validate_formats(formats: Iterable[str]) -> tuple[str, ...]:
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
    per_block = torch.arange(x.numel()) // blocksize
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
    deq = q * (absmax / 7)[torch.arange(x.numel()) // blocksize]
    return Quantized(deq, {"packed": packed, "absmax": absmax})


def _quantize_std_quantile(x: torch.Tensor, blocksize: int) -> Quantized:
    levels = std_quantile_levels()
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
    per_block = torch.arange(x.numel()) // blocksize
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


def quantize(x: torch.Tensor, fmt: str, blocksize: int) -> Quantized:
    """Quantize a tensor block-wise in one format and decode it back.

    The tensor is treated as one flat stream of weights: blocks run across rows, as they do in
    bitsandbytes' storage. We also *must* flatten for bitsandbytes: 0.50.2 on CPU returns wrong
    values when a 2-D tensor is quantized with a block size (256..1024) larger than its last
    dimension, e.g. a (64, 128) weight at block 256, while the flattened tensor is correct.

    Args:
        x: any floating tensor; converted to float32 (exact for fp16/bf16 weights).
        fmt: one of :data:`FORMATS`.
        blocksize: one of :data:`BNB_BLOCKSIZES`.

    Returns:
        The stored tensors and the decoded values.

    Raises:
        ValueError: for an unknown format or unsupported block size.
    """
    validate_blocksizes([blocksize])
    _validate_formats([fmt])
    flat = x.detach().to("cpu", torch.float32).reshape(-1).contiguous()
    if fmt == "int4_minmax":
        return _quantize_int4_minmax(flat, blocksize)
    if fmt == "int4_absmax":
        return _quantize_int4_absmax(flat, blocksize)
    if fmt == "std_quantile":
        return _quantize_std_quantile(flat, blocksize)
    quant_type, _, dq = fmt.partition("_")
    return _quantize_bnb(flat, blocksize, quant_type, double_quant=dq == "dq")


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------


@dataclass
class Measurement:
    """Error and storage of one format at one block size on one tensor (or a sum of tensors).

    Sums are kept (not means) so that per-layer measurements add up exactly to a model total.
    """

    source: str
    tensor: str
    fmt: str
    blocksize: int
    numel: int
    sse: float
    sae: float
    max_err: float
    sum_sq: float
    block_bytes: int
    table_bytes: int
    n_tensors: int = 1

    @property
    def mse(self) -> float:
        """Mean squared error."""
        return self.sse / self.numel

    @property
    def mae(self) -> float:
        """Mean absolute error."""
        return self.sae / self.numel

    @property
    def rel_mse(self) -> float:
        """MSE divided by the mean square of the weights (comparable across layers)."""
        return self.sse / self.sum_sq if self.sum_sq > 0 else float("nan")

    @property
    def bits_per_weight(self) -> float:
        """8 * bytes that scale with the weight count / weights."""
        return 8 * self.block_bytes / self.numel

    @property
    def bits_per_weight_with_tables(self) -> float:
        """As :attr:`bits_per_weight`, plus each tensor's fixed tables spread over its weights."""
        return 8 * (self.block_bytes + self.table_bytes) / self.numel

    def merge(self, other: Measurement, tensor: str = "(total)") -> Measurement:
        """Add another tensor's measurement of the same format and block size."""
        return replace(
            self,
            tensor=tensor,
            numel=self.numel + other.numel,
            sse=self.sse + other.sse,
            sae=self.sae + other.sae,
            max_err=max(self.max_err, other.max_err),
            sum_sq=self.sum_sq + other.sum_sq,
            block_bytes=self.block_bytes + other.block_bytes,
            table_bytes=self.table_bytes + other.table_bytes,
            n_tensors=self.n_tensors + other.n_tensors,
        )

    def as_row(self) -> dict[str, object]:
        """A flat dict for CSV and W&B tables."""
        return {
            "source": self.source,
            "tensor": self.tensor,
            "format": self.fmt,
            "blocksize": self.blocksize,
            "numel": self.numel,
            "mse": self.mse,
            "mae": self.mae,
            "max_err": self.max_err,
            "rel_mse": self.rel_mse,
            "block_bytes": self.block_bytes,
            "table_bytes": self.table_bytes,
            "bits_per_weight": self.bits_per_weight,
            "bits_per_weight_with_tables": self.bits_per_weight_with_tables,
        }


def measure(
    x: torch.Tensor, fmt: str, blocksize: int, source: str = "tensor", tensor: str = "tensor"
) -> Measurement:
    """Quantize ``x`` and measure the error and the bytes of what is stored.

    Args:
        x: the original values (any shape; treated as a flat stream).
        fmt: one of :data:`FORMATS`.
        blocksize: one of :data:`BNB_BLOCKSIZES`.
        source: label of where the tensor comes from (for the report).
        tensor: label of the tensor (for the report).

    Returns:
        The measurement.
    """
    ref = x.detach().to("cpu", torch.float32).reshape(-1)
    q = quantize(ref, fmt, blocksize)
    # Sums in float64: on millions of weights float32 accumulation drifts in the 4th digit.
    err = (q.dequantized - ref).to(torch.float64)
    return Measurement(
        source=source,
        tensor=tensor,
        fmt=fmt,
        blocksize=blocksize,
        numel=ref.numel(),
        sse=float(err.square().sum()),
        sae=float(err.abs().sum()),
        max_err=float(err.abs().max()) if err.numel() else 0.0,
        sum_sq=float(ref.to(torch.float64).square().sum()),
        block_bytes=q.block_bytes,
        table_bytes=q.table_bytes,
    )


def evaluate_weights(
    named_weights: Iterable[tuple[str, torch.Tensor]],
    blocksizes: Sequence[int] = DEFAULT_BLOCKSIZES,
    formats: Sequence[str] = DEFAULT_FORMATS,
    source: str = "model",
) -> tuple[list[Measurement], list[Measurement]]:
    """Measure every format and block size on each weight, and in total.

    This is the hook for any weight source: a checkpoint (:func:`linear_weights_from_checkpoint`),
    a model or recipe's module (:func:`linear_weights_from_module`), or a state dict filtered
    by :func:`select_linear_weights`. Weights are consumed one at a time, so a generator keeps
    memory bounded by one tensor.

    Args:
        named_weights: ``(name, tensor)`` pairs.
        blocksizes: block sizes to compare.
        formats: format keys from :data:`FORMATS`.
        source: label for the report.

    Returns:
        ``(per_tensor, totals)``: one measurement per tensor, format and block size, and one per
        format and block size summed over all tensors.

    Raises:
        ValueError: bad block size or format, or no weights at all.
    """
    blocksizes = validate_blocksizes(blocksizes)
    formats = _validate_formats(formats)
    per_tensor: list[Measurement] = []
    totals: dict[tuple[str, int], Measurement] = {}
    for name, w in named_weights:
        for fmt in formats:
            for bs in blocksizes:
                m = measure(w, fmt, bs, source=source, tensor=name)
                per_tensor.append(m)
                key = (fmt, bs)
                totals[key] = totals[key].merge(m) if key in totals else replace(m, tensor="(total)")
    if not per_tensor:
        raise ValueError(f"no weights to measure from {source}")
    return per_tensor, list(totals.values())


def normal_samples(n: int = DEFAULT_SAMPLES, seed: int = 0) -> torch.Tensor:
    """``n`` standard-normal samples from a seeded generator (global RNG untouched)."""
    if n <= 0:
        raise ValueError(f"--samples must be positive, got {n}")
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# Weight sources
# --------------------------------------------------------------------------------------------


def _natural_key(name: str) -> list[object]:
    # layers.10 after layers.9, not after layers.1
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def is_linear_weight(name: str, tensor: torch.Tensor, include_embeddings: bool = False) -> bool:
    """Whether a state-dict entry looks like a linear layer's weight.

    2-D floating tensors named ``*.weight``; embeddings and the output head are excluded unless
    ``include_embeddings`` (they are usually kept in 16-bit).
    """
    if tensor.ndim != 2 or not tensor.is_floating_point() or not name.endswith("weight"):
        return False
    return include_embeddings or not _EMBEDDING_RE.search(name)


def select_linear_weights(
    named_tensors: Iterable[tuple[str, torch.Tensor]], include_embeddings: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """Filter ``(name, tensor)`` pairs (e.g. ``state_dict().items()``) to linear weights."""
    for name, t in named_tensors:
        if is_linear_weight(name, t, include_embeddings):
            yield name, t


def linear_weights_from_module(
    module: torch.nn.Module, include_embeddings: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """The weights of a module's ``nn.Linear`` layers (and transformers' ``Conv1D``).

    Args:
        module: any model, e.g. a recipe's instantiated model.
        include_embeddings: also yield the output head (embeddings are not linear layers).

    Yields:
        ``(parameter name, weight)``.
    """
    head = None
    get_out = getattr(module, "get_output_embeddings", None)
    if callable(get_out):
        head = get_out()
    for name, m in module.named_modules():
        is_linear = isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"
        if not is_linear or getattr(m, "weight", None) is None:
            continue
        if not include_embeddings and (m is head or name.split(".")[-1] == "lm_head"):
            continue
        yield f"{name}.weight", m.weight.detach()


def _safetensors_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path} is not a .safetensors file")
        return [path]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in dict.fromkeys(sorted(weight_map.values(), key=_natural_key))]
    return sorted(path.glob("*.safetensors"), key=lambda p: _natural_key(p.name))


def linear_weights_from_checkpoint(
    path: str | os.PathLike[str], include_embeddings: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream the linear weights of a transformers checkpoint, one tensor at a time.

    Reads ``*.safetensors`` (single file or sharded with ``model.safetensors.index.json``) with
    ``safetensors.safe_open``, so host memory stays bounded by one tensor.

    Args:
        path: a checkpoint directory or a ``.safetensors`` file.
        include_embeddings: also yield 2-D embeddings and the output head.

    Yields:
        ``(name, tensor)`` in natural order of names (layer 2 before layer 10).

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: no safetensors weights there, or none of them is a linear weight.
    """
    from safetensors import safe_open

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model path {p} does not exist (expected a checkpoint directory)")
    files = _safetensors_files(p)
    if not files:
        other = sorted(x.name for x in p.glob("*.bin")) + sorted(x.name for x in p.glob("*.pt"))
        hint = f" (found {', '.join(other)}: convert to safetensors with save_pretrained)" if other else ""
        raise ValueError(
            f"no weights in {p}: expected *.safetensors files (a transformers checkpoint saved with "
            f"save_pretrained, or a model.safetensors.index.json with its shards){hint}"
        )
    # Read the headers first and sort all names across shards, so layers come in order
    # (layers.2 before layers.10) even when one layer spans two shards.
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(f), framework="pt")) for f in files]
        where = {name: h for h in handles for name in h.keys()}
        found = 0
        for name in sorted(where, key=_natural_key):
            h = where[name]
            if len(h.get_slice(name).get_shape()) != 2:
                continue  # skip without reading the data
            t = h.get_tensor(name)
            if is_linear_weight(name, t, include_embeddings):
                found += 1
                yield name, t
    if not found:
        raise ValueError(f"no linear-layer weights (2-D *.weight tensors) in {', '.join(map(str, files))}")


TINY_LLAMA: dict[str, int] = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 1024,
}


def model_from_config(config: str | os.PathLike[str] | None = None, seed: int = 0) -> torch.nn.Module:
    """Build a causal LM with random weights from a transformers config, offline.

    Args:
        config: a ``config.json`` (or its directory); ``None`` builds a tiny Llama
            (:data:`TINY_LLAMA`).
        seed: seed for the random initialisation (global RNG restored afterwards).

    Returns:
        The model, in float32.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    if config is None:
        cfg = LlamaConfig(**TINY_LLAMA)
    else:
        p = Path(config)
        if not p.exists():
            raise FileNotFoundError(f"config {p} does not exist (expected a config.json or its directory)")
        cfg = AutoConfig.from_pretrained(str(p))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(cfg)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


@dataclass
class Report:
    """Everything the report shows; see :func:`build_report`."""

    blocksizes: tuple[int, ...]
    formats: tuple[str, ...]
    samples: int
    seed: int
    normal: list[Measurement]
    derived_nf4: torch.Tensor
    bnb_nf4: torch.Tensor
    model_name: str | None = None
    model_layers: list[Measurement] = field(default_factory=list)
    model_totals: list[Measurement] = field(default_factory=list)
    # One block of weights for the codebook figure, and the tensor it came from.
    example_block: torch.Tensor | None = None
    example_tensor: torch.Tensor | None = None
    example_name: str = ""

    @property
    def codebook_max_diff(self) -> float:
        """max |derived NF4 - bitsandbytes NF4|."""
        return float((self.derived_nf4 - self.bnb_nf4).abs().max())


def build_report(
    blocksizes: Sequence[int] = DEFAULT_BLOCKSIZES,
    formats: Sequence[str] = DEFAULT_FORMATS,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    weights: Iterable[tuple[str, torch.Tensor]] | None = None,
    model_name: str | None = None,
) -> Report:
    """Measure all formats on normal samples and, if given, on model weights.

    Args:
        blocksizes: block sizes (validated against :data:`BNB_BLOCKSIZES`).
        formats: format keys.
        samples: number of standard-normal samples.
        seed: their seed.
        weights: ``(name, tensor)`` pairs of a model's linear weights, or ``None``.
        model_name: label of the model in the report.

    Returns:
        The report.
    """
    blocksizes = validate_blocksizes(blocksizes)
    formats = _validate_formats(formats)
    x = normal_samples(samples, seed)
    normal = [
        measure(x, f, b, source="normal", tensor=f"randn({samples})") for f in formats for b in blocksizes
    ]
    report = Report(
        blocksizes=blocksizes,
        formats=formats,
        samples=samples,
        seed=seed,
        normal=normal,
        derived_nf4=derive_nf4_codebook(),
        bnb_nf4=bnb_codebook("nf4"),
    )
    example_bs = 64 if 64 in blocksizes else blocksizes[0]
    example_src, example_name = x, f"N(0, 1) samples, seed {seed}"
    if weights is not None:
        first: list[tuple[str, torch.Tensor]] = []

        def keep_first(it: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
            for name, w in it:
                if not first:
                    first.append((name, w.detach().float().reshape(-1)[: 1 << 20].clone()))
                yield name, w

        name = model_name or "model"
        report.model_layers, report.model_totals = evaluate_weights(
            keep_first(weights), blocksizes, formats, source=name
        )
        report.model_name = name
        example_name, example_src = f"{name}: {first[0][0]}", first[0][1]
    report.example_tensor = example_src[: 1 << 20]
    report.example_block = example_src[:example_bs]
    report.example_name = example_name
    return report


def _fmt(v: float) -> str:
    if v != v:  # nan
        return "-"
    return f"{v:.4g}"


def _md_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _measurement_table(ms: Sequence[Measurement], relative: bool = False) -> str:
    header = ["format", "block", "MSE", "MAE", "max err"]
    header += ["rel. MSE"] if relative else []
    header += ["bits/weight", "bits/weight incl. tables"]
    order = {f: i for i, f in enumerate(FORMATS)}
    rows = []
    for m in sorted(ms, key=lambda m: (m.blocksize, order[m.fmt])):
        r = [FORMATS[m.fmt], m.blocksize, _fmt(m.mse), _fmt(m.mae), _fmt(m.max_err)]
        r += [_fmt(m.rel_mse)] if relative else []
        r += [f"{m.bits_per_weight:.4f}", f"{m.bits_per_weight_with_tables:.4f}"]
        rows.append(r)
    return _md_table(header, rows)


def equal_storage(ms: Sequence[Measurement], tolerance: float = EQUAL_STORAGE_TOLERANCE) -> list[dict]:
    """For each storage budget, the lowest-error configuration of each format that fits.

    Budgets are the distinct bits/weight of the one-constant formats (absmax int4, fp4, nf4) at
    the measured block sizes; a configuration fits if it costs at most ``budget + tolerance``.

    Args:
        ms: measurements of one source.
        tolerance: slack in bits/weight.

    Returns:
        One dict per budget: ``{"budget": float, fmt: Measurement | None, ...}``, ascending.
    """
    one_constant = {"int4_absmax", "fp4", "nf4"}
    budgets = sorted({round(m.bits_per_weight, 4) for m in ms if m.fmt in one_constant})
    if not budgets:
        budgets = sorted({round(m.bits_per_weight, 4) for m in ms})
    out = []
    for budget in budgets:
        row: dict = {"budget": budget}
        for fmt in dict.fromkeys(m.fmt for m in ms):
            fits = [m for m in ms if m.fmt == fmt and m.bits_per_weight <= budget + tolerance]
            row[fmt] = min(fits, key=lambda m: m.mse) if fits else None
        out.append(row)
    return out


def _equal_storage_table(ms: Sequence[Measurement]) -> str:
    rows = equal_storage(ms)
    fmts = [f for f in FORMATS if any(m.fmt == f for m in ms)]
    body = []
    for r in rows:
        cells = [f"{r['budget']:.3f}"]
        for f in fmts:
            m = r[f]
            cells.append("-" if m is None else f"{_fmt(m.mse)} (B={m.blocksize}, {m.bits_per_weight:.3f})")
        body.append(cells)
    return _md_table(["budget (bits/weight)"] + [FORMATS[f] for f in fmts], body)


def _layer_table(layers: Sequence[Measurement], blocksize: int, formats: Sequence[str]) -> str:
    by_tensor: dict[str, dict[str, Measurement]] = {}
    for m in layers:
        if m.blocksize == blocksize:
            by_tensor.setdefault(m.tensor, {})[m.fmt] = m
    rows = []
    for name, d in by_tensor.items():
        any_m = next(iter(d.values()))
        rows.append([name, any_m.numel] + [_fmt(d[f].rel_mse) if f in d else "-" for f in formats])
    return _md_table(["tensor", "weights"] + [FORMATS[f] for f in formats], rows)


def render_markdown(report: Report) -> str:
    """The report as markdown (what goes to stdout and ``report.md``)."""
    ok = "matches" if report.codebook_max_diff <= 1e-6 else "DOES NOT match"
    quant = std_quantile_levels()
    cb_rows = [
        [i, f"{report.derived_nf4[i]:+.7f}", f"{report.bnb_nf4[i]:+.7f}", f"{quant[i]:+.4f}"]
        for i in range(16)
    ]
    parts = [
        "# Quantization report: 4-bit formats, error and storage",
        "",
        "## NF4 codebook",
        "",
        f"Derived from the N(0, 1) quantiles: 8 positive levels at `linspace({nf4_offset():.7f}, 0.5, 9)[:-1]`, "
        "7 negative at `linspace(offset, 0.5, 8)[:-1]`, an exact 0, divided by the largest "
        "(the offset is the mean of 1 - 1/30 and 1 - 1/32). "
        f"max |derived - bitsandbytes| = {report.codebook_max_diff:.2e}: {ok} bitsandbytes' NF4 table "
        "(tolerance 1e-6). The last column is the textbook shortcut's levels, quantiles at "
        "(i + 0.5) / 16 in units of the block's standard deviation: symmetric, no exact zero.",
        "",
        _md_table(["code", "NF4 derived", "NF4 bitsandbytes", "std-quantile level"], cb_rows),
        "",
        f"## Standard normal samples ({report.samples:,}, seed {report.seed})",
        "",
        "bits/weight counts the stored bytes that grow with the weights (4-bit codes, block "
        "constants, nested constants); 'incl. tables' adds the fixed code tables and offset that "
        "are stored with each quantized tensor, spread over its weights.",
        "",
        _measurement_table(report.normal),
        "",
        "## Equal storage (normal samples)",
        "",
        "Lowest MSE each format reaches within a storage budget (its block size and cost in "
        f"brackets; up to {EQUAL_STORAGE_TOLERANCE} bits/weight over the budget counts as equal).",
        "",
        _equal_storage_table(report.normal),
    ]
    if report.model_name is not None:
        n_tensors = len({m.tensor for m in report.model_layers})
        numel = report.model_totals[0].numel
        bs = 64 if 64 in report.blocksizes else report.blocksizes[0]
        parts += [
            "",
            f"## Model: {report.model_name} ({n_tensors} linear weights, {numel:,} parameters)",
            "",
            "### All linear weights",
            "",
            "rel. MSE = MSE / mean square of the weights (comparable with the normal samples' MSE).",
            "",
            _measurement_table(report.model_totals, relative=True),
            "",
            "### Equal storage (model)",
            "",
            _equal_storage_table(report.model_totals),
            "",
            f"### Layer by layer: rel. MSE at block {bs}",
            "",
            _layer_table(report.model_layers, bs, report.formats),
        ]
    return "\n".join(parts) + "\n"


CSV_FIELDS = [
    "source",
    "tensor",
    "format",
    "blocksize",
    "numel",
    "mse",
    "mae",
    "max_err",
    "rel_mse",
    "block_bytes",
    "table_bytes",
    "bits_per_weight",
    "bits_per_weight_with_tables",
]


def all_measurements(report: Report) -> list[Measurement]:
    """Normal samples, model totals, then each model tensor: the rows of the CSV."""
    return [*report.normal, *report.model_totals, *report.model_layers]


def write_csv(report: Report, path: str | os.PathLike[str]) -> None:
    """Write every measurement as a CSV row (columns: :data:`CSV_FIELDS`)."""
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        w.writeheader()
        for m in all_measurements(report):
            w.writerow(m.as_row())


def plot_codebook(report: Report, path: str | os.PathLike[str]) -> None:
    """One block's weights and the pooled block-normalised distribution, with the NF4 levels."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    levels = report.bnb_nf4.numpy()
    block = report.example_block
    bs = block.numel()
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    absmax = block.abs().max().clamp_min(1e-30)
    b = (block / absmax).numpy()
    ax1.hist(b, bins=32, range=(-1.05, 1.05), color="tab:blue", alpha=0.7)
    ax1.plot(b, [0] * len(b), "|", color="k", markersize=12)
    for lv in levels:
        ax1.axvline(lv, color="tab:red", lw=0.8)
    ax1.set_title(f"one block of {bs} weights / absmax ({float(absmax):.3g})", fontsize=10)
    ax1.set_xlabel("weight / block absmax")
    ax1.set_ylabel("count")

    t = report.example_tensor
    n = (t.numel() // bs) * bs
    if n:
        blocks = t[:n].view(-1, bs)
        normed = (blocks / blocks.abs().amax(1, keepdim=True).clamp_min(1e-30)).reshape(-1).numpy()
        ax2.hist(normed, bins=200, range=(-1.02, 1.02), density=True, color="tab:blue", alpha=0.7)
    for i, lv in enumerate(levels):
        ax2.axvline(lv, color="tab:red", lw=0.8, label="NF4 levels" if i == 0 else None)
    ax2.set_title(f"all blocks of {bs}, each / its absmax", fontsize=10)
    ax2.set_xlabel("weight / block absmax")
    ax2.set_ylabel("density")
    ax2.legend(loc="upper right", fontsize=8)
    fig.suptitle(f"NF4 levels on {report.example_name}", fontsize=11)
    fig.savefig(path, dpi=110)


def plot_error_vs_bits(report: Report, path: str | os.PathLike[str]) -> None:
    """MSE against bits/weight for every format and block size (and the model's, if any)."""
    from matplotlib.figure import Figure

    panels = [("N(0, 1) samples", report.normal, "mse", "MSE")]
    if report.model_totals:
        # Relative MSE: model weights are ~100x smaller than N(0, 1), so raw MSE is not comparable.
        panels.append((report.model_name, report.model_totals, "rel_mse", "MSE / mean square of weights"))
    fig = Figure(figsize=(6.5 * len(panels), 4.8), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, ms, attr, ylabel) in zip(axes, panels, strict=True):
        for fmt in report.formats:
            pts = sorted((m for m in ms if m.fmt == fmt), key=lambda m: m.bits_per_weight)
            xs = [m.bits_per_weight for m in pts]
            ys = [getattr(m, attr) for m in pts]
            ax.plot(xs, ys, "o-", label=FORMATS[fmt], ms=4)
            for m, xv, yv in zip(pts, xs, ys, strict=True):
                ax.annotate(str(m.blocksize), (xv, yv), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.set_xlabel("bits per weight (incl. block constants)")
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("Quantization error vs storage (labels: block size)", fontsize=11)
    fig.savefig(path, dpi=110)


@dataclass
class ReportFiles:
    """Paths written by :func:`write_report`."""

    markdown: Path
    csv: Path
    codebook_png: Path
    error_vs_bits_png: Path


def write_report(report: Report, out_dir: str | os.PathLike[str]) -> ReportFiles:
    """Write ``report.md``, ``report.csv``, ``codebook.png`` and ``error_vs_bits.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(
        out / "report.md", out / "report.csv", out / "codebook.png", out / "error_vs_bits.png"
    )
    files.markdown.write_text(render_markdown(report))
    write_csv(report, files.csv)
    plot_codebook(report, files.codebook_png)
    plot_error_vs_bits(report, files.error_vs_bits_png)
    return files


def log_to_wandb(report: Report, files: ReportFiles, project: str | None = None) -> str:
    """Log the table, the figures and headline figures to a W&B run.

    Offline unless ``WANDB_API_KEY`` is set (or ``WANDB_MODE`` says otherwise), so it works
    with no network; the run directory goes under the report's output directory.

    Returns:
        The run's local directory.
    """
    import wandb

    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    run = wandb.init(
        project=project or os.environ.get("WANDB_PROJECT", "lightning-qlora"),
        job_type="quant-report",
        mode=mode,
        dir=str(files.markdown.parent),
        config={
            "blocksizes": list(report.blocksizes),
            "formats": list(report.formats),
            "samples": report.samples,
            "seed": report.seed,
            "model": report.model_name,
        },
    )
    try:
        ms = all_measurements(report)
        table = wandb.Table(columns=CSV_FIELDS, data=[[m.as_row()[c] for c in CSV_FIELDS] for m in ms])
        run.log(
            {
                "quant_report/table": table,
                "quant_report/codebook": wandb.Image(str(files.codebook_png)),
                "quant_report/error_vs_bits": wandb.Image(str(files.error_vs_bits_png)),
            }
        )
        summary = {"quant_report/nf4_codebook_max_diff": report.codebook_max_diff}
        for m in [*report.normal, *report.model_totals]:
            key = f"quant_report/{'normal' if m.source == 'normal' else 'model'}/{m.fmt}/{m.blocksize}"
            summary[f"{key}/mse"] = m.mse
            summary[f"{key}/bits_per_weight"] = m.bits_per_weight
        run.summary.update(summary)
        return str(Path(run.dir).parent)
    finally:
        run.finish()


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def linear_weights_from_recipe(
    recipe: str, overrides: Sequence[str] = (), include_embeddings: bool = False
) -> tuple[Iterator[tuple[str, torch.Tensor]], str]:
    """The linear weights of the model a training recipe would fine-tune, and its name.

    A local ``model.name_or_path`` is read from its safetensors; ``model.from_config`` (the embedded
    default) is built with the recipe's seed and tokenizer, exactly as ``lightning-qlora`` builds it.
    """
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from . import train as T

    T.register_configs()
    try:
        with initialize_config_module(T.RECIPES_MODULE, version_base="1.3"):
            cfg = compose(recipe, list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise ValueError(f"--recipe {recipe}: {T.describe_config_error(err, recipe)}") from None
    if cfg.model.from_config is None:
        path = str(cfg.model.name_or_path)
        if not Path(path).expanduser().is_dir():
            raise ValueError(
                f"recipe {recipe!r} fine-tunes {path!r}, which is not a local directory; download it and pass "
                "--model <dir> (this report reads weights from disk, not from the hub)"
            )
        return linear_weights_from_checkpoint(path, include_embeddings), f"{recipe}: {path}"
    module = T.build_module(cfg, T.build_tokenizer(cfg))
    module.configure_model()
    return linear_weights_from_module(module.model, include_embeddings), f"{recipe}: {module.model_name}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lightning-qlora-quant-report",
        description="Error and storage of int4, FP4, NF4 (+ double quant) and std-normalised 4-bit "
        "quantization, on normal samples and optionally a model's linear weights.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--model", help="checkpoint directory (or .safetensors file) to read linear weights from"
    )
    src.add_argument("--config", help="transformers config.json (or its directory): random weights, offline")
    src.add_argument("--random-llama", action="store_true", help="a tiny random Llama (offline)")
    src.add_argument(
        "--recipe",
        help="a training recipe's model (e.g. default: the embedded one, offline); overrides after --",
    )
    p.add_argument("overrides", nargs="*", help="Hydra overrides for --recipe, e.g. model.name_or_path=/m")
    p.add_argument(
        "--blocksizes",
        type=_int_list,
        default=list(DEFAULT_BLOCKSIZES),
        help=f"comma-separated, from {','.join(map(str, BNB_BLOCKSIZES))} (default 32,64,128,256)",
    )
    p.add_argument(
        "--formats",
        default=",".join(DEFAULT_FORMATS),
        help=f"comma-separated, from {','.join(FORMATS)} (default all)",
    )
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help="standard-normal samples (4096*1024)")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples and of random models")
    p.add_argument("--include-embeddings", action="store_true", help="also measure embeddings and the head")
    p.add_argument("--max-tensors", type=int, default=None, help="measure only the first N linear weights")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument(
        "--wandb", action="store_true", help="log the table and figures to W&B (offline without a key)"
    )
    p.add_argument("--quiet", action="store_true", help="do not print the markdown to stdout")
    return p


def _limit(it: Iterable[tuple[str, torch.Tensor]], n: int | None) -> Iterator[tuple[str, torch.Tensor]]:
    for i, item in enumerate(it):
        if n is not None and i >= n:
            return
        yield item


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``lightning-qlora-quant-report``.

    Args:
        argv: arguments (default ``sys.argv[1:]``).

    Returns:
        0 on success; bad input exits with status 2 and a message naming the problem.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        blocksizes = validate_blocksizes(args.blocksizes)
        formats = _validate_formats(f.strip() for f in args.formats.split(",") if f.strip())
        if args.max_tensors is not None and args.max_tensors <= 0:
            raise ValueError(f"--max-tensors must be positive, got {args.max_tensors}")
        weights, name = None, None
        if args.model:
            weights = linear_weights_from_checkpoint(args.model, args.include_embeddings)
            name = str(args.model)
        elif args.recipe:
            weights, name = linear_weights_from_recipe(args.recipe, args.overrides, args.include_embeddings)
        elif args.config or args.random_llama:
            model = model_from_config(args.config, seed=args.seed)
            weights = linear_weights_from_module(model, args.include_embeddings)
            name = f"{args.config} (random weights)" if args.config else "tiny random Llama"
        if weights is not None:
            weights = _limit(weights, args.max_tensors)
        report = build_report(blocksizes, formats, args.samples, args.seed, weights, name)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    files = write_report(report, args.out)
    if not args.quiet:
        sys.stdout.write(render_markdown(report))
    for f in (files.markdown, files.csv, files.codebook_png, files.error_vs_bits_png):
        print(f"wrote {f}", file=sys.stderr)
    if args.wandb:
        run_dir = log_to_wandb(report, files)
        print(f"logged to W&B run in {run_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
