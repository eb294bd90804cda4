"""Bitsandbytes 4-bit checkpoints in transformers' format: their layout, read without loading a weight.

A transformers ``save_pretrained`` of a model loaded with ``BitsAndBytesConfig(load_in_4bit=True)``
(the ``...-bnb-4bit`` hub repos) has ``quantization_config`` in its config.json and, for every
quantized linear layer, the packed 4-bit codes under ``<layer>.weight`` next to bitsandbytes' quant
state: ``.weight.absmax``, ``.weight.quant_map``, ``.weight.quant_state.bitsandbytes__nf4`` (a JSON
blob: block size, dtype, shape) and, with double quantization, ``.weight.nested_absmax`` and
``.weight.nested_quant_map``. Everything else is stored in 16-bit.

:func:`read_4bit_checkpoint` reads a checkpoint's layout (headers and quant-state blobs, no weights)
and refuses an incomplete one. The names a model's state takes in a checkpoint (:func:`named_state`)
and the loading progress bar are shared with the modules next door:

* :mod:`.checkpoint4bit_check`: plugin settings held against a checkpoint (``check_quant``,
  ``preflight_checkpoint``, ``checkpoint_quant``);
* :mod:`.checkpoint4bit_load`: ``load_pretrained``, a 16-bit or 4-bit checkpoint loaded for training;
* :mod:`.checkpoint4bit_write` (``save_4bit_checkpoint``, ``write_random_4bit_checkpoint``, the shard
  writer), :mod:`.checkpoint4bit_merge` (an adapter merged into a 4-bit checkpoint, streamed) and
  :mod:`lightning_qlora.quantize` (``lightning-qlora-quantize``, one made from a 16-bit checkpoint).
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .nf4 import (
    SERIALIZED_PARTS,
    QuantConfig,
)

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
_QUANT_STATE = ".weight.quant_state.bitsandbytes__"
# Files of a model directory that are weights or their index (everything else is config/tokenizer).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
_ST_TORCH = {"U8": torch.uint8, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


# ------------------------------------------------------------------------------------------ reading


@dataclass
class TensorInfo:
    """One tensor of a safetensors file, from its header (no data read)."""

    file: Path
    dtype: str  # safetensors' name: "U8", "BF16", ...
    shape: tuple[int, ...]
    nbytes: int


def read_safetensors_header(file: str | os.PathLike) -> dict[str, TensorInfo]:
    """The tensors a safetensors file holds (name, dtype, shape, size), read from its header only."""
    file = Path(file)
    with open(file, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    return {
        name: TensorInfo(
            file, info["dtype"], tuple(info["shape"]), info["data_offsets"][1] - info["data_offsets"][0]
        )
        for name, info in header.items()
        if name != "__metadata__"
    }


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a ``save_pretrained`` directory, in the index's order.

    Raises:
        ValueError: the directory has no safetensors weights (naming what it has instead).
    """
    path = Path(path)
    index = path / SAFE_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"'{index}' is not a safetensors index ({err})") from None
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"'{path}' is incomplete: {SAFE_INDEX} lists {missing[:3]}, which are not there")
        return files
    if (path / SAFE_WEIGHTS).is_file():
        return [path / SAFE_WEIGHTS]
    other = sorted(p.name for p in path.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    hint = (
        f"it has {other[:3]}: re-save it with save_pretrained (safetensors is the default)"
        if other
        else "it is not a saved transformers model"
    )
    raise ValueError(f"'{path}' has no {SAFE_WEIGHTS} or {SAFE_INDEX}; {hint}")


def read_config(path: str | os.PathLike, what: str = "") -> dict[str, Any]:
    """A model directory's config.json as a dict.

    Args:
        path: the directory.
        what: the setting that named it (``--model``), for messages.

    Raises:
        ValueError: no config.json, not JSON, or no ``model_type`` (not a transformers model).
    """
    file = Path(path) / "config.json"
    if not file.is_file():
        named = f"{what}='{path}'" if what else f"'{path}'"
        raise ValueError(f"{named} has no config.json; it is not a saved transformers model")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"'{file}' is not valid JSON: {err}") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ValueError(f"'{file}' has no model_type; it is not a transformers model config")
    return config


BNB_4BIT = "bitsandbytes 4-bit"


def quantization_method(config: Mapping[str, Any]) -> str | None:
    """:data:`BNB_4BIT`, ``"bitsandbytes 8-bit"``, another method's name (``"gptq"``, ...), or None (16-bit)."""
    qc = config.get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method", "unknown")
    if method == "bitsandbytes":
        if qc.get("load_in_4bit") or qc.get("_load_in_4bit"):
            return BNB_4BIT
        return "bitsandbytes 8-bit"
    return str(method)


