"""What 4-bit costs in model quality: held-out loss and perplexity per format and block size.

For one model and one evaluation set, :func:`evaluate_quality` measures the loss of the unquantized
model (in its compute dtype: bfloat16 on a GPU, float32 on a CPU) and of every format and block size:

- the bitsandbytes formats (``nf4``, ``nf4_dq``, ``fp4``, ``fp4_dq``) through the layers that train:
  :func:`lightning_qlora.nf4.quantize_linears` swaps the linear layers for ``Linear4bit`` with the
  format's :class:`~lightning_qlora.nf4.QuantConfig`, bitsandbytes quantizes them, and the forward
  dequantizes them exactly as in a QLoRA run;
- the baselines that bitsandbytes does not have (``int4_minmax``, ``int4_absmax``,
  ``std_quantile``) by substituting their dequantized weights into the same linear layers, so the
  model, the data, the loss and the compute dtype are the same and only the format differs.

The same layers are quantized in every format: every linear layer but the output head (QLoRA's
``skip_modules`` default). Each configuration is applied in place and undone before the next, so
the model is held once (plus one quantized copy of its linear weights), and the weight error is
measured on the weights the model ran with. The loss is :func:`lightning_qlora.loss.causal_lm_loss`
on batches tokenized by the data package (:class:`~lightning_qlora.data.InstructDataModule`): on
response tokens only for instruction data (as training computes it), on assistant turns for
chats, on every token for plain text.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .formats import BNB_BLOCKSIZES, FORMATS, quantize, validate_blocksizes, validate_formats
from .measurement import Measurement, compare, total

# The formats bitsandbytes implements: (quant_type, double_quant).
BNB_FORMATS: dict[str, tuple[str, bool]] = {
    "fp4": ("fp4", False),
    "fp4_dq": ("fp4", True),
    "nf4": ("nf4", False),
    "nf4_dq": ("nf4", True),
}
BASELINE = "none"  # the format key of the unquantized model in tables, CSV and JSON
DEFAULT_EVAL_TOKENS = 65536
MIN_BATCHES = 16  # evaluation batches, where there are enough rows (for the standard error)
SKIP_MODULES: tuple[str, ...] = ("lm_head",)  # QuantConfig's default: the head stays in 16-bit
LOSS_ON = {
    "instruction": "response tokens only (prompt tokens carry no loss, as in training)",
    "chat": "assistant turns only (as in training)",
    "text": "every token",
}


# --------------------------------------------------------------------------------------------
# The evaluation set
# --------------------------------------------------------------------------------------------


@dataclass
class EvalSet:
    """Batches of held-out data, tokenized as training tokenizes them.

    Attributes:
        batches: ``{"input_ids", "attention_mask", "labels"}`` LongTensors, right-padded, labels
            ``-100`` where no loss is taken.
        description: where the rows come from.
        data_format: ``instruction``, ``chat`` or ``text``.
        rows: rows (sequences) evaluated.
        tokens: non-padding tokens in them.
        target_tokens: tokens that carry loss (what perplexity is the per-token mean over).
        available_rows: rows in the split before ``--eval-tokens`` cut it.
    """

    batches: list[dict[str, torch.Tensor]]
    description: str
    data_format: str
    rows: int
    tokens: int
    target_tokens: int
    available_rows: int

    @property
    def loss_on(self) -> str:
        """Which tokens carry the loss, in words."""
        return LOSS_ON.get(self.data_format, self.data_format)

    def summary(self) -> dict[str, Any]:
        """Plain values for JSON and W&B."""
        return {
            "description": self.description,
            "format": self.data_format,
            "loss_on": self.loss_on,
            "rows": self.rows,
            "available_rows": self.available_rows,
            "tokens": self.tokens,
            "target_tokens": self.target_tokens,
        }


def _targets_per_row(labels: Sequence[int]) -> int:
    # causal_lm_loss shifts: position 0 is never a target
    return sum(1 for x in labels[1:] if x != -100)


def _collate(rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows as the data module's collator does: attention 0 and label -100 on padding."""
    n = max(len(r["input_ids"]) for r in rows)
    batch = {
        "input_ids": torch.full((len(rows), n), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(rows), n), dtype=torch.long),
        "labels": torch.full((len(rows), n), -100, dtype=torch.long),
    }
    for i, r in enumerate(rows):
        k = len(r["input_ids"])
        batch["input_ids"][i, :k] = torch.as_tensor(r["input_ids"])
        batch["labels"][i, :k] = torch.as_tensor(r["labels"])
        batch["attention_mask"][i, :k] = torch.as_tensor(r["attention_mask"]) if "attention_mask" in r else 1
    return batch


