"""Loading a base (+ adapter) for inference, and the merged 16-bit export.

``load_model`` rebuilds an HF causal LM the way training built it (4-bit base, adapter loaded);
``export_merged`` (console script ``lightning-qlora-export``) merges the adapter into the base and
writes a plain ``save_pretrained`` checkpoint. Both rebuild the base through :func:`resolve_quant`,
the one place a ``quant=`` / ``--quant`` choice and the adapter's saved ``qlora_config.json`` turn
into a :class:`~lightning_qlora.QuantConfig` and a compute dtype.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import (
    adapter_lora_config,
    load_adapter,
    merge_adapter,
    read_adapter_config,
    read_qlora_config,
    target_names,
)
from .lora import LoRAConfig
from .nf4 import QuantConfig, as_dtype, dtype_name


def resolve_quant(
    quant: QuantConfig | str | None = "auto",
    adapter: str | os.PathLike | None = None,
    compute_dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = "cpu",
    blocksize: int | None = None,
    double_quant: bool | None = None,
) -> tuple[QuantConfig | None, torch.dtype]:
    """How to rebuild a base: ``quant`` resolved against the adapter's saved ``qlora_config.json``.

    Args:
        quant: ``"auto"`` (the adapter's saved quantization; nf4 for an adapter without
            ``qlora_config.json``, e.g. PEFT's; none without an adapter), ``"nf4"`` or ``"fp4"`` (that
            type, the other settings as saved), ``"none"``/None (16-bit base), or a QuantConfig.
        adapter: the adapter directory, or None.
        compute_dtype: the compute dtype; default float32 on the CPU (its bf16 matmuls are slow), the
            saved one (else bfloat16) on an accelerator.
        device: where the model will compute. None: nowhere, it is only merged and saved; the saved
            compute dtype (else float32) then rebuilds training's 4-bit codes exactly, since weights
            are cast to the compute dtype before they are quantized.
        blocksize: overrides the quantization block size (needs a quantized base).
        double_quant: overrides double quantization (needs a quantized base).

    Returns:
        The QuantConfig (with the resolved compute dtype), or None for a 16-bit base; and the
        compute dtype.

    Raises:
        ValueError: a malformed ``qlora_config.json``, an invalid setting, or an override of a
            16-bit base.
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


def load_model(
    base: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    quant: QuantConfig | None | str = "auto",
    compute_dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = "cpu",
) -> nn.Module:
    """An HF causal LM from ``base`` (+ a LoRA adapter), built the way training built it.

    Args:
        base: a ``save_pretrained`` directory or hub id of the 16-bit base model.
        adapter: an adapter directory (ours or PEFT's); None for the plain (or merged) model.
        quant: ``"auto"`` (the adapter's saved ``qlora_config.json`` quantization; nf4 for an adapter
            without one; none without an adapter), ``"nf4"``, ``"fp4"``, ``"none"``/None, or a QuantConfig.
        compute_dtype: dtype of the forward pass (default: saved setting, else float32 on CPU and
            bfloat16 on a GPU).
        device: where the model runs; 4-bit weights are quantized there, layer by layer. None leaves
            the model on the host with its 4-bit weights not yet quantized (``merge_adapter`` then
            quantizes each on its work device).

    Returns:
        The model in eval mode, converted by ``QLoRAPrecision`` when quantized or adapted.
    """
    from transformers import AutoModelForCausalLM

    from .precision import QLoRAPrecision

    device = torch.device(device) if device is not None else None
    # A model left on the host computes there: the CPU's default compute dtype.
    quant, dtype = resolve_quant(quant, adapter, compute_dtype, device if device is not None else "cpu")
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype)
    if getattr(model.config, "quantization_config", None) is not None:
        raise ValueError(f"'{base}' is a pre-quantized checkpoint; give the 16-bit base model")
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


