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

What it costs in model quality: with ``--eval-data FILE`` (and a model: ``--model``, ``--recipe``,
``--config``, ``--random-llama``) the report adds the held-out loss and perplexity of the model
unquantized and in every format and block size, the bitsandbytes formats through the ``Linear4bit``
layers that train and the others by substituting their dequantized weights into the same layers
(:mod:`.quality`). ``--recipe default --train-first`` fits the recipe's model first and
``--stdlib-llama`` trains a ~100M-parameter Llama on the Python standard library's sources; both
then measure every format on held-out data and fit LoRA over the 4-bit and the 16-bit base through
``QLoRAPrecision`` (:mod:`.study`). Output: a quality section in ``report.md``, ``quality.csv``,
``quality.json`` and ``quality_vs_bits.png``.

The weight source is pluggable: :func:`evaluate_weights` takes any iterable of
``(name, tensor)`` pairs, so a recipe's model can be passed through
:func:`linear_weights_from_module` (or a state dict through :func:`select_linear_weights`).

Layout: :mod:`.formats` (codebooks, quantizers, :func:`quantize`, the checks on formats and
block sizes), :mod:`.measurement` (:class:`Measurement`, :func:`measure`,
:func:`evaluate_weights`, normal samples, equal storage), :mod:`.sources` (weights from a
module, a checkpoint, a config or a training recipe), :mod:`.report` (:class:`Report`,
:func:`build_report`), :mod:`.quality` (held-out loss per format), :mod:`.study` (fit first, LoRA
recovery, the standard-library corpus; imported on use), :mod:`.markdown`, :mod:`.figures`,
:mod:`.output` (files and W&B) and :mod:`.cli` (:func:`main`).
"""

from .cli import DEFAULT_OUT, main
from .figures import plot_codebook, plot_error_vs_bits, plot_quality
from .formats import (
    BNB_BLOCKSIZES,
    DEFAULT_BLOCKSIZES,
    DEFAULT_FORMATS,
    FORMATS,
    Quantized,
    bnb_codebook,
    derive_nf4_codebook,
    nf4_offset,
    quantize,
    std_quantile_levels,
    validate_blocksizes,
    validate_formats,
)
from .markdown import render_markdown
from .measurement import (
    DEFAULT_SAMPLES,
    EQUAL_STORAGE_TOLERANCE,
    Measurement,
    compare,
    equal_storage,
    evaluate_weights,
    measure,
    normal_samples,
)
from .output import CSV_FIELDS, ReportFiles, log_to_wandb, write_csv, write_quality_csv, write_report
from .quality import (
    QUALITY_CSV_FIELDS,
    EvalSet,
    QualityResult,
    QualityRow,
    eval_set_from_dataset,
    eval_set_from_file,
    evaluate_loss,
    evaluate_quality,
)
from .report import Report, all_measurements, build_report
from .sources import (
    TINY_LLAMA,
    is_linear_weight,
    linear_weights_from_checkpoint,
    linear_weights_from_module,
    linear_weights_from_recipe,
    model_from_config,
    select_linear_weights,
)

__all__ = [
    "BNB_BLOCKSIZES",
    "CSV_FIELDS",
    "DEFAULT_BLOCKSIZES",
    "DEFAULT_FORMATS",
    "DEFAULT_OUT",
    "DEFAULT_SAMPLES",
    "EvalSet",
    "EQUAL_STORAGE_TOLERANCE",
    "FORMATS",
    "Measurement",
    "QUALITY_CSV_FIELDS",
    "QualityResult",
    "QualityRow",
    "Quantized",
    "Report",
    "ReportFiles",
    "TINY_LLAMA",
    "all_measurements",
    "bnb_codebook",
    "build_report",
    "compare",
    "derive_nf4_codebook",
    "equal_storage",
    "eval_set_from_dataset",
    "eval_set_from_file",
    "evaluate_loss",
    "evaluate_quality",
    "evaluate_weights",
    "is_linear_weight",
    "linear_weights_from_checkpoint",
    "linear_weights_from_module",
    "linear_weights_from_recipe",
    "log_to_wandb",
    "main",
    "measure",
    "model_from_config",
    "nf4_offset",
    "normal_samples",
    "plot_codebook",
    "plot_error_vs_bits",
    "plot_quality",
    "quantize",
    "render_markdown",
    "select_linear_weights",
    "std_quantile_levels",
    "validate_blocksizes",
    "validate_formats",
    "write_csv",
    "write_quality_csv",
    "write_report",
]
