"""Loading a base (+ adapter) for inference, and the merged export.

``load_model`` rebuilds an HF causal LM the way training built it (4-bit base, adapter loaded);
``export_merged`` (console script ``lightning-qlora-export``) merges the adapter into the base and
writes a plain ``save_pretrained`` checkpoint (or, asked to, a re-quantized 4-bit one). The base is
a 16-bit model, quantized here as training quantized it, or a bitsandbytes 4-bit checkpoint, used
as it is: loaded straight into the plugin's 4-bit layers, and merged by streaming it layer by
layer (:mod:`.checkpoint4bit_merge`). Both go through :func:`resolve_quant`, the one place a
``quant=`` / ``--quant`` choice, the adapter's saved ``qlora_config.json`` and a 4-bit base's own
settings turn into a :class:`~lightning_qlora.QuantConfig` and a compute dtype.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import (
    adapter_lora_config,
    load_adapter,
    merge_adapter,
    read_adapter,
    read_adapter_config,
    read_qlora_config,
    target_names,
)
from .checkpoint4bit import BNB_4BIT, read_4bit_checkpoint
from .checkpoint4bit_check import checkpoint_quant, linear_names
from .checkpoint4bit_load import load_4bit_checkpoint, locate_checkpoint
from .lora import LoRAConfig
from .messages import EXIT_USAGE, one_line
from .nf4 import QuantConfig, as_dtype, dtype_name, name_matches, quantize_linears

PROG = "lightning-qlora-export"


def resolve_quant(
    quant: QuantConfig | str | None = "auto",
    adapter: str | os.PathLike | None = None,
    compute_dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = "cpu",
    blocksize: int | None = None,
    double_quant: bool | None = None,
    base: str | os.PathLike | None = None,
    where: str = "base",
) -> tuple[QuantConfig | None, torch.dtype]:
    """How to rebuild a base: ``quant`` resolved against the adapter's saved ``qlora_config.json``.

    A bitsandbytes 4-bit ``base`` fixes the quantization itself (its bytes are what the model
    computes with), so there ``quant`` and the overrides can only confirm it, and ``"auto"`` also
    checks that the adapter was trained on a base quantized the same way (:func:`_checkpoint_settings`).

    Args:
        quant: ``"auto"`` (the adapter's saved quantization; nf4 for an adapter without
            ``qlora_config.json``, e.g. PEFT's; none without an adapter; a 4-bit base's own
            settings), ``"nf4"`` or ``"fp4"`` (that type, the other settings as saved; with a 4-bit
            base: it must be the base's, and it applies the adapter whatever it was trained on),
            ``"none"``/None (16-bit base), or a QuantConfig.
        adapter: the adapter directory, or None.
        compute_dtype: the compute dtype; default float32 on the CPU (its bf16 matmuls are slow), the
            saved one (else bfloat16) on an accelerator.
        device: where the model will compute. None: nowhere, it is only merged and saved; the saved
            compute dtype (else float32) then rebuilds training's 4-bit codes exactly, since weights
            are cast to the compute dtype before they are quantized.
        blocksize: overrides the quantization block size (needs a quantized base).
        double_quant: overrides double quantization (needs a quantized base).
        base: the base model, when known: a bitsandbytes 4-bit checkpoint's settings then win.
        where: the setting that named ``base`` (``--model``, ``--base``), for messages.

    Returns:
        The QuantConfig (with the resolved compute dtype), or None for a 16-bit base; and the
        compute dtype.

    Raises:
        ValueError: a malformed ``qlora_config.json``, an invalid setting, an override of a 16-bit
            base, a base quantized another way than bitsandbytes 4-bit, or settings (or an adapter)
            that contradict a 4-bit base.
        FileNotFoundError: a local-looking ``base`` that does not exist.
    """
    saved = read_qlora_config(adapter) if adapter is not None else None
    saved_quant = (saved or {}).get("quant")
    if saved_quant is not None and not saved_quant.get("enabled", True):
        saved_quant = None  # trained on a 16-bit base
    if compute_dtype is None:
        saved_dtype = (saved_quant or {}).get("compute_dtype")
        if device is None:
            compute_dtype = saved_dtype or torch.float32
        elif torch.device(device).type == "cpu":
            compute_dtype = torch.float32
        else:
            compute_dtype = saved_dtype or torch.bfloat16
    dtype = as_dtype(compute_dtype, "compute_dtype")
    overrides = {
        key: value
        for key, value in (("blocksize", blocksize), ("double_quant", double_quant))
        if value is not None
    }
    if base is not None:
        source, method = locate_checkpoint(base, where=where)
        if method == BNB_4BIT:
            trained = None if saved is None else (saved_quant, adapter)
            return _checkpoint_settings(source, base, where, quant, overrides, trained, dtype), dtype
        if method is not None:
            raise ValueError(
                f"{where}='{base}' is quantized with {method}; give its 16-bit model or a bitsandbytes 4-bit "
                "checkpoint (lightning-qlora-quantize makes one from the 16-bit model)"
            )
    fields: dict[str, Any] | None
    if isinstance(quant, QuantConfig):
        fields = quant.to_dict() if quant.enabled else None
    elif quant is None or quant == "none":
        fields = None
    elif quant == "auto":
        if overrides:  # an override asks for a quantized base: the saved settings, else the defaults
            fields = dict(saved_quant or {})
        elif adapter is None:
            fields = None
        elif saved is not None:
            fields = None if saved_quant is None else dict(saved_quant)
        else:  # a PEFT adapter: QLoRA's nf4 (QuantConfig's defaults)
            fields = {}
    else:
        fields = {**(saved_quant or {}), "quant_type": quant}
    if fields is None:
        if overrides:
            raise ValueError(
                f"quant={quant!r} keeps the base in 16-bit, so "
                f"{', '.join(f'{k}={v!r}' for k, v in overrides.items())} cannot apply; drop "
                f"{'/'.join(overrides)} or use quant='nf4'"
            )
        return None, dtype
    return QuantConfig(**{**fields, **overrides, "compute_dtype": dtype}), dtype


def _describe(quant: QuantConfig) -> str:
    return f"{quant.quant_type}, blocksize {quant.blocksize}, double quant {'on' if quant.double_quant else 'off'}"


def _differences(file: QuantConfig, other: QuantConfig, linears: Sequence[str]) -> list[str]:
    """How ``other`` quantizes differently from a checkpoint's ``file`` settings (compute and storage dtypes aside)."""
    diffs = [
        f"{key} {getattr(other, key)} vs {getattr(file, key)}"
        for key in ("quant_type", "blocksize", "double_quant")
        if getattr(other, key) != getattr(file, key)
    ]
    mine = {n for n in linears if not name_matches(n, other.skip_modules)}
    theirs = {n for n in linears if not name_matches(n, file.skip_modules)}
    if mine != theirs:
        diffs.append(f"4-bit layers {sorted(mine ^ theirs)[:3]} differ")
    return diffs


def _checkpoint_settings(
    source: str,
    base: str | os.PathLike,
    where: str,
    quant: QuantConfig | str | None,
    overrides: dict[str, Any],
    trained: tuple[dict[str, Any] | None, Any] | None,
    dtype: torch.dtype,
) -> QuantConfig:
    """The QuantConfig of a 4-bit base, after checking that nothing asked for contradicts it.

    Args:
        source: the checkpoint's local directory.
        base: the name it was given by, for messages.
        where: the setting that named it.
        quant: as in :func:`resolve_quant`.
        overrides: ``blocksize`` / ``double_quant`` asked for.
        trained: for an adapter with a ``qlora_config.json``: the quantization it was trained with
            (None: a 16-bit base) and its directory; None otherwise (nothing to check it against).
        dtype: the compute dtype.

    Raises:
        ValueError: one line with the contradiction and the fix.
    """
    file = checkpoint_quant(source, compute_dtype=dtype, where=where)
    named = f"{where}='{base}' is a 4-bit checkpoint ({_describe(file)})"
    if quant is None or quant == "none" or (isinstance(quant, QuantConfig) and not quant.enabled):
        raise ValueError(
            f"{named}, but quant=none asks for a 16-bit base; drop it (auto uses the checkpoint as it is) or give "
            "the 16-bit model"
        )
    for key, value in overrides.items():
        if value != getattr(file, key):
            raise ValueError(
                f"{named}, so {key}={value} cannot apply (its bytes fix the quantization); drop that override, or "
                "give the 16-bit model to quantize with it"
            )
    if isinstance(quant, QuantConfig):
        diffs = _differences(file, quant, linear_names(source))
        if diffs:
            raise ValueError(
                f"{named}; the QuantConfig asked for differs ({'; '.join(diffs)}, asked vs checkpoint); pass "
                "quant='auto' to use the checkpoint as it is, or give the 16-bit model to quantize otherwise"
            )
        return file
    if quant != "auto":
        if quant != file.quant_type:
            raise ValueError(
                f"{named}, so quant={quant} cannot apply; use quant={file.quant_type} or auto, or give the 16-bit "
                f"model to quantize it as {quant}"
            )
        return file  # named explicitly: the adapter goes onto this checkpoint whatever it was trained on
    if trained is not None:
        saved_quant, adapter = trained
        anyway = f"or pass --quant {file.quant_type} to apply it to this checkpoint anyway"
        if saved_quant is None:
            raise ValueError(
                f"adapter '{adapter}' was trained on a 16-bit base (its qlora_config.json says quant none) but "
                f"{named}; give that 16-bit base, {anyway}"
            )
        diffs = _differences(file, QuantConfig(**saved_quant), linear_names(source))
        if diffs:
            raise ValueError(
                f"adapter '{adapter}' was trained on a base quantized otherwise ({'; '.join(diffs)}, training vs "
                f"checkpoint; its qlora_config.json) but {named}; give the 4-bit checkpoint it was trained on or its "
                f"16-bit base (quantized here as in training), {anyway}"
            )
    return file


def load_model(
    base: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    quant: QuantConfig | None | str = "auto",
    compute_dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = "cpu",
    progress: bool = False,
    where: str = "base",
) -> nn.Module:
    """An HF causal LM from ``base`` (+ a LoRA adapter), built the way training built it.

    Args:
        base: a ``save_pretrained`` directory or hub id of the base model: 16-bit (quantized here,
            as training quantized it) or a bitsandbytes 4-bit checkpoint (its packed weights go into
            the plugin's 4-bit layers as they are, on ``device``; never re-quantized).
        adapter: an adapter directory (ours or PEFT's); None for the plain (or merged) model.
        quant: ``"auto"`` (the adapter's saved ``qlora_config.json`` quantization; nf4 for an adapter
            without one; none without an adapter; a 4-bit base's own), ``"nf4"``, ``"fp4"``,
            ``"none"``/None, or a QuantConfig; see :func:`resolve_quant`.
        compute_dtype: dtype of the forward pass (default: saved setting, else float32 on CPU and
            bfloat16 on a GPU).
        device: where the model runs; 4-bit weights are quantized there, layer by layer. None leaves
            the model on the host with its 4-bit weights not yet quantized (``merge_adapter`` then
            quantizes each on its work device); a 4-bit base is loaded onto the host then.
        progress: show a progress bar while a 4-bit base loads.
        where: the setting that named ``base`` (``--model``), for messages.

    Returns:
        The model in eval mode, converted by ``QLoRAPrecision`` when quantized or adapted.

    Raises:
        ValueError: settings, or an adapter, that do not fit the base (one line each; a 4-bit base is
            checked against the adapter before a weight is read).
    """
    from transformers import AutoModelForCausalLM

    from .precision import QLoRAPrecision

    device = torch.device(device) if device is not None else None
    # A model left on the host computes there: the CPU's default compute dtype.
    quant, dtype = resolve_quant(
        quant, adapter, compute_dtype, device if device is not None else "cpu", base=base, where=where
    )
    source, method = locate_checkpoint(base, where=where)
    if method == BNB_4BIT:
        return _load_4bit(source, adapter, quant, dtype, device, progress, where)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    if quant is not None or adapter is not None:
        if adapter is not None:
            lora = adapter_lora_config(read_adapter_config(adapter), target_modules=target_names(adapter))
        else:
            lora = LoRAConfig()
        QLoRAPrecision(quant=quant, lora=lora, compute_dtype=dtype).convert_module(model)
        if adapter is not None:
            load_adapter(model, adapter)
    if device is not None:  # 4-bit weights are quantized on arrival there
        model.to(device)
    return model.eval()


def _load_4bit(
    source: str,
    adapter: str | os.PathLike | None,
    quant: QuantConfig | None,
    dtype: torch.dtype,
    device: torch.device | None,
    progress: bool,
    where: str,
) -> nn.Module:
    """A 4-bit checkpoint loaded as it is under ``QLoRAPrecision``, with the adapter checked against it first."""
    from .checkpoint4bit_merge import check_adapter_fits
    from .precision import QLoRAPrecision

    lora = LoRAConfig()
    if adapter is not None:
        cfg, pairs = read_adapter(adapter)
        check_adapter_fits(read_4bit_checkpoint(source, where), adapter, cfg, pairs, where)
        lora = adapter_lora_config(cfg, target_modules=list(pairs))
    plugin = QLoRAPrecision(quant=quant, lora=lora, compute_dtype=dtype)
    model = load_4bit_checkpoint(source, plugin, dtype=dtype, device=device or "cpu", progress=progress)
    if adapter is not None:
        load_adapter(model, adapter)
    return model.eval()


def export_merged(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    dtype: str | torch.dtype = "bfloat16",
    max_shard_size: str | int = "2GB",
    device: str | torch.device = "cpu",
    quant: QuantConfig | None | str = "auto",
    tokenizer: str | None = None,
    quantize: bool = False,
    progress: bool = False,
    where: str = "base",
) -> Path:
    """Writes base + adapter as one merged checkpoint: 16-bit (plain transformers loads it), or re-quantized.

    A 16-bit base is rebuilt exactly as in training (4-bit with the adapter's saved quantization
    settings, unless ``quant`` says otherwise), the adapter loaded, each layer dequantized and
    merged on ``device`` and moved to the host, then everything saved as sharded safetensors, with
    the base's tokenizer when it has one. A bitsandbytes 4-bit base is merged as PEFT's
    ``merge_and_unload`` merges one (each weight dequantized to 16-bit, ``B @ A * scaling`` added),
    streamed layer by layer from its shards, so the host never holds the 16-bit model
    (:func:`~.checkpoint4bit_merge.merge_4bit_checkpoint`).

    Args:
        base: the base model (directory or hub id): 16-bit, or a bitsandbytes 4-bit checkpoint.
        adapter: the adapter directory.
        out: the output directory (new or empty; written in full or not at all).
        dtype: ``bf16``, ``fp16`` (or ``fp32``) for the merged weights.
        max_shard_size: largest safetensors shard, e.g. ``"2GB"``.
        device: where layers are dequantized and merged (``cuda`` for speed; host memory holds the
            result, or one shard of it for a 4-bit base).
        quant: as in :func:`load_model`.
        tokenizer: tokenizer to save with the model (default: the base's, if it has one).
        quantize: write the merged model as a bitsandbytes 4-bit checkpoint instead: each merged
            weight is quantized again (lossy: a second 4-bit rounding), with the 4-bit base's
            settings, or the training quantization (default nf4) for a 16-bit base; ``dtype`` is then
            that of the 16-bit tensors and the compute dtype it records.
        progress: show a progress bar while a 4-bit base is merged.
        where: the setting that named ``base`` (``--base``), for messages.

    Returns:
        The output directory.
    """
    from .checkpoint4bit_write import parse_size, save_4bit_checkpoint, staged_output

    out_dtype = as_dtype(dtype, "dtype")
    max_shard_size = parse_size(max_shard_size)  # refused now, not after the merge
    # device=None: training's compute dtype, so the 4-bit base is training's to the bit.
    quant, compute_dtype = resolve_quant(quant, adapter, device=None, base=base, where=where)
    source, method = locate_checkpoint(base, where=where)
    tok = _load_tokenizer(tokenizer, required=True) if tokenizer is not None else None
    if method == BNB_4BIT:
        from .checkpoint4bit_merge import merge_4bit_checkpoint

        return merge_4bit_checkpoint(
            source, adapter, out, out_dtype, max_shard_size, device, quantize, tok, progress, where
        )
    with staged_output(out, "--out") as staging:
        # Built on the host, not quantized yet: merge_adapter quantizes and merges one layer at a time on ``device``.
        model = load_model(
            source, adapter, quant=quant, compute_dtype=compute_dtype, device=None, where=where
        )
        merge_adapter(model, dtype=out_dtype, device=device)
        if tok is None:
            tok = _load_tokenizer(str(base), required=False)
        if quantize:
            requant = replace(quant or QuantConfig(), compute_dtype=out_dtype)
            quantize_linears(model, requant)
            save_4bit_checkpoint(model, staging, max_shard_size, tokenizer=tok)
        else:
            config = model.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            config.dtype = out_dtype
            model.save_pretrained(staging, max_shard_size=max_shard_size)
            if tok is not None:
                tok.save_pretrained(staging)
    return Path(out)


def _load_tokenizer(name: str, required: bool) -> Any:
    from .data import load_tokenizer

    try:
        return load_tokenizer(name)
    except (OSError, ValueError, TypeError):  # a base without tokenizer files is exported without one
        if required:
            raise
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """``lightning-qlora-export``: merge an adapter into its base and save a 16-bit (or re-quantized 4-bit) model."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Merge a LoRA adapter into its base and save a 16-bit transformers model. The base is the "
        "16-bit model the adapter was trained from (quantized here as in training) or a bitsandbytes 4-bit "
        "checkpoint; either way each 4-bit weight is dequantized to 16-bit and B @ A * scaling added (what PEFT's "
        "merge_and_unload does for a 4-bit base), one layer at a time. --quantize re-quantizes the result.",
    )
    parser.add_argument(
        "--base",
        required=True,
        help="base model: the 16-bit one (save_pretrained directory or hub id) or a bitsandbytes 4-bit checkpoint "
        "(lightning-qlora-quantize's output, a ...-bnb-4bit repo), merged streaming shard by shard",
    )
    parser.add_argument("--adapter", required=True, help="adapter directory (lightning-qlora or PEFT)")
    parser.add_argument("--out", required=True, help="output directory (new or empty)")
    parser.add_argument(
        "--dtype",
        default="bf16",
        choices=["bf16", "fp16", "fp32"],
        help="merged weight dtype (with --quantize: of the 16-bit tensors and the recorded compute dtype)",
    )
    parser.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    parser.add_argument(
        "--device", default="cpu", help="where layers are dequantized and merged: cpu or cuda"
    )
    parser.add_argument(
        "--quant",
        default="auto",
        choices=["auto", "nf4", "fp4", "none"],
        help="base quantization used in training (auto: the adapter's qlora_config.json, else nf4; a 4-bit base's "
        "own settings, checked against the adapter's; naming the 4-bit base's type applies the adapter anyway)",
    )
    parser.add_argument("--blocksize", type=int, default=None, help="override the quantization block size")
    parser.add_argument(
        "--double-quant", default=None, choices=["true", "false"], help="override double quantization"
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer to save (default: the base's, if any)")
    parser.add_argument(
        "--quantize",
        action="store_true",
        help="write a bitsandbytes 4-bit checkpoint instead: re-quantizes the merged weights (lossy: a second 4-bit "
        "rounding) with the 4-bit base's settings, or the training quantization for a 16-bit base",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.quant == "none" and (args.blocksize is not None or args.double_quant is not None):
        parser.error("--blocksize/--double-quant need a quantized base; drop them or pass --quant nf4")
    double_quant = None if args.double_quant is None else args.double_quant == "true"
    dtype = dtype_name(as_dtype(args.dtype, "--dtype"))
    try:
        _, method = locate_checkpoint(args.base, where="--base")
        quant, _ = resolve_quant(
            args.quant,
            args.adapter,
            device=None,
            blocksize=args.blocksize,
            double_quant=double_quant,
            base=args.base,
            where="--base",
        )
        out = export_merged(
            args.base,
            args.adapter,
            args.out,
            args.dtype,
            args.max_shard_size,
            args.device,
            quant,
            args.tokenizer,
            quantize=args.quantize,
            progress=not args.no_progress,
            where="--base",
        )
    except (ValueError, OSError) as err:
        print(f"{PROG}: error: {one_line(err)}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    what = f"the 4-bit base ({quant.quant_type}) dequantized" if method == BNB_4BIT else "the base"
    done = f"merged model written to {out}: {what}, the adapter added (W + B @ A * scaling)"
    if args.quantize:
        requant = quant.quant_type if quant is not None else QuantConfig().quant_type
        print(
            f"{done}, then re-quantized to {requant} (lossy: a second 4-bit rounding); 16-bit tensors in {dtype}"
        )
    else:
        print(f"{done}, saved in {dtype}")
    return 0


__all__ = ["export_merged", "load_model", "main", "resolve_quant"]
