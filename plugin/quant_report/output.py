"""Where a report goes: ``report.md``, ``report.csv`` and the figures on disk, and a W&B run."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from .figures import plot_codebook, plot_error_vs_bits
from .markdown import render_markdown
from .report import Report, all_measurements

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


def write_csv(report: Report, path: str | os.PathLike[str]) -> None:
    """Write every measurement as a CSV row (columns: :data:`CSV_FIELDS`)."""
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        w.writeheader()
        for m in all_measurements(report):
            w.writerow(m.as_row())


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