def eval_set_from_dataset(
    dataset: Any,
    pad_id: int,
    batch_size: int,
    description: str,
    data_format: str,
    eval_tokens: int | None = None,
) -> EvalSet:
    """The first rows of a tokenized split (a data module's ``val_dataset``) up to ``eval_tokens`` targets.

    Args:
        dataset: rows with ``input_ids`` and ``labels`` (and ``attention_mask`` when packed).
        pad_id: the padding id (the data module's ``pad_id``).
        batch_size: rows per batch at most (fewer when that leaves under 16 batches).
        description: where the rows come from, for the report.
        data_format: ``instruction``, ``chat`` or ``text``.
        eval_tokens: stop after the row that brings the target tokens to at least this; ``None``: all.

    Raises:
        ValueError: no row carries a target token.
    """
    if eval_tokens is not None and eval_tokens <= 0:
        raise ValueError(f"--eval-tokens must be positive, got {eval_tokens}")
    rows: list[dict[str, list[int]]] = []
    targets = tokens = 0
    for row in dataset:
        if eval_tokens is not None and targets >= eval_tokens:
            break
        rows.append(row)
        targets += _targets_per_row(row["labels"])
        tokens += sum(row["attention_mask"]) if "attention_mask" in row else len(row["input_ids"])
    if targets == 0:
        raise ValueError(f"{description} has no tokens that carry loss; nothing to evaluate")
    # At least MIN_BATCHES batches where the rows allow: the standard error of a loss difference is
    # estimated across batches (see QualityResult.delta_se), and 3 batches would make it meaningless.
    size = max(1, min(batch_size, -(-len(rows) // MIN_BATCHES)))
    batches = [_collate(rows[i : i + size], pad_id) for i in range(0, len(rows), size)]
    return EvalSet(batches, description, data_format, len(rows), tokens, targets, len(dataset))


def eval_set_from_file(
    path: str,
    tokenizer: Any,
    data_config: Any = None,
    eval_tokens: int | None = DEFAULT_EVAL_TOKENS,
) -> EvalSet:
    """Tokenize a data file with the data package, as training would, and keep its first rows.

    Args:
        path: a .jsonl/.json/.csv/.parquet/.txt file (instruction, chat or text rows).
        tokenizer: the model's tokenizer.
        data_config: a :class:`~lightning_qlora.data.DataConfig` for the template, ``max_length``,
            packing and batch size (a recipe's ``data`` group); its path and split are replaced.
        eval_tokens: target tokens to evaluate (whole rows, in file order); ``None``: all.

    Raises:
        FileNotFoundError, ValueError: the data package's one-line messages (missing file, bad row,
            unknown columns, nothing left after truncation).
    """
    import dataclasses

    from ..data import DataConfig, InstructDataModule

    config = dataclasses.replace(
        data_config or DataConfig(), path=str(path), val_split=None, val_fraction=0.0, max_samples=None
    )
    dm = InstructDataModule(tokenizer, config)
    dm.prepare_data()
    dm.setup("validate")
    return eval_set_from_dataset(
        dm.train_dataset, dm.pad_id, config.batch_size, str(path), dm.data_format, eval_tokens
    )


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    eval_set: EvalSet,
    device: torch.device | str,
    chunk_size: int = 4096,
    per_batch: list[tuple[float, int]] | None = None,
) -> tuple[float, int]:
    """Per-token mean loss of ``model`` over the evaluation set, and the number of target tokens.

    Uses :func:`lightning_qlora.loss.causal_lm_loss`, the loss the training step computes.

    Args:
        per_batch: if given, each batch's ``(mean loss, target tokens)`` is appended to it.
    """
    from ..loss import causal_lm_loss

    was_training = model.training
    model.eval()
    loss_sum, n = 0.0, 0
    try:
        for b in eval_set.batches:
            loss, k = causal_lm_loss(
                model,
                b["input_ids"].to(device),
                b["attention_mask"].to(device),
                b["labels"].to(device),
                chunk_size,
            )
            loss_sum += float(loss) * k
            n += k
            if per_batch is not None:
                per_batch.append((float(loss), k))
    finally:
        model.train(was_training)
    return loss_sum / max(n, 1), n


# --------------------------------------------------------------------------------------------
# Formats applied to a model, in place and undone
# --------------------------------------------------------------------------------------------


def target_linears(model: nn.Module, skip_modules: Sequence[str] = SKIP_MODULES) -> list[str]:
    """The linear layers every format quantizes: all but ``skip_modules`` (QLoRA's choice)."""
    from ..nf4 import named_linears

    def skipped(name: str) -> bool:
        return any(name == p or name.endswith("." + p) for p in skip_modules)

    names = [n for n, m in named_linears(model) if isinstance(m, nn.Linear) and not skipped(n)]
    if not names:
        raise ValueError(
            f"{type(model).__name__} has no linear layers to quantize (outside {list(skip_modules)})"
        )
    return names


def check_blocksizes_fit(model: nn.Module, targets: Sequence[str], blocksizes: Iterable[int]) -> None:
    """Refuse block sizes larger than a layer's input width before anything is evaluated.

    bitsandbytes 0.50.2 quantizes such layers wrongly on CPU, and ``quantize_linears`` refuses them;
    the other formats are held to the same layers and block sizes, so the table stays comparable.

    Raises:
        ValueError: naming the block size, the layer, its width and the largest block size that fits.
    """
    narrowest = min(targets, key=lambda n: model.get_submodule(n).in_features)
    width = model.get_submodule(narrowest).in_features
    too_big = sorted(b for b in blocksizes if b > width)
    if too_big:
        fits = [b for b in BNB_BLOCKSIZES if b <= width]
        raise ValueError(
            f"--blocksizes {','.join(map(str, too_big))} is larger than the input width ({width}) of layer "
            f"'{narrowest}': bitsandbytes quantizes such a layer wrongly; use block sizes up to "
            f"{fits[-1] if fits else 32}"
        )


def _bnb_measurement(
    layer: Any, ref: torch.Tensor, fmt: str, blocksize: int, source: str, name: str
) -> Measurement:
    """Error and stored bytes of a quantized ``Linear4bit``, from its own ``Params4bit`` and ``QuantState``."""
    from ..nf4_matmul import dequantize

    weight = layer.weight
    qs = weight.quant_state

    def nbytes(t: Any) -> int:
        t = torch.as_tensor(t)
        return t.numel() * t.element_size()

    block = nbytes(weight.data) + nbytes(qs.absmax)
    tables = nbytes(qs.code)
    if qs.nested:
        block += nbytes(qs.state2.absmax)
        tables += nbytes(qs.state2.code) + nbytes(qs.offset)
    return compare(ref, dequantize(weight), fmt, blocksize, block, tables, source, name)


def _apply_bnb(
    model: nn.Module,
    targets: Sequence[str],
    fmt: str,
    blocksize: int,
    dtype: torch.dtype,
    device: torch.device,
    source: str,
) -> tuple[dict[str, nn.Module], list[Measurement]]:
    """Swap the targets for ``Linear4bit`` (quantized now, on ``device``); returns the originals."""
    from ..nf4 import QuantConfig, quantize_linears

    quant_type, double_quant = BNB_FORMATS[fmt]
    config = QuantConfig(
        quant_type=quant_type,
        double_quant=double_quant,
        blocksize=blocksize,
        compute_dtype=dtype,
        skip_modules=list(SKIP_MODULES),
    )
    originals = {name: model.get_submodule(name) for name in targets}
    try:
        chosen = quantize_linears(model, config, targets)
        if sorted(chosen) != sorted(targets):  # the same layers in every format, or the table means nothing
            raise RuntimeError(f"quantize_linears chose {len(chosen)} layers, expected {len(targets)}")
        measurements = []
        for name in targets:
            layer = model.get_submodule(name).quantize_(device)
            measurements.append(_bnb_measurement(layer, originals[name].weight, fmt, blocksize, source, name))
    except BaseException:
        _restore_layers(model, originals)
        raise
    return originals, measurements


def _restore_layers(model: nn.Module, originals: dict[str, nn.Module]) -> None:
    from ..nf4 import parent_module

    for name, layer in originals.items():
        parent, attr = parent_module(model, name)
        setattr(parent, attr, layer)


def _apply_substituted(
    model: nn.Module, targets: Sequence[str], fmt: str, blocksize: int, source: str
) -> tuple[dict[str, torch.Tensor], list[Measurement]]:
    """Put each target's dequantized weight (in the model's dtype) in place; returns the originals."""
    saved: dict[str, torch.Tensor] = {}
    measurements = []
    try:
        for name in targets:
            weight = model.get_submodule(name).weight
            q = quantize(weight, fmt, blocksize, device=weight.device)
            decoded = q.dequantized.view_as(weight).to(weight.dtype)
            measurements.append(
                compare(weight, decoded, fmt, blocksize, q.block_bytes, q.table_bytes, source, name)
            )
            saved[name] = weight.data
            weight.data = decoded
    except BaseException:
        _restore_weights(model, saved)
        raise
    return saved, measurements


def _restore_weights(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    for name, data in saved.items():
        model.get_submodule(name).weight.data = data


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class QualityRow:
    """The loss of the model in one format and block size (``fmt="none"``: unquantized)."""

    fmt: str
    blocksize: int | None
    loss: float
    target_tokens: int
    weights: Measurement | None = None  # summed over the quantized linear weights
    seconds: float = 0.0
    batches: list[tuple[float, int]] = field(default_factory=list, repr=False)  # (mean loss, tokens)

    @property
    def perplexity(self) -> float:
        """exp(per-token loss)."""
        return math.exp(self.loss)

    @property
    def label(self) -> str:
        return "unquantized" if self.fmt == BASELINE else FORMATS[self.fmt]


@dataclass
class QualityResult:
    """Loss and perplexity of a model in every format and block size, on one evaluation set."""

    model_name: str
    eval_set: dict[str, Any]
    device: str
    dtype: str
    baseline: QualityRow
    rows: list[QualityRow]
    layers: list[Measurement] = field(default_factory=list)
    quantized_params: int = 0
    total_params: int = 0
    n_linear: int = 0
    seconds: float = 0.0
    # The first quantized weight (up to 2^20 values, fp32 on the CPU), for the codebook figure.
    example_name: str = ""
    example_weight: torch.Tensor | None = None

    @property
    def totals(self) -> list[Measurement]:
        """Weight error and storage of every format and block size, over all quantized weights."""
        return [r.weights for r in self.rows if r.weights is not None]

    @property
    def baseline_bits(self) -> int:
        """Bits per weight of the unquantized linear weights (16 for bfloat16, 32 for float32)."""
        return 8 * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()

    def delta_loss(self, row: QualityRow) -> float:
        return row.loss - self.baseline.loss

    def delta_se(self, row: QualityRow) -> float:
        """Standard error of :meth:`delta_loss`, from the paired per-batch differences.

        Both losses are over the same tokens, so most of the data's own variance cancels; what is
        left is how unevenly the format moves the loss from batch to batch. It says whether a
        difference is resolved by this evaluation set (|delta| > 2 SE), not how it would generalise.
        nan with fewer than 2 batches.
        """
        return QualityResult.delta_se_of(self.baseline, row)

    @staticmethod
    def delta_se_of(reference: QualityRow, row: QualityRow) -> float:
        """Standard error of ``row.loss - reference.loss`` from their paired per-batch differences."""
        return paired_se(reference.batches, row.batches)

    def resolved(self, row: QualityRow) -> bool:
        """Whether the loss difference is more than twice its standard error."""
        se = self.delta_se(row)
        return se == se and abs(self.delta_loss(row)) > 2 * se

    def ppl_increase_pct(self, row: QualityRow) -> float:
        """Perplexity increase over the unquantized model, in percent."""
        return 100.0 * (math.exp(row.loss - self.baseline.loss) - 1.0)

    def row(self, fmt: str, blocksize: int | None) -> QualityRow | None:
        for r in [self.baseline, *self.rows]:
            if r.fmt == fmt and r.blocksize == blocksize:
                return r
        return None

    def to_json(self) -> dict[str, Any]:
        """Everything but the per-layer measurements, as plain values (``quality.json``)."""
        return {
            "model": self.model_name,
            "eval_set": self.eval_set,
            "device": self.device,
            "dtype": self.dtype,
            "quantized_params": self.quantized_params,
            "total_params": self.total_params,
            "linear_layers": self.n_linear,
            "seconds": self.seconds,
            "rows": self.as_rows(),
        }

    def as_rows(self) -> list[dict[str, Any]]:
        """One flat dict per configuration, the baseline first (CSV, JSON and W&B rows)."""
        out = []
        for r in [self.baseline, *self.rows]:
            w = r.weights
            out.append(
                {
                    "model": self.model_name,
                    "format": r.fmt,
                    "blocksize": r.blocksize,  # None for the unquantized model (empty in the CSV)
                    "loss": r.loss,
                    "perplexity": r.perplexity,
                    "delta_loss": self.delta_loss(r),
                    "delta_loss_se": 0.0 if r.fmt == BASELINE else self.delta_se(r),
                    "ppl_increase_pct": self.ppl_increase_pct(r),
                    "target_tokens": r.target_tokens,
                    "weight_mse": 0.0 if w is None else w.mse,
                    "weight_rel_mse": 0.0 if w is None else w.rel_mse,
                    "weight_max_err": 0.0 if w is None else w.max_err,
                    "bits_per_weight": float(self.baseline_bits) if w is None else w.bits_per_weight,
                    "bits_per_weight_with_tables": (
                        float(self.baseline_bits) if w is None else w.bits_per_weight_with_tables
                    ),
                    "dtype": self.dtype,
                    "device": self.device,
                }
            )
        return out


def paired_se(reference: Sequence[tuple[float, int]], other: Sequence[tuple[float, int]]) -> float:
    """Standard error of a token-weighted loss difference, from per-batch ``(mean loss, tokens)`` pairs.

    The ratio estimator's: the per-batch differences ``d_b`` weighted by their tokens ``n_b``,
    ``sqrt(B / (B - 1) * sum(n_b^2 (d_b - mean)^2)) / sum(n_b)``. nan unless both have the same
    number (at least 2) of batches.
    """
    if len(reference) < 2 or len(reference) != len(other):
        return float("nan")
    n = [k for _, k in reference]
    d = [q - b for (b, _), (q, _) in zip(reference, other, strict=True)]
    n_all = sum(n)
    mean = sum(k * x for k, x in zip(n, d, strict=True)) / n_all
    var = sum((k * (x - mean)) ** 2 for k, x in zip(n, d, strict=True)) / n_all**2
    return math.sqrt(var * len(d) / (len(d) - 1))


QUALITY_CSV_FIELDS = [
    "model",
    "format",
    "blocksize",
    "loss",
    "perplexity",
    "delta_loss",
    "delta_loss_se",
    "ppl_increase_pct",
    "target_tokens",
    "weight_mse",
    "weight_rel_mse",
    "weight_max_err",
    "bits_per_weight",
    "bits_per_weight_with_tables",
    "dtype",
    "device",
]


def default_device(device: str | None = None) -> torch.device:
    """``None``/``"auto"``: CUDA when there is one, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device} is not a device; use auto, cpu or cuda") from None
    if d.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: the study runs on cpu or cuda")
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device here; use --device cpu (or auto)")
    return d


def default_dtype(device: torch.device, dtype: str | None = None) -> torch.dtype:
    """``None``/``"auto"``: bfloat16 on a GPU; float32 on a CPU (what bitsandbytes' CPU kernels run best in)."""
    from ..nf4 import as_dtype

    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    out = as_dtype(dtype, "--dtype")
    if not out.is_floating_point:
        raise ValueError(f"--dtype {dtype} is not a floating-point dtype; use bfloat16, float16 or float32")
    return out


def evaluate_quality(
    model: nn.Module,
    eval_set: EvalSet,
    formats: Sequence[str],
    blocksizes: Sequence[int],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    model_name: str = "model",
    log: Callable[[str], None] | None = None,
) -> QualityResult:
    """The held-out loss of ``model`` unquantized and in every format and block size.

    The model is moved to ``device`` and cast to ``dtype`` (the compute dtype of a QLoRA run) and
    frozen; each configuration is applied in place and undone, so the model comes back unchanged.

    Args:
        model: a transformers causal LM.
        eval_set: the batches (:func:`eval_set_from_file`, :func:`eval_set_from_dataset`).
        formats: keys of :data:`~lightning_qlora.quant_report.formats.FORMATS`.
        blocksizes: block sizes, each at most the narrowest quantized layer's input width.
        device: where to run.
        dtype: compute dtype of the unquantized model and of the dequantized weights.
        model_name: label for the report.
        log: called with a line after each configuration (progress).

    Returns:
        The result, with per-layer weight measurements of every configuration.

    Raises:
        ValueError: bad format or block size, or a block size wider than a layer.
    """
    formats = validate_formats(formats)
    blocksizes = validate_blocksizes(blocksizes)
    device = torch.device(device)
    start = time.perf_counter()
    model.requires_grad_(False)  # frozen head: causal_lm_loss takes its chunked path, no full logits
    model.to(device=device, dtype=dtype)
    targets = target_linears(model)
    if any(f in BNB_FORMATS for f in formats):
        check_blocksizes_fit(model, targets, blocksizes)
    t = time.perf_counter()
    per_batch: list[tuple[float, int]] = []
    loss, n = evaluate_loss(model, eval_set, device, per_batch=per_batch)
    baseline = QualityRow(BASELINE, None, loss, n, None, time.perf_counter() - t, per_batch)
    if log:
        log(f"unquantized ({str(dtype).removeprefix('torch.')}): loss {loss:.4f}, ppl {math.exp(loss):.3f}")
    rows: list[QualityRow] = []
    layers: list[Measurement] = []
    for fmt in formats:
        for bs in blocksizes:
            t = time.perf_counter()
            per_batch = []
            if fmt in BNB_FORMATS:
                originals, ms = _apply_bnb(model, targets, fmt, bs, dtype, device, model_name)
                try:
                    loss, n = evaluate_loss(model, eval_set, device, per_batch=per_batch)
                finally:
                    _restore_layers(model, originals)
            else:
                saved, ms = _apply_substituted(model, targets, fmt, bs, model_name)
                try:
                    loss, n = evaluate_loss(model, eval_set, device, per_batch=per_batch)
                finally:
                    _restore_weights(model, saved)
            row = QualityRow(fmt, bs, loss, n, total(ms), time.perf_counter() - t, per_batch)
            rows.append(row)
            layers.extend(ms)
            if log:
                log(
                    f"{FORMATS[fmt]} @ {bs}: loss {loss:.4f} ({loss - baseline.loss:+.4f} "
                    f"+- {2 * QualityResult.delta_se_of(baseline, row):.4f}), "
                    f"rel. weight MSE {row.weights.rel_mse:.4g}, {row.weights.bits_per_weight:.3f} bits/weight"
                )
    quantized = sum(model.get_submodule(n).weight.numel() for n in targets)
    first = model.get_submodule(targets[0]).weight.detach()
    return QualityResult(
        model_name=model_name,
        eval_set=eval_set.summary(),
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        baseline=baseline,
        rows=rows,
        layers=layers,
        quantized_params=quantized,
        total_params=sum(p.numel() for p in model.parameters()),
        n_linear=len(targets),
        seconds=time.perf_counter() - start,
        example_name=f"{targets[0]}.weight",
        example_weight=first.reshape(-1)[: 1 << 20].to("cpu", torch.float32).clone(),
    )
