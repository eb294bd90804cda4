"""The report as markdown: the codebook, the error tables, equal storage, layer by layer."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .formats import FORMATS, nf4_offset, std_quantile_levels
from .measurement import EQUAL_STORAGE_TOLERANCE, Measurement, equal_storage
from .report import Report


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
