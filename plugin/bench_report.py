"""The benchmark's table: one markdown row per job, its ratios against the reference and the 1-device row.

A column whose value no row measured is left out (a table of 1-device rows has no ``devices`` column,
a table read back from older rows none of the columns added since), so every table says only what was
measured.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .bench_common import MODELS, Result
from .bench_flops import flops_per_token

NOT_RUN = "not run: "  # a row the bench decided not to run (and said why): not a failure


def annotate(results: list[Result], peak_flops: float) -> None:
    """Sets each row's FLOPs per token (:func:`~lightning_qlora.bench_flops.flops_per_token`) and its share of
    ``peak_flops`` (per GPU: a row of N devices is divided by N)."""
    for r in results:
        spec = MODELS[r.model]
        r.flops_per_token = flops_per_token(spec["config"], spec["seq"])
        if not r.error and peak_flops > 0:
            r.peak_share = r.tokens_per_s / max(r.devices, 1) * r.flops_per_token / peak_flops


def failed(r: Result) -> bool:
    return bool(r.error) and not r.error.startswith(NOT_RUN)


def reference_row(r: Result, results: list[Result]) -> Result | None:
    """The fastest ``peft`` row of ``r``'s model, budget, device count and strategy."""
    refs = [x for x in results if x.model == r.model and x.mode == "peft" and not x.error
            and x.budget_gib == r.budget_gib and x.devices == r.devices and x.strategy == r.strategy]  # fmt: skip
    return max(refs, key=lambda x: x.tokens_per_s, default=None)


def scaling_efficiency(row: Result, results: list[Result]) -> float | None:
    """``row``'s tokens/s over ``row.devices`` times the 1-device row of the same model, mode, batch and
    budget (1.0: perfect data-parallel scaling); None without such a row."""
    base = next((x for x in results if x.devices == 1 and not x.error and x.model == row.model
                 and x.mode == row.mode and x.batch == row.batch and x.budget_gib == row.budget_gib),
                None)  # fmt: skip
    if base is None or row.error or not base.tokens_per_s:
        return None
    return row.tokens_per_s / (row.devices * base.tokens_per_s)


@dataclass(frozen=True)
class Column:
    """A column: its header, its cell for a row (given all rows), and whether the table shows it."""

    header: str
    cell: Callable[[Result, list[Result]], str]
    shown: Callable[[list[Result]], bool] = lambda rows: True
    before_result: bool = False  # filled in a failed row too (what the row is, not what it measured)


def _any(field: str) -> Callable[[list[Result]], bool]:
    return lambda rows: any(getattr(r, field) is not None for r in rows)


def _multi(rows: list[Result]) -> bool:
    return any(r.devices > 1 for r in rows)


def _mode(r: Result, rows: list[Result]) -> str:
    budget = f" (≤{r.budget_gib:g} GiB)" if r.budget_gib else ""
    return (f"{r.mode} (compiled)" if r.compiled else r.mode) + budget


def _vs_peft_speed(r: Result, rows: list[Result]) -> str:
    ref = reference_row(r, rows)
    return f"{r.tokens_per_s / ref.tokens_per_s:.2f}x" if ref else ""


def _vs_peft_memory(r: Result, rows: list[Result]) -> str:
    ref = reference_row(r, rows)
    return f"{r.peak_gib / ref.peak_gib:.2f}x" if ref and ref.peak_gib else ""


def _scaling(r: Result, rows: list[Result]) -> str:
    eff = scaling_efficiency(r, rows)
    return "" if r.devices == 1 or eff is None else f"{eff:.0%}"


def _opt(field: str, fmt: str) -> Callable[[Result, list[Result]], str]:
    def cell(r: Result, rows: list[Result]) -> str:
        value = getattr(r, field)
        return "n/a" if value is None else format(value, fmt)

    return cell


def _estimate(r: Result, rows: list[Result]) -> str:
    """The memory model's estimate for our rows ("n/a": it gave none); it does not model the reference."""
    if not r.mode.startswith("ours"):
        return ""
    return "n/a" if r.est_gib is None else f"{r.est_gib:.2f}"