def is_4bit_checkpoint(path: str | os.PathLike) -> bool:
    """True for a local directory holding a transformers bitsandbytes 4-bit checkpoint."""
    try:
        return quantization_method(read_config(path)) == BNB_4BIT
    except ValueError:
        return False


@dataclass
class Checkpoint4bit:
    """What a bitsandbytes 4-bit checkpoint holds, read from its config and safetensors headers.

    Attributes:
        path: the directory.
        config: its config.json.
        files: its safetensors shards.
        tensors: every tensor name -> where it lies and its size.
        layers: quantized layer name -> the names of its tensors (``<layer>.weight`` and its quant state).
        quant: the settings its weights were quantized with (``compute_dtype`` from
            ``bnb_4bit_compute_dtype``; ``skip_modules`` empty: which linear layers are 16-bit is
            only known against the model, see :func:`check_quant`).
        shapes: quantized layer name -> its weight's (out, in) shape, from the quant state.
    """

    path: Path
    config: dict[str, Any]
    files: list[Path]
    tensors: dict[str, TensorInfo]
    layers: dict[str, list[str]]
    quant: QuantConfig
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    total_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.total_bytes = sum(t.nbytes for t in self.tensors.values())

    def weight_shape(self, layer: str) -> tuple[int, ...] | None:
        """The (out, in) shape of ``layer``'s weight, 4-bit or 16-bit; None if the checkpoint has none."""
        if layer in self.shapes:
            return self.shapes[layer]
        info = self.tensors.get(layer + ".weight")
        return info.shape if info is not None else None


# The quant-state entries of a packed weight besides its JSON blob: always, and with double quantization.
_STATE_PARTS = (".absmax", ".quant_map")
_NESTED_PARTS = (".nested_absmax", ".nested_quant_map")
_REMAKE = (
    "re-save it (save_pretrained of the transformers 4-bit model) or make it again with "
    "lightning-qlora-quantize from the 16-bit model"
)