def export_merged(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    dtype: str | torch.dtype = "bfloat16",
    max_shard_size: str | int = "2GB",
    device: str | torch.device = "cpu",
    quant: QuantConfig | None | str = "auto",
    tokenizer: str | None = None,
) -> Path:
    """Writes base + adapter as one 16-bit ``save_pretrained`` checkpoint that plain transformers loads.

    The base is rebuilt exactly as in training (4-bit with the adapter's saved quantization settings,
    unless ``quant`` says otherwise), the adapter loaded, each layer dequantized and merged on
    ``device`` and moved to the host, then everything saved as sharded safetensors, with the base's
    tokenizer when it has one.

    Args:
        base: the 16-bit base model (directory or hub id).
        adapter: the adapter directory.
        out: the output directory.
        dtype: ``bf16``, ``fp16`` (or ``fp32``) for the merged weights.
        max_shard_size: largest safetensors shard, e.g. ``"2GB"``.
        device: where layers are dequantized and merged (``cuda`` for speed; host memory holds the result).
        quant: as in :func:`load_model`.
        tokenizer: tokenizer to save with the model (default: the base's, if it has one).

    Returns:
        The output directory.
    """
    out_dtype = as_dtype(dtype, "dtype")
    # device=None: training's compute dtype, so the 4-bit base is training's to the bit.
    quant, compute_dtype = resolve_quant(quant, adapter, device=None)
    # Built on the host, not quantized yet: merge_adapter quantizes and merges one layer at a time on ``device``.
    model = load_model(base, adapter, quant=quant, compute_dtype=compute_dtype, device=None)
    merge_adapter(model, dtype=out_dtype, device=device)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = out_dtype
    out = Path(out)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    tok = _load_tokenizer(tokenizer or str(base), required=tokenizer is not None)
    if tok is not None:
        tok.save_pretrained(out)
    return out


def _load_tokenizer(name: str, required: bool) -> Any:
    from .data import load_tokenizer

    try:
        return load_tokenizer(name)
    except (OSError, ValueError, TypeError):  # a base without tokenizer files is exported without one
        if required:
            raise
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """``lightning-qlora-export``: merge an adapter into its base and save a 16-bit HF model."""
    parser = argparse.ArgumentParser(
        prog="lightning-qlora-export",
        description="Merge a LoRA adapter into its (4-bit-trained) base and save a 16-bit transformers model.",
    )
    parser.add_argument(
        "--base", required=True, help="16-bit base model: save_pretrained directory or hub id"
    )
    parser.add_argument("--adapter", required=True, help="adapter directory (lightning-qlora or PEFT)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="merged weight dtype"
    )
    parser.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    parser.add_argument(
        "--device", default="cpu", help="where layers are dequantized and merged: cpu or cuda"
    )
    parser.add_argument(
        "--quant",
        default="auto",
        choices=["auto", "nf4", "fp4", "none"],
        help="base quantization used in training (auto: the adapter's qlora_config.json, else nf4)",
    )
    parser.add_argument("--blocksize", type=int, default=None, help="override the quantization block size")
    parser.add_argument(
        "--double-quant", default=None, choices=["true", "false"], help="override double quantization"
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer to save (default: the base's, if any)")
    args = parser.parse_args(argv)
    if args.quant == "none" and (args.blocksize is not None or args.double_quant is not None):
        parser.error("--blocksize/--double-quant need a quantized base; drop them or pass --quant nf4")
    double_quant = None if args.double_quant is None else args.double_quant == "true"
    try:
        quant, _ = resolve_quant(
            args.quant, args.adapter, device=None, blocksize=args.blocksize, double_quant=double_quant
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
        )
    except ValueError as err:
        print(f"lightning-qlora-export: error: {err}", file=sys.stderr)
        return 2
    print(f"merged model ({dtype_name(as_dtype(args.dtype, 'dtype'))}) written to {out}")
    return 0


__all__ = ["export_merged", "load_model", "main", "resolve_quant"]
