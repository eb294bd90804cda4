"""The ``lightning-qlora-quant-report`` command line: parse, pick a weight source, build, write."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator, Sequence

import torch

from .formats import (
    BNB_BLOCKSIZES,
    DEFAULT_BLOCKSIZES,
    DEFAULT_FORMATS,
    FORMATS,
    validate_blocksizes,
    validate_formats,
)
from .markdown import render_markdown
from .measurement import DEFAULT_SAMPLES
from .output import log_to_wandb, write_report
from .report import build_report
from .sources import (
    linear_weights_from_checkpoint,
    linear_weights_from_module,
    linear_weights_from_recipe,
    model_from_config,
)

DEFAULT_OUT = "outputs/quant_report"


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


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
        formats = validate_formats(f.strip() for f in args.formats.split(",") if f.strip())
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
