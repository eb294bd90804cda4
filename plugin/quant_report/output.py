"""Where a report goes: ``report.md``, ``report.csv`` and the figures on disk, and a W&B run."""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .figures import plot_codebook, plot_error_vs_bits, plot_quality
from .markdown import render_markdown
from .quality import QUALITY_CSV_FIELDS
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


def write_quality_csv(report: Report, path: str | os.PathLike[str]) -> None:
    """One row per configuration, the unquantized model first (columns: :data:`QUALITY_CSV_FIELDS`)."""
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=QUALITY_CSV_FIELDS)
        w.writeheader()
        for row in report.quality.as_rows():
            w.writerow(row)


def quality_json(report: Report) -> dict:
    """What ``quality.json`` holds: the study's record, or the quality result alone."""
    return report.study.to_json() if report.study is not None else {"quality": report.quality.to_json()}


@dataclass
class ReportFiles:
    """Paths written by :func:`write_report` (the quality files only with a quality study)."""

    markdown: Path
    csv: Path
    codebook_png: Path
    error_vs_bits_png: Path
    quality_csv: Path | None = None
    quality_json: Path | None = None
    quality_png: Path | None = None

    def all(self) -> list[Path]:
        return [p for p in vars(self).values() if p is not None]


def write_report(report: Report, out_dir: str | os.PathLike[str]) -> ReportFiles:
    """Write ``report.md``, ``report.csv``, ``codebook.png``, ``error_vs_bits.png`` and, with a
    quality study, ``quality.csv``, ``quality.json`` and ``quality_vs_bits.png``.

    The files are written to a temporary folder beside ``out_dir`` and moved in when all exist, so
    a failure (a full disk, a broken figure) leaves no half-written report.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = ReportFiles(
        Path("report.md"), Path("report.csv"), Path("codebook.png"), Path("error_vs_bits.png")
    )
    if report.quality is not None:
        names.quality_csv, names.quality_json = Path("quality.csv"), Path("quality.json")
        names.quality_png = Path("quality_vs_bits.png")
    tmp = Path(tempfile.mkdtemp(prefix=".report-", dir=out))
    try:
        (tmp / names.markdown).write_text(render_markdown(report))
        write_csv(report, tmp / names.csv)
        plot_codebook(report, tmp / names.codebook_png)
        plot_error_vs_bits(report, tmp / names.error_vs_bits_png)
        if report.quality is not None:
            write_quality_csv(report, tmp / names.quality_csv)
            (tmp / names.quality_json).write_text(
                json.dumps(quality_json(report), indent=1, default=str) + "\n"
            )
            plot_quality(report.quality, tmp / names.quality_png)
        for name in names.all():
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ReportFiles(**{k: None if v is None else out / v for k, v in vars(names).items()})


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
            **({"quality_eval_set": report.quality.eval_set} if report.quality is not None else {}),
            **({"study": report.study.name, "lora": report.study.lora} if report.study is not None else {}),
        },
    )
    try:
        ms = all_measurements(report)
        table = wandb.Table(columns=CSV_FIELDS, data=[[m.as_row()[c] for c in CSV_FIELDS] for m in ms])
        logged = {
            "quant_report/table": table,
            "quant_report/codebook": wandb.Image(str(files.codebook_png)),
            "quant_report/error_vs_bits": wandb.Image(str(files.error_vs_bits_png)),
        }
        summary = {"quant_report/nf4_codebook_max_diff": report.codebook_max_diff}
        for m in [*report.normal, *report.model_totals]:
            key = f"quant_report/{'normal' if m.source == 'normal' else 'model'}/{m.fmt}/{m.blocksize}"
            summary[f"{key}/mse"] = m.mse
            summary[f"{key}/bits_per_weight"] = m.bits_per_weight
        if report.quality is not None:
            rows = report.quality.as_rows()
            logged["quant_report/quality"] = wandb.Table(
                columns=QUALITY_CSV_FIELDS, data=[[r[c] for c in QUALITY_CSV_FIELDS] for r in rows]
            )
            logged["quant_report/quality_vs_bits"] = wandb.Image(str(files.quality_png))
            for r in rows:
                key = f"quant_report/quality/{r['format']}" + (
                    f"/{r['blocksize']}" if r["blocksize"] != "" else ""
                )
                summary[f"{key}/loss"] = r["loss"]
                summary[f"{key}/perplexity"] = r["perplexity"]
                summary[f"{key}/ppl_increase_pct"] = r["ppl_increase_pct"]
        if report.study is not None:
            for r in report.study.recovery:
                key = f"quant_report/lora/{r.base}"
                summary[f"{key}/loss_before"] = r.loss_before
                summary[f"{key}/loss_after"] = r.loss_after
        run.log(logged)
        run.summary.update(summary)
        return str(Path(run.dir).parent)
    finally:
        run.finish()
