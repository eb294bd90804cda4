"""The report's figures: NF4 levels on a block of weights, and error against bits per weight."""

from __future__ import annotations

import os

from .formats import FORMATS
from .report import Report


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


def plot_quality(quality, path: str | os.PathLike[str]) -> None:  # noqa: ANN001 - a QualityResult
    """Perplexity increase against bits per weight, and loss increase against weight error."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4.8), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    fmts = list(dict.fromkeys(r.fmt for r in quality.rows))
    for fmt in fmts:
        pts = sorted((r for r in quality.rows if r.fmt == fmt), key=lambda r: r.weights.bits_per_weight)
        xs = [r.weights.bits_per_weight for r in pts]
        ys = [quality.ppl_increase_pct(r) for r in pts]
        # ± 2 standard errors of the loss difference (0 where there is none to estimate)
        se2 = [2 * quality.delta_se(r) if quality.delta_se(r) == quality.delta_se(r) else 0.0 for r in pts]
        bars = ax1.errorbar(
            xs, ys, yerr=[100 * e for e in se2], fmt="o-", label=FORMATS[fmt], ms=4, capsize=2, lw=1
        )
        for r, xv, yv in zip(pts, xs, ys, strict=True):
            ax1.annotate(str(r.blocksize), (xv, yv), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax2.errorbar(
            [r.weights.rel_mse for r in pts],
            [quality.delta_loss(r) for r in pts],
            yerr=se2,
            fmt="o",
            color=bars[0].get_color(),
            label=FORMATS[fmt],
            ms=4,
            capsize=2,
        )
    ax1.axhline(0, color="k", lw=0.6)
    ax1.set_xlabel("bits per weight (codes + block constants)")
    ax1.set_ylabel(f"perplexity increase over unquantized ({quality.dtype}), %")
    ax1.set_title("perplexity cost vs storage (labels: block size; bars: ± 2 SE)", fontsize=10)
    ax2.axhline(0, color="k", lw=0.6)
    ax2.set_xscale("log")
    ax2.set_xlabel("weight error: MSE / mean square of the weights")
    ax2.set_ylabel("held-out loss increase")
    ax2.set_title("does lower weight error mean lower loss?", fontsize=10)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    e = quality.eval_set
    fig.suptitle(
        f"{quality.model_name}: held-out loss on {e['target_tokens']:,} tokens "
        f"(baseline perplexity {quality.baseline.perplexity:.3f})",
        fontsize=10,
    )
    fig.savefig(path, dpi=110)
