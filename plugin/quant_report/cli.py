"""The ``lightning-qlora-quant-report`` command line: parse, pick a weight source, build, write."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

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
from .quality import BNB_FORMATS, DEFAULT_EVAL_TOKENS
from .report import Report, build_report
from .sources import (
    linear_weights_from_checkpoint,
    linear_weights_from_module,
    linear_weights_from_recipe,
    model_from_config,
)

DEFAULT_OUT = "outputs/quant_report"
BNB_FORMAT_KEYS = tuple(BNB_FORMATS)  # the 4-bit bases LoRA can train over (the plugin's formats)


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

    q = p.add_argument_group(
        "model quality",
        "held-out loss and perplexity of the model unquantized and in every format and block size",
    )
    q.add_argument(
        "--eval-data",
        metavar="FILE",
        help="evaluate the model's loss on this data file (any format the app trains on)",
    )
    q.add_argument(
        "--eval-tokens",
        type=int,
        metavar="N",
        help=f"evaluate the first rows up to N target tokens (--eval-data: default {DEFAULT_EVAL_TOKENS}; "
        "a study's held-out split: all of it, or its plan's)",
    )
    q.add_argument(
        "--tokenizer", help="tokenizer for --model/--config/--random-llama (default: the model's own; 'byte')"
    )
    q.add_argument(
        "--max-length",
        type=int,
        help="tokens per evaluation row (default 512, or the recipe's data.max_length)",
    )
    q.add_argument(
        "--batch-size",
        type=int,
        help="rows per evaluation batch (default 8, or the recipe's data.batch_size)",
    )
    q.add_argument(
        "--prompt-template",
        help="instruction rows' template for --model/--config/--random-llama: alpaca (default), short, or a "
        "format string with {instruction} (use the one the model was trained with)",
    )
    q.add_argument("--device", help="auto (default: CUDA if present), cpu or cuda")
    q.add_argument(
        "--dtype", help="compute dtype of the unquantized model (default bfloat16 on CUDA, float32 on CPU)"
    )

    st = p.add_argument_group(
        "train first", "fit a model in 16-bit, then measure every format and LoRA over the 4-bit base"
    )
    st.add_argument(
        "--train-first",
        action="store_true",
        help="with --recipe: fit its model on its data first (every parameter)",
    )
    st.add_argument(
        "--stdlib-llama",
        action="store_true",
        help="train a ~100M-parameter Llama on the Python standard library's sources (GPU, ~6 min), then the study",
    )
    st.add_argument(
        "--tiny", action="store_true", help="with --stdlib-llama: a small model and corpus (CPU, ~1 min)"
    )
    st.add_argument(
        "--train-steps",
        type=int,
        help="steps of the fit (default: the recipe's trainer.max_steps / the plan's)",
    )
    st.add_argument(
        "--max-train-minutes", type=float, help="stop the fit after this long (default: none / the plan's)"
    )
    st.add_argument(
        "--lora-steps",
        type=int,
        help="LoRA steps over each base after the fit (0: none; default 100 / the plan's)",
    )
    st.add_argument(
        "--lora-formats",
        help=f"4-bit bases LoRA is fitted over, beside 16-bit (default nf4_dq; from {','.join(BNB_FORMAT_KEYS)})",
    )
    return p


def _limit(it: Iterable[tuple[str, torch.Tensor]], n: int | None) -> Iterator[tuple[str, torch.Tensor]]:
    for i, item in enumerate(it):
        if n is not None and i >= n:
            return
        yield item


def _say(message: str) -> None:
    print(f"quant-report: {message}", file=sys.stderr, flush=True)


def _check_args(args: argparse.Namespace) -> None:
    """Refuse flags that would be ignored, and out-of-range values, naming the flag and the fix."""
    source = args.model or args.recipe or args.config or args.random_llama
    study = args.train_first or args.stdlib_llama
    if args.stdlib_llama and source:
        raise ValueError("--stdlib-llama trains its own model; drop --model/--recipe/--config/--random-llama")
    if args.train_first and not args.recipe:
        raise ValueError("--train-first fits a recipe's model: add --recipe NAME (e.g. --recipe default)")
    if args.eval_data and not (source or args.stdlib_llama):
        raise ValueError(
            "--eval-data needs a model: --model DIR, --recipe NAME, --config FILE or --random-llama"
        )
    quality = bool(args.eval_data) or study
    for flag, value in (
        ("--eval-tokens", args.eval_tokens),
        ("--max-length", args.max_length),
        ("--batch-size", args.batch_size),
        ("--device", args.device),
        ("--dtype", args.dtype),
    ):
        if value is not None and not quality:
            raise ValueError(
                f"{flag} applies to the quality study: add --eval-data FILE, --train-first or --stdlib-llama"
            )
    for flag, value in (
        ("--train-steps", args.train_steps),
        ("--max-train-minutes", args.max_train_minutes),
        ("--lora-steps", args.lora_steps),
        ("--lora-formats", args.lora_formats),
    ):
        if value is not None and not study:
            raise ValueError(
                f"{flag} applies to a study that trains first: add --train-first (with --recipe) or --stdlib-llama"
            )
    if args.tiny and not args.stdlib_llama:
        raise ValueError("--tiny shrinks the --stdlib-llama study; add --stdlib-llama")
    if args.tokenizer is not None and not (args.model or args.config or args.random_llama):
        raise ValueError(
            "--tokenizer applies to --model, --config and --random-llama (a recipe names its own)"
        )
    if args.tokenizer is not None and not args.eval_data:
        raise ValueError("--tokenizer is used to tokenize --eval-data; add --eval-data FILE")
    if args.overrides and not (args.recipe or args.stdlib_llama):
        raise ValueError(
            f"Hydra overrides {' '.join(args.overrides)} apply to --recipe or --stdlib-llama only"
        )
    if quality and (args.max_tensors is not None or args.include_embeddings):
        raise ValueError(
            "--max-tensors and --include-embeddings do not apply to the quality study: it quantizes every linear "
            "layer but the output head, as QLoRA does"
        )
    for flag, value, low in (
        ("--eval-tokens", args.eval_tokens, 1),
        ("--max-length", args.max_length, 2),
        ("--batch-size", args.batch_size, 1),
        ("--train-steps", args.train_steps, 1),
        ("--lora-steps", args.lora_steps, 0),
    ):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be at least {low}, got {value}")
    if args.max_train_minutes is not None and args.max_train_minutes <= 0:
        raise ValueError(f"--max-train-minutes must be positive, got {args.max_train_minutes}")


def _lora_formats(text: str | None) -> tuple[str, ...]:
    if text is None:
        return ("nf4_dq",)
    out = tuple(dict.fromkeys(f.strip() for f in text.split(",") if f.strip()))
    bad = [f for f in out if f not in BNB_FORMAT_KEYS]
    if bad or not out:
        raise ValueError(
            f"--lora-formats {text!r}: LoRA trains over the plugin's bitsandbytes formats only; choose from "
            f"{','.join(BNB_FORMAT_KEYS)}"
        )
    return out


def _device_for_recipe(cfg: Any, flag: str | None) -> torch.device:
    from .quality import default_device

    if flag is not None:
        return default_device(flag)
    acc = str(cfg.trainer.accelerator)
    return default_device({"gpu": "cuda", "cuda": "cuda", "cpu": "cpu"}.get(acc, "auto"))


def _prepare_quality(args: argparse.Namespace, blocksizes: tuple[int, ...], formats: tuple[str, ...]) -> Any:
    """Everything that can be checked before compute: the model, its tokenizer, the data, the widths.

    Returns a zero-argument function that runs the study and returns the report's quality parts.
    """
    import dataclasses

    from .quality import (
        check_blocksizes_fit,
        default_device,
        default_dtype,
        eval_set_from_file,
        evaluate_quality,
        target_linears,
    )

    if args.stdlib_llama or args.train_first:
        from . import study as st

        settings = st.StudySettings(
            train_steps=args.train_steps,
            max_train_seconds=None if args.max_train_minutes is None else 60 * args.max_train_minutes,
            lora_steps=args.lora_steps,
            lora_formats=_lora_formats(args.lora_formats),
            eval_tokens=args.eval_tokens,
            eval_data=args.eval_data,
            formats=formats,
            blocksizes=blocksizes,
            dtype=args.dtype,
        )
        if args.stdlib_llama:
            device = default_device(args.device)
            flags = [f"data.max_length={args.max_length}"] if args.max_length is not None else []
            flags += [f"data.batch_size={args.batch_size}"] if args.batch_size is not None else []
            from .stdlib import prepare_stdlib_study

            prepared = prepare_stdlib_study(
                args.out, "tiny" if args.tiny else "full", settings, device, [*args.overrides, *flags], _say
            )
        else:
            from ..builders import compose_recipe

            try:
                cfg = compose_recipe(args.recipe, args.overrides)
            except ValueError as err:
                raise ValueError(f"--recipe {args.recipe}: {err}") from None
            cfg = _with_data_flags(cfg, args)
            prepared = st.prepare_study(
                cfg, args.recipe, settings, args.out, _device_for_recipe(cfg, args.device)
            )
        return lambda: _study_parts(st.run_study(prepared, _say))

    # --eval-data on a given model
    device = default_device(args.device)
    dtype = default_dtype(device, args.dtype)
    model, tokenizer, data_config, name = _load_model_for_eval(args)
    if args.max_length is not None or args.batch_size is not None:
        data_config = dataclasses.replace(
            data_config,
            max_length=args.max_length or data_config.max_length,
            batch_size=args.batch_size or data_config.batch_size,
        )
    eval_set = eval_set_from_file(
        args.eval_data, tokenizer, data_config, args.eval_tokens or DEFAULT_EVAL_TOKENS
    )
    vocab = model.get_input_embeddings().num_embeddings
    top = max(int(b["input_ids"].max()) for b in eval_set.batches)
    if top >= vocab:
        raise ValueError(
            f"the tokenizer produces id {top}, beyond the model's vocabulary of {vocab}: pass the model's own "
            "tokenizer with --tokenizer"
        )
    if any(f in BNB_FORMATS for f in formats):
        check_blocksizes_fit(model, target_linears(model), blocksizes)

    def run() -> tuple[Any, Any]:
        q = evaluate_quality(model, eval_set, formats, blocksizes, device, dtype, name, log=_say)
        return q, None

    return run


def _study_parts(result: Any) -> tuple[Any, Any]:
    return result.quality, result


def _with_data_flags(cfg: Any, args: argparse.Namespace) -> Any:
    from omegaconf import OmegaConf

    if args.max_length is not None:
        OmegaConf.update(cfg, "data.max_length", args.max_length)
    if args.batch_size is not None:
        OmegaConf.update(cfg, "data.batch_size", args.batch_size)
    return cfg


def _load_model_for_eval(args: argparse.Namespace) -> tuple[Any, Any, Any, str]:
    """``(model, tokenizer, data settings, name)`` for ``--eval-data`` on a given model."""
    from pathlib import Path

    from ..data import DataConfig, load_tokenizer

    if args.recipe:
        from ..builders import build_module, build_tokenizer, compose_recipe, typed

        try:
            cfg = compose_recipe(args.recipe, args.overrides)
        except ValueError as err:
            raise ValueError(f"--recipe {args.recipe}: {err}") from None
        cfg = _with_data_flags(cfg, args)
        if cfg.model.from_config is None and not Path(str(cfg.model.name_or_path)).expanduser().is_dir():
            raise ValueError(
                f"recipe {args.recipe!r} fine-tunes {cfg.model.name_or_path!r}, which is not a local directory; "
                "download it and pass --model <dir> (this report reads weights from disk, not from the hub)"
            )
        tokenizer = build_tokenizer(cfg)
        module = build_module(cfg, tokenizer)
        module.configure_model()
        return module.model, tokenizer, typed(cfg.data), f"{args.recipe}: {module.model_name}"
    data = DataConfig(max_length=512, batch_size=8, prompt_template=args.prompt_template)
    if args.model:
        from transformers import AutoModelForCausalLM

        path = Path(args.model)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"--model {path}: no config.json there; give a transformers checkpoint directory (save_pretrained)"
            )
        try:
            tokenizer = load_tokenizer(args.tokenizer or str(path))
        except (OSError, ValueError) as err:
            raise ValueError(
                f"--model {path} has no usable tokenizer ({err}); pass --tokenizer DIR, or --tokenizer byte"
            ) from None
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        return model, tokenizer, data, str(path)
    model = model_from_config(args.config, seed=args.seed)
    tokenizer = load_tokenizer(args.tokenizer or "byte")
    name = f"{args.config} (random weights)" if args.config else "tiny random Llama (random weights)"
    return model, tokenizer, data, name


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``lightning-qlora-quant-report``.

    Args:
        argv: arguments (default ``sys.argv[1:]``).

    Returns:
        0 on success; bad input exits with status 2 and one line naming the problem, before any
        training or output.
    """
    from ..messages import one_line

    parser = _parser()
    args = parser.parse_args(argv)
    start = time.perf_counter()
    run_quality = None
    try:
        _check_args(args)
        blocksizes = validate_blocksizes(args.blocksizes)
        formats = validate_formats(f.strip() for f in args.formats.split(",") if f.strip())
        if args.max_tensors is not None and args.max_tensors <= 0:
            raise ValueError(f"--max-tensors must be positive, got {args.max_tensors}")
        weights, name = None, None
        if args.eval_data or args.train_first or args.stdlib_llama:
            run_quality = _prepare_quality(args, blocksizes, formats)
        elif args.model:
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
        if run_quality is None:
            report = build_report(blocksizes, formats, args.samples, args.seed, weights, name)
    except (ValueError, FileNotFoundError) as e:
        parser.error(one_line(e))
    if run_quality is not None:
        report = _quality_report(run_quality, blocksizes, formats, args)
    files = write_report(report, args.out)
    if not args.quiet:
        sys.stdout.write(render_markdown(report))
    for f in files.all():
        print(f"wrote {f}", file=sys.stderr)
    if args.wandb:
        run_dir = log_to_wandb(report, files)
        print(f"logged to W&B run in {run_dir}", file=sys.stderr)
    if run_quality is not None:
        _say(f"done in {time.perf_counter() - start:.0f} s")
    return 0


def _quality_report(
    run: Any, blocksizes: tuple[int, ...], formats: tuple[str, ...], args: argparse.Namespace
) -> Report:
    quality, study = run()
    example = (quality.example_name, quality.example_weight) if quality.example_weight is not None else None
    report = build_report(
        blocksizes,
        formats,
        args.samples,
        args.seed,
        model_name=quality.model_name,
        measured=(quality.layers, quality.totals),
        example=example,
    )
    report.quality, report.study = quality, study
    return report