def read_4bit_checkpoint(path: str | os.PathLike, where: str = "") -> Checkpoint4bit:
    """Reads a 4-bit checkpoint's layout: headers, and each layer's small quant-state blob.

    Every quantized layer must be complete: its packed codes, ``absmax``, ``quant_map`` (and the
    nested pair with double quantization) and the blob, whose shape must fit the packed bytes;
    a quant-state entry without its blob counts as a layer missing its blob.

    Args:
        path: the directory.
        where: the setting that named it (``--model``), for messages.

    Raises:
        ValueError: not a bitsandbytes 4-bit checkpoint, an incomplete or inconsistent layer, or
            layers quantized with different settings; one line naming the layer and the entry.
    """
    from bitsandbytes.utils import unpack_tensor_to_dict
    from safetensors import safe_open

    path = Path(path)
    named = f"{where}='{path}'" if where else f"'{path}'"
    config = read_config(path, where)
    if quantization_method(config) != BNB_4BIT:
        raise ValueError(
            f"{named} is not a bitsandbytes 4-bit checkpoint (its config.json has no load_in_4bit)"
        )
    files = weight_files(path)
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        tensors.update(read_safetensors_header(file))
    states: dict[str, str] = {}
    for name in tensors:
        if _QUANT_STATE in name:
            states[name[: name.index(_QUANT_STATE)]] = name
    orphans: dict[str, list[str]] = {}  # quant-state entries of a layer that has no blob to read them with
    for name in tensors:
        for part in (*_STATE_PARTS, *_NESTED_PARTS):
            layer = name.removesuffix(".weight" + part)
            if name.endswith(".weight" + part) and layer not in states:
                orphans.setdefault(layer, []).append(part.lstrip("."))
    if orphans:
        layer = min(orphans)
        raise ValueError(
            f"{named} is incomplete: 4-bit layer {layer} has {sorted(orphans[layer])} but no "
            f"{layer}{_QUANT_STATE}<type> entry (the quant state that says how to read them); {_REMAKE}"
        )
    if not states:
        raise ValueError(
            f"{named} says load_in_4bit but holds no 4-bit weights (no *{_QUANT_STATE}* tensors)"
        )
    blobs: dict[str, dict[str, Any]] = {}
    by_file: dict[Path, list[str]] = {}
    for layer, key in states.items():
        by_file.setdefault(tensors[key].file, []).append(layer)
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for layer in names:
                try:
                    blobs[layer] = unpack_tensor_to_dict(f.get_tensor(states[layer]))
                except (ValueError, UnicodeDecodeError) as err:
                    raise ValueError(
                        f"{named}: {states[layer]} is not a quant-state blob ({err}); {_REMAKE}"
                    ) from None
    layers: dict[str, list[str]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    settings: dict[tuple, list[str]] = {}
    for layer, blob in blobs.items():
        prefix = layer + ".weight"
        nested = "nested_blocksize" in blob
        needed = ["", *_STATE_PARTS, *(_NESTED_PARTS if nested else ())]
        absent = [prefix + s for s in needed if prefix + s not in tensors]
        missing_keys = [k for k in ("quant_type", "blocksize", "shape", "dtype") if k not in blob]
        if absent or missing_keys:
            what = f"lacks {absent}" if absent else f"has a quant-state blob without {missing_keys}"
            raise ValueError(f"{named} is incomplete: 4-bit layer {layer} {what}; {_REMAKE}")
        shape = tuple(int(d) for d in blob["shape"])
        packed = tensors[prefix]
        if packed.nbytes != (torch.Size(shape).numel() + 1) // 2:
            raise ValueError(
                f"{named} is inconsistent: {prefix} holds {packed.nbytes} bytes of 4-bit codes but its quant state "
                f"says shape {shape}; {_REMAKE}"
            )
        layers[layer] = [prefix + s for s in SERIALIZED_PARTS if prefix + s in tensors]
        shapes[layer] = shape
        key = (blob["quant_type"], int(blob["blocksize"]), nested, packed.dtype)
        settings.setdefault(key, []).append(layer)
    if len(settings) > 1:
        described = "; ".join(
            f"{len(v)} layers (e.g. {v[0]}) with quant_type={k[0]}, blocksize={k[1]}, double_quant={k[2]}"
            for k, v in settings.items()
        )
        raise ValueError(
            f"{named} mixes quantization settings, which one QuantConfig cannot describe: {described}"
        )
    (quant_type, blocksize, nested, storage), _ = next(iter(settings.items()))
    if storage not in _ST_TORCH:
        raise ValueError(
            f"{named}: packed 4-bit weights stored as {storage}, which bitsandbytes does not write"
        )
    qc = config["quantization_config"]
    quant = QuantConfig(
        quant_type=quant_type,
        double_quant=nested,
        blocksize=blocksize,
        compute_dtype=qc.get("bnb_4bit_compute_dtype") or "float32",
        quant_storage=_ST_TORCH[storage],
        skip_modules=[],
    )
    return Checkpoint4bit(path, config, files, tensors, layers, quant, shapes)


_BASE_LAYER = re.compile(r"(^|\.)base_layer(?=\.|$)")


def canonical_name(name: str) -> str:
    """A parameter's name as the plain HF model calls it: an adapted layer's ``.base_layer`` removed."""
    return _BASE_LAYER.sub("", name).lstrip(".")


def _adapter_modules(model: nn.Module) -> set[int]:
    """Ids of the adapter modules (``lora_A``, ``lora_B`` and what they hold) inside ``model``."""
    from .lora import LoRALinear

    out: set[int] = set()
    for module in model.modules():
        if isinstance(module, LoRALinear):
            for part in (module.lora_A, module.lora_B):
                out.update(id(m) for m in part.modules())
    return out


def named_state(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, Tensor]]:
    """(canonical key, owner module, attribute, tensor) for every parameter and persistent buffer,
    adapters and non-persistent buffers excluded, :class:`Linear4bit` weights included as they are."""
    skip = _adapter_modules(model)
    for mname, module in model.named_modules(remove_duplicate=False):
        if id(module) in skip:
            continue
        prefix = canonical_name(mname)
        prefix = prefix + "." if prefix else ""
        for attr, tensor in module._parameters.items():
            if tensor is not None:
                yield prefix + attr, module, attr, tensor
        for attr, tensor in module._buffers.items():
            if tensor is not None and attr not in module._non_persistent_buffers_set:
                yield prefix + attr, module, attr, tensor


def progress_bar(total_bytes: int, layers: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar on stderr counting bytes, with "layers i/n" after it."""
    from tqdm import tqdm

    bar = tqdm(
        total=total_bytes,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=desc,
        dynamic_ncols=True,
        disable=not enabled,
    )
    bar.set_postfix_str(f"layers 0/{layers}", refresh=False)
    return bar


__all__ = [
    "BNB_4BIT",
    "Checkpoint4bit",
    "canonical_name",
    "is_4bit_checkpoint",
    "named_state",
    "progress_bar",
    "quantization_method",
    "read_4bit_checkpoint",
    "read_config",
    "read_safetensors_header",
    "weight_files",
]
