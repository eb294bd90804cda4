"""Plugin settings held against a bitsandbytes 4-bit checkpoint, before anything loads.

The packed bytes of a 4-bit checkpoint fix its quantization type, block size, double quantization and
which layers are 4-bit: :func:`check_quant` refuses settings that contradict them (naming every
difference and the overrides that match), :func:`preflight_checkpoint` runs that check on a directory
without reading a weight, and :func:`checkpoint_quant` gives the settings that match. Reading the
checkpoint's layout is :mod:`.checkpoint4bit`'s; loading it, :mod:`.checkpoint4bit_load`'s.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from .checkpoint4bit import (
    BNB_4BIT,
    Checkpoint4bit,
    quantization_method,
    read_4bit_checkpoint,
    read_config,
)
from .nf4 import (
    QuantConfig,
    name_matches,
    named_linears,
)


def _short_skip_list(keep: Sequence[str], linears: Sequence[str]) -> list[str]:
    """The shortest ``skip_modules`` spelling that selects exactly ``keep`` among ``linears``: leaf names where possible."""
    keep_set, out = set(keep), []
    for name in keep:
        leaf = name.rsplit(".", 1)[-1]
        if {n for n in linears if name_matches(n, [leaf])} <= keep_set:
            name = leaf
        if name not in out:
            out.append(name)
    return out


def check_quant(
    ckpt: Checkpoint4bit, quant: QuantConfig | None, linears: Sequence[str], where: str = "model.name_or_path"
) -> None:
    """Refuses plugin settings that contradict what a 4-bit checkpoint holds, naming every difference.

    The packed bytes fix the quantization type, block size, double quantization and which layers
    are 4-bit: honouring other settings would need the 16-bit weights. The compute dtype only
    decides the arithmetic, so the plugin's is used; the storage dtype only reinterprets the same
    bytes, so the plugin's is used too (FSDP wants the compute dtype there).

    Args:
        ckpt: the checkpoint (:func:`read_4bit_checkpoint`).
        quant: the plugin's settings; None (16-bit LoRA) is refused.
        linears: qualified names of the model's linear layers.
        where: the setting that named the checkpoint, for the message.

    Raises:
        ValueError: one line with the differences and the overrides that match the checkpoint.
    """
    src = f"{where}='{ckpt.path}' is a 4-bit ({ckpt.quant.quant_type}) checkpoint"
    if quant is None or not quant.enabled:
        raise ValueError(
            f"{src}, but quant=none asks for 16-bit base weights; use quant={ckpt.quant.quant_type} or point it at "
            "the 16-bit model"
        )
    theirs = ckpt.quant
    diffs, fixes = [], []

    def shown(value: Any) -> str:  # as a Hydra override spells it
        return str(value).lower() if isinstance(value, bool) else str(value)

    for key in ("quant_type", "blocksize", "double_quant"):
        mine, file = getattr(quant, key), getattr(theirs, key)
        if mine != file:
            diffs.append(f"quant.{key}: checkpoint {shown(file)}, plugin {shown(mine)}")
            fixes.append(f"quant.{key}={shown(file)}")
    quantized = set(ckpt.layers)
    unknown = sorted(quantized - set(linears))
    if unknown:
        raise ValueError(
            f"{src} whose 4-bit weights {unknown[:3]} are not linear layers of the model its config.json builds; "
            "the checkpoint does not match its own config"
        )
    wanted = {n for n in linears if not name_matches(n, quant.skip_modules)}
    kept = [n for n in linears if n not in quantized]
    if wanted != quantized:
        would_quantize = sorted(wanted - quantized)
        would_keep = sorted(quantized - wanted)
        if would_quantize:
            diffs.append(f"16-bit in the checkpoint, quantized by quant.skip_modules: {would_quantize[:4]}")
        if would_keep:
            diffs.append(f"4-bit in the checkpoint, kept 16-bit by quant.skip_modules: {would_keep[:4]}")
        fixes.append(f"quant.skip_modules=[{','.join(_short_skip_list(kept, linears))}]")
    if diffs:
        raise ValueError(
            f"{src} and the quantization settings contradict it ({'; '.join(diffs)}); set {' '.join(fixes)} to "
            "use it as quantized, or point it at the 16-bit model to quantize with other settings"
        )


def _other_method(src: str, method: str) -> str:
    return (
        f"{src} is quantized with {method}; lightning-qlora trains from a 16-bit checkpoint or a bitsandbytes "
        "4-bit one (lightning-qlora-quantize makes one from the 16-bit model)"
    )


def preflight_checkpoint(
    path: str | os.PathLike,
    quant: QuantConfig | None,
    trust_remote_code: bool = False,
    where: str = "model.name_or_path",
) -> str | None:
    """Checks, before anything loads, that a local checkpoint can train under ``quant``.

    Reads config.json, the safetensors headers and the 4-bit layers' quant-state blobs, and builds
    the model on the meta device for its layer names: no weights are read.

    Returns:
        :data:`BNB_4BIT` for a bitsandbytes 4-bit checkpoint, None for a 16-bit one (or a hub id,
        which is checked when it loads).

    Raises:
        ValueError: another quantization method, or settings that contradict a 4-bit checkpoint
            (:func:`check_quant`).
    """
    local = os.path.expanduser(str(path))
    if not os.path.isdir(local):
        return None
    method = quantization_method(read_config(local, where))
    if method is None:
        return None
    if method != BNB_4BIT:
        raise ValueError(_other_method(f"{where}={str(path)!r}", method))
    check_quant(read_4bit_checkpoint(local, where), quant, linear_names(local, trust_remote_code), where)
    return method


def linear_names(path: str | os.PathLike, trust_remote_code: bool = False) -> list[str]:
    """The linear layers of the model a checkpoint's config.json describes (built on meta: no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return [n for n, _ in named_linears(skeleton)]


def checkpoint_quant(
    path: str | os.PathLike, compute_dtype: Any = None, trust_remote_code: bool = False, where: str = ""
) -> QuantConfig:
    """The :class:`QuantConfig` a 4-bit checkpoint was quantized with, ``skip_modules`` included.

    What to build ``QLoRAPrecision`` with to train from (or run) the checkpoint as it is: it passes
    :func:`check_quant` by construction.

    Args:
        path: the checkpoint directory.
        compute_dtype: the compute dtype (default: the checkpoint's ``bnb_4bit_compute_dtype``).
        trust_remote_code: passed to transformers.
        where: the setting that named it, for messages.

    Raises:
        ValueError: not a complete bitsandbytes 4-bit checkpoint (:func:`read_4bit_checkpoint`).
    """
    ckpt = read_4bit_checkpoint(path, where)
    linears = linear_names(path, trust_remote_code)
    kept = [n for n in linears if n not in ckpt.layers]
    changes: dict[str, Any] = {"skip_modules": _short_skip_list(kept, linears)}
    if compute_dtype is not None:
        changes["compute_dtype"] = compute_dtype
    return QuantConfig(**{**ckpt.quant.to_dict(), **changes})
