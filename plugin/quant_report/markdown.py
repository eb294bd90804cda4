"""The report as markdown: the codebook, the error tables, equal storage, layer by layer."""

from __future__ import annotations

import math
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
    out = "\n".join(parts) + "\n"
    if report.quality is not None:
        out += "\n" + render_quality(report.quality)
    if report.study is not None:
        out += "\n" + render_study(report.study)
    return out


# --------------------------------------------------------------------------------------------
# Model quality (held-out loss per format) and the train-first study around it
# --------------------------------------------------------------------------------------------


def _rank(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):  # ties share their mean rank
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (nan with fewer than 3 points or no spread)."""
    if len(x) < 3:
        return float("nan")
    rx, ry = _rank(x), _rank(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    return cov / (vx * vy) ** 0.5 if vx > 0 and vy > 0 else float("nan")


def quality_table(q) -> str:  # noqa: ANN001 - a QualityResult
    """Loss, perplexity and their increase over the unquantized model, with the weight error beside them."""
    header = [
        "format",
        "block",
        "loss",
        "perplexity",
        "Δ loss ± 2 SE",
        "ppl increase",
        "weight rel. MSE",
        "bits/weight",
    ]
    b = q.baseline
    rows = [
        [
            f"unquantized ({q.dtype})",
            "-",
            f"{b.loss:.4f}",
            f"{b.perplexity:.4f}",
            "-",
            "-",
            "0",
            str(q.baseline_bits),
        ]
    ]
    order = {f: i for i, f in enumerate(FORMATS)}
    for r in sorted(q.rows, key=lambda r: (r.blocksize, order[r.fmt])):
        rows.append(
            [
                FORMATS[r.fmt],
                r.blocksize,
                f"{r.loss:.4f}",
                f"{r.perplexity:.4f}",
                f"{q.delta_loss(r):+.4f} ± {2 * q.delta_se(r):.4f}" + ("" if q.resolved(r) else " (n.s.)"),
                f"{q.ppl_increase_pct(r):+.2f}%",
                _fmt(r.weights.rel_mse),
                f"{r.weights.bits_per_weight:.3f}",
            ]
        )
    return _md_table(header, rows)


def quality_findings(q) -> list[str]:  # noqa: ANN001
    """What the table says, in sentences computed from it (no claim the numbers do not carry)."""
    se_of = type(q).delta_se_of
    rows = q.rows
    up = [r for r in rows if q.resolved(r) and q.delta_loss(r) > 0]
    down = [r for r in rows if q.resolved(r) and q.delta_loss(r) < 0]
    out = [
        f"{len(up)} of {len(rows)} configurations raise the loss by more than twice the standard error of the "
        f"difference (SE from the {len(q.baseline.batches)} evaluation batches, paired: same tokens); "
        f"{len(down)} lower it by that much; the rest (n.s.) are not resolved by this evaluation set."
    ]
    rho = spearman([r.weights.rel_mse for r in rows], [q.delta_loss(r) for r in rows])
    if rho == rho:
        out.append(
            f"Rank correlation (Spearman) between the weight error (rel. MSE) and the loss increase over the "
            f"{len(rows)} configurations: {rho:+.2f}."
        )
    blocks = sorted({r.blocksize for r in rows})
    for a, b_ in (("nf4", "fp4"), ("nf4_dq", "fp4_dq"), ("nf4", "int4_absmax"), ("nf4", "int4_minmax")):
        pairs = [(q.row(a, bs), q.row(b_, bs)) for bs in blocks]
        pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
        if not pairs:
            continue
        wins = sum(1 for x, y in pairs if x.loss < y.loss)
        clear = sum(1 for x, y in pairs if abs(x.loss - y.loss) > 2 * se_of(y, x))
        detail = ", ".join(f"{x.blocksize}: {x.loss - y.loss:+.4f} ± {2 * se_of(y, x):.4f}" for x, y in pairs)
        out.append(
            f"{FORMATS[a]} minus {FORMATS[b_]} (loss, ± 2 SE): {detail}; lower at {wins} of {len(pairs)} block "
            f"sizes, resolved at {clear}."
        )
    return out


def render_quality(q) -> str:  # noqa: ANN001
    """The quality section of the report."""
    e = q.eval_set
    head = [
        f"## Model quality: {q.model_name}",
        "",
        f"Held-out loss on {e['description']}: {e['rows']:,} rows (of {e['available_rows']:,}), "
        f"{e['target_tokens']:,} target tokens, loss on {e['loss_on']}; {q.dtype} compute on {q.device}. "
        f"Each configuration quantizes the same {q.n_linear} linear layers ({q.quantized_params:,} of "
        f"{q.total_params:,} parameters; the output head and embeddings stay unquantized). The "
        "bitsandbytes rows run the `Linear4bit` layers that train (`quantize_linears`); the int4 and "
        "std-normalised rows substitute their dequantized weights into the same layers, so only the "
        "format differs. Weight rel. MSE = squared error of the weights the model ran with / their "
        "mean square; perplexity = exp(loss).",
        "",
        quality_table(q),
        "",
    ]
    head += [f"- {line}" for line in quality_findings(q)]
    return "\n".join(head) + "\n"


def render_study(s) -> str:  # noqa: ANN001 - a StudyResult
    """The fit and the LoRA recovery of a train-first study."""
    t = s.train
    last = f"; last training loss {t.train_loss:.4f}" if t.train_loss is not None else ""
    parts = [
        f"## The fit: {s.name}",
        "",
        f"Every parameter trained from random initialisation ({t.params:,} parameters), {t.steps} steps"
        + (f" (stopped by the time limit; {t.max_steps} planned)" if t.stopped_by_time else "")
        + f", {t.precision} on {t.device}, {t.seconds:.0f} s ({t.tokens:,} tokens, {t.tokens_per_s:,.0f} tokens/s)"
        + last
        + ".",
        "",
        f"Data: {s.data.get('source')} ({s.data.get('format')}), {s.data.get('train_rows', '?')} training rows "
        f"({s.data.get('train_tokens', 0):,} tokens), {s.data.get('val_rows', '?')} held out "
        f"({s.data.get('val_tokens', 0):,} tokens). Model saved to `{s.model_dir}`.",
    ]
    if s.corpus:
        c = s.corpus
        parts += [
            "",
            f"Corpus: every `.py` file of the Python {c['python']} standard library at `{c['root']}` "
            f"outside site-packages: {c['files']:,} files, {c['bytes'] / 1e6:.1f} MB ({c['skipped_not_utf8']} not "
            f"UTF-8 and {c['skipped_empty']} empty files skipped); {c['val_files']} files held out whole "
            f"(crc32 of the path mod 20 = 0). Tokenizer: {c['tokenizer']['kind']}, "
            f"{c['tokenizer']['vocab_size']:,} tokens, trained on the first {c['tokenizer']['trained_on_chars'] / 1e6:.1f} M "
            "characters of the training files.",
        ]
    if s.recovery:
        parts += ["", render_recovery(s)]
    return "\n".join(parts) + "\n"


def render_recovery(s) -> str:  # noqa: ANN001
    """QLoRA's second claim: LoRA over the 4-bit base recovers what quantization lost."""
    from .quality import paired_se

    base = s.quality.baseline
    base16 = base.loss
    lora16 = s.recovery_row("none")

    def vs(loss: float, batches: list, ref: list = base.batches, ref_loss: float = base16) -> str:
        se = paired_se(ref, batches)
        return f"{loss - ref_loss:+.4f}" + (f" ± {2 * se:.4f}" if se == se else "")

    rows = [["16-bit (the fitted model)", f"{base16:.4f}", f"{math.exp(base16):.4f}", "-"]]
    for r in s.recovery:
        if r.base == "none":
            continue
        name = f"{FORMATS[r.base]} @ {r.blocksize}"
        rows.append(
            [
                f"{name}, before LoRA",
                f"{r.loss_before:.4f}",
                f"{math.exp(r.loss_before):.4f}",
                vs(r.loss_before, r.batches_before),
            ]
        )
        rows.append(
            [
                f"{name} + LoRA, {r.steps} steps",
                f"{r.loss_after:.4f}",
                f"{math.exp(r.loss_after):.4f}",
                vs(r.loss_after, r.batches_after),
            ]
        )
    if lora16 is not None:
        rows.append(
            [
                f"16-bit + LoRA, {lora16.steps} steps",
                f"{lora16.loss_after:.4f}",
                f"{math.exp(lora16.loss_after):.4f}",
                vs(lora16.loss_after, lora16.batches_after),
            ]
        )
    lo = s.lora
    lines = [
        "### LoRA on the 4-bit base (QLoRA's second claim)",
        "",
        f"From the saved model, LoRA (r={lo.get('r')}, alpha={lo.get('alpha')}, {lo.get('target_modules')}, "
        f"lr {lo.get('lr')}) for {lo.get('steps')} steps on {lo.get('data')}, through `QLoRAPrecision` and a "
        "Lightning `Trainer`, same seed for every base; held-out loss from `trainer.validate` before and after "
        "(± 2 SE of the paired per-batch differences).",
        "",
        _md_table(["model", "held-out loss", "perplexity", "Δ loss vs 16-bit"], rows),
    ]
    for r in s.recovery:
        if r.base == "none" or lora16 is None:
            continue
        lines += [
            "",
            f"- {FORMATS[r.base]} @ {r.blocksize}: quantization cost {vs(r.loss_before, r.batches_before)} in loss "
            f"before LoRA; after {r.steps} steps it is "
            f"{vs(r.loss_after, r.batches_after, lora16.batches_after, lora16.loss_after)} from 16-bit + LoRA with "
            "the same steps (the comparison that isolates the base's format: both keep training the same model "
            "on the same batches).",
        ]
    return "\n".join(lines)