def _host_kinds(r: Result, rows: list[Result]) -> str:
    if r.host_anon_gib is None or r.host_file_gib is None:
        return ""
    return f"{r.host_anon_gib:.2f} / {r.host_file_gib:.2f}"


def _grad(r: Result, rows: list[Result]) -> str:
    if r.grad_bytes is None:
        return ""
    return f"{r.grad_bytes / 2**20:,.2f}{'' if r.grad_bytes_measured else '*'}"


def columns(rows: list[Result], estimate: bool = False) -> list[Column]:
    """The table's columns for these rows (``estimate``: add the memory model's estimate of the peak)."""
    peak = "peak GiB/device" if _multi(rows) else "peak GiB"
    every = [
        Column("model", lambda r, rows: r.model, before_result=True),
        Column("mode", _mode, before_result=True),
        Column("devices", lambda r, rows: str(r.devices), _multi, before_result=True),
        Column("batch", lambda r, rows: str(r.batch or ""), before_result=True),
        Column("checkpointing", lambda r, rows: r.checkpointing, before_result=True),
        Column("strategy", lambda r, rows: r.strategy, lambda rows: any(r.strategy for r in rows), True),
        Column("tokens/s", lambda r, rows: f"{r.tokens_per_s:,.0f}"),
        Column("vs peft", _vs_peft_speed),
        Column("scaling", _scaling, _multi),
        Column(
            "% matmul peak",
            lambda r, rows: "" if r.peak_share is None else f"{r.peak_share:.0%}",
            _any("peak_share"),
        ),
        Column("step s", lambda r, rows: f"{r.step_s:.3f}"),
        Column("first step s", _opt("first_step_s", ".1f"), _any("first_step_s")),
        Column(peak, lambda r, rows: f"{r.peak_gib:.2f}"),
        Column("vs peft", _vs_peft_memory),
        Column("reserved GiB", _opt("peak_reserved_gib", ".2f"), _any("peak_reserved_gib")),
        Column("est. GiB", _estimate, lambda rows: estimate),
        Column("host RSS GiB", _opt("host_rss_gib", ".2f"), _any("host_rss_gib")),
        Column("host anon / file GiB", _host_kinds, _any("host_anon_gib")),
        Column("load host GiB", _opt("load_host_gib", ".2f"), _any("load_host_gib")),
        Column("load s", lambda r, rows: f"{r.load_s:.1f}"),
        Column("load peak GiB", lambda r, rows: f"{r.load_peak_gib:.2f}"),
        Column("grad MiB/step", _grad, _any("grad_bytes")),
        Column("loss first→last", lambda r, rows: f"{r.loss_first:.3f}→{r.loss_last:.3f}"),
    ]
    return [c for c in every if c.shown(rows)]


def table(results: list[Result], estimate: bool = False) -> str:
    """Markdown rows; ratios against the best reference (``peft``) row of the same model, budget, device
    count and strategy.

    With data-parallel rows: ``devices``, ``strategy`` and ``scaling`` (tokens/s over ``devices`` times the
    1-device row of the same model, mode and batch); the peaks are then per GPU (the largest rank's).
    ``% matmul peak``: per-GPU tokens/s x FLOPs per token over the card's measured bf16 matmul rate.
    ``grad MiB/step``: a rank's gradient bytes per step; ``*`` marks a count of the trainable bytes where
    the collective could not be watched. A failed or skipped row says why in its ``tokens/s`` cell.
    """
    cols = columns(results, estimate)
    rows = ["| " + " | ".join(c.header for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        if r.error:
            said = False
            cells = []
            for c in cols:
                if c.before_result:
                    cells.append(c.cell(r, results))
                elif not said:
                    cells.append(r.error if r.error.startswith(NOT_RUN) else f"failed: {r.error}")
                    said = True
                else:
                    cells.append("")
        else:
            cells = [c.cell(r, results) for c in cols]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
