"""Measuring a format: error and stored bytes on one tensor, on many weights, at equal storage."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import torch

from .formats import DEFAULT_BLOCKSIZES, DEFAULT_FORMATS, quantize, validate_blocksizes, validate_formats

# Same stream as ``torch.manual_seed(0); torch.randn(4096, 1024)``, so the report's normal-sample
# figures can be checked against a one-line reproduction.
DEFAULT_SAMPLES = 4096 * 1024
# A format may spend up to this many bits/weight more than the budget and still count as
# "equal storage" (NF4 + double quant at 64 costs 4.127 against 4.125 for absmax at 256).
EQUAL_STORAGE_TOLERANCE = 0.01


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
    return compare(ref, q.dequantized, fmt, blocksize, q.block_bytes, q.table_bytes, source, tensor)


def compare(
    ref: torch.Tensor,
    decoded: torch.Tensor,
    fmt: str,
    blocksize: int,
    block_bytes: int,
    table_bytes: int,
    source: str = "tensor",
    tensor: str = "tensor",
) -> Measurement:
    """The measurement of ``decoded`` against ``ref`` (same number of values, any device or dtype).

    Used by :func:`measure` and by the quality study, which measures the weights a model actually
    runs with (the dequantized ``Linear4bit`` weight, or the substituted int4 weight).
    """
    ref64 = ref.detach().reshape(-1).to(torch.float64)
    # Sums in float64: on millions of weights float32 accumulation drifts in the 4th digit.
    err = decoded.detach().reshape(-1).to(torch.float64) - ref64
    return Measurement(
        source=source,
        tensor=tensor,
        fmt=fmt,
        blocksize=blocksize,
        numel=ref64.numel(),
        sse=float(err.square().sum()),
        sae=float(err.abs().sum()),
        max_err=float(err.abs().max()) if err.numel() else 0.0,
        sum_sq=float(ref64.square().sum()),
        block_bytes=block_bytes,
        table_bytes=table_bytes,
    )


def total(ms: Sequence[Measurement], tensor: str = "(total)") -> Measurement:
    """The sum of measurements of one format and block size (e.g. every layer of a model)."""
    out = replace(ms[0], tensor=tensor)
    for m in ms[1:]:
        out = out.merge(m, tensor)
    return out


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
    formats = validate_formats(formats)
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
