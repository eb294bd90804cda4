"""Bitsandbytes 4-bit checkpoints in transformers' format: loaded, written, and made at random.

A transformers ``save_pretrained`` of a model loaded with ``BitsAndBytesConfig(load_in_4bit=True)``
(the ``...-bnb-4bit`` hub repos) has ``quantization_config`` in its config.json and, for every
quantized linear layer, the packed 4-bit codes under ``<layer>.weight`` next to bitsandbytes' quant
state: ``.weight.absmax``, ``.weight.quant_map``, ``.weight.quant_state.bitsandbytes__nf4`` (a JSON
blob: block size, dtype, shape) and, with double quantization, ``.weight.nested_absmax`` and
``.weight.nested_quant_map``. Everything else is stored in 16-bit.

* :func:`load_pretrained` gives ``CausalLMModule`` the model ready for training from either kind
  of checkpoint; a 4-bit one is built empty, converted by ``QLoRAPrecision`` and its packed weights
  are placed into the :class:`~lightning_qlora.Linear4bit` layers as they are, shard by shard,
  straight onto the device (never re-quantized, never 16-bit on the GPU).
* :func:`save_4bit_checkpoint` writes a converted model's quantized base in the same format, so
  transformers (``from_pretrained``) and PEFT load it back.
* :func:`write_random_4bit_checkpoint` writes a random-initialised model as a 4-bit checkpoint one
  module at a time (the 70B benchmark's checkpoint, which has no 16-bit copy anywhere).
* :mod:`lightning_qlora.quantize` (``lightning-qlora-quantize``) makes one from a 16-bit checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .nf4 import (
    SERIALIZED_PARTS,
    Linear4bit,
    QuantConfig,
    _largest_blocksize,
    _matches,
    deferred_linear_init,
    named_linears,
    quantize_tensor,
    serialize_params4bit,
)

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
_QUANT_STATE = ".weight.quant_state.bitsandbytes__"
# Files of a model directory that are weights or their index (everything else is config/tokenizer).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
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
    other = sorted(p.name for p in path.iterdir() if p.name.endswith(_WEIGHT_SUFFIXES))
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
    """

    path: Path
    config: dict[str, Any]
    files: list[Path]
    tensors: dict[str, TensorInfo]
    layers: dict[str, list[str]]
    quant: QuantConfig
    total_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.total_bytes = sum(t.nbytes for t in self.tensors.values())


def read_4bit_checkpoint(path: str | os.PathLike) -> Checkpoint4bit:
    """Reads a 4-bit checkpoint's layout: headers, and each layer's small quant-state blob.

    Raises:
        ValueError: not a bitsandbytes 4-bit checkpoint, an incomplete layer, or layers quantized
            with different settings.
    """
    from bitsandbytes.utils import unpack_tensor_to_dict
    from safetensors import safe_open

    path = Path(path)
    config = read_config(path)
    if quantization_method(config) != BNB_4BIT:
        raise ValueError(
            f"'{path}' is not a bitsandbytes 4-bit checkpoint (its config.json has no load_in_4bit)"
        )
    files = weight_files(path)
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        tensors.update(read_safetensors_header(file))
    layers: dict[str, list[str]] = {}
    states: dict[str, str] = {}
    for name in tensors:
        if _QUANT_STATE in name:
            layer = name[: name.index(_QUANT_STATE)]
            states[layer] = name
    for layer in states:
        prefix = layer + ".weight"
        layers[layer] = [prefix + s for s in SERIALIZED_PARTS if prefix + s in tensors]
        if prefix not in tensors:
            raise ValueError(
                f"'{path}' is incomplete: {layer} has a quant state but no packed weight {prefix}"
            )
    if not layers:
        raise ValueError(
            f"'{path}' says load_in_4bit but holds no 4-bit weights (no *{_QUANT_STATE}* tensors)"
        )
    settings: dict[tuple, list[str]] = {}
    by_file: dict[Path, list[str]] = {}
    for layer, key in states.items():
        by_file.setdefault(tensors[key].file, []).append(layer)
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for layer in names:
                blob = unpack_tensor_to_dict(f.get_tensor(states[layer]))
                packed = tensors[layer + ".weight"]
                nested = layer + ".weight.nested_absmax" in tensors
                key = (blob["quant_type"], int(blob["blocksize"]), nested, packed.dtype)
                settings.setdefault(key, []).append(layer)
    if len(settings) > 1:
        described = "; ".join(
            f"{len(v)} layers (e.g. {v[0]}) with quant_type={k[0]}, blocksize={k[1]}, double_quant={k[2]}"
            for k, v in settings.items()
        )
        raise ValueError(
            f"'{path}' mixes quantization settings, which one QuantConfig cannot describe: {described}"
        )
    (quant_type, blocksize, nested, storage), _ = next(iter(settings.items()))
    if storage not in _ST_TORCH:
        raise ValueError(
            f"'{path}': packed 4-bit weights stored as {storage}, which bitsandbytes does not write"
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
    return Checkpoint4bit(path, config, files, tensors, layers, quant)


def _short_skip_list(keep: Sequence[str], linears: Sequence[str]) -> list[str]:
    """The shortest ``skip_modules`` spelling that selects exactly ``keep`` among ``linears``: leaf names where possible."""
    keep_set, out = set(keep), []
    for name in keep:
        leaf = name.rsplit(".", 1)[-1]
        if {n for n in linears if _matches(n, [leaf])} <= keep_set:
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
    wanted = {n for n in linears if not _matches(n, quant.skip_modules)}
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
    check_quant(read_4bit_checkpoint(local), quant, _linear_names(local, trust_remote_code), where)
    return method


def _linear_names(path: str | os.PathLike, trust_remote_code: bool = False) -> list[str]:
    """The linear layers of the model a checkpoint's config.json describes (built on meta: no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return [n for n, _ in named_linears(skeleton)]


def checkpoint_quant(
    path: str | os.PathLike, compute_dtype: Any = None, trust_remote_code: bool = False
) -> QuantConfig:
    """The :class:`QuantConfig` a 4-bit checkpoint was quantized with, ``skip_modules`` included.

    What to build ``QLoRAPrecision`` with to train from (or run) the checkpoint as it is: it passes
    :func:`check_quant` by construction.

    Args:
        path: the checkpoint directory.
        compute_dtype: the compute dtype (default: the checkpoint's ``bnb_4bit_compute_dtype``).
        trust_remote_code: passed to transformers.
    """
    ckpt = read_4bit_checkpoint(path)
    linears = _linear_names(path, trust_remote_code)
    kept = [n for n in linears if n not in ckpt.layers]
    changes: dict[str, Any] = {"skip_modules": _short_skip_list(kept, linears)}
    if compute_dtype is not None:
        changes["compute_dtype"] = compute_dtype
    return QuantConfig(**{**ckpt.quant.to_dict(), **changes})


# ------------------------------------------------------------------------------------------ loading


def load_pretrained(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    plugin: Any = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> nn.Module:
    """The HF causal LM of a 16-bit or a bitsandbytes 4-bit checkpoint, ready for training.

    A 16-bit checkpoint loads as ``CausalLMModule`` always loaded it: ``from_pretrained`` on the host
    (memory-mapped); inside ``QLoRAPrecision``'s init context each linear weight is quantized on its
    way to the accelerator. A 4-bit checkpoint is built empty from its config (without transformers'
    own quantizer), converted by ``plugin`` and its packed weights are placed, shard by shard, into
    the :class:`~lightning_qlora.Linear4bit` layers on ``device``; the host holds about one tensor
    of it at a time.

    Args:
        path: a local directory or a hub id.
        dtype: dtype of the 16-bit weights (default: the current default dtype, which the plugin's
            init context sets to its compute dtype).
        revision: hub revision.
        trust_remote_code: passed to transformers.
        attn_implementation: passed to transformers.
        plugin: the ``QLoRAPrecision`` the model trains under; required for a 4-bit checkpoint, whose
            settings it must match (:func:`check_quant`).
        device: where a 4-bit checkpoint's weights go (default: the current default device, i.e. the
            Trainer's root device inside ``configure_model``; the host if that is ``meta``).
        progress: show a progress bar (bytes and layers) while a 4-bit checkpoint loads.

    Raises:
        FileNotFoundError: a local-looking path that does not exist.
        ValueError: a checkpoint quantized otherwise (GPTQ, 8-bit, ...), or plugin settings that
            contradict a 4-bit checkpoint.
    """
    from transformers import AutoModelForCausalLM

    from .hub import looks_local

    name = str(path)
    local = os.path.expanduser(name)
    if looks_local(name) and not os.path.isdir(local):
        raise FileNotFoundError(f"model.name_or_path={name!r} does not exist")
    dtype = dtype if dtype is not None else torch.get_default_dtype()
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    method = _method_of(name, local, revision, trust_remote_code)
    if method == BNB_4BIT:
        directory = local if os.path.isdir(local) else _download(name, revision)
        return load_4bit_checkpoint(
            directory, plugin, dtype=dtype, device=device, progress=progress, **kwargs
        )
    if method is not None:
        raise ValueError(_other_method(f"model.name_or_path={name!r}", method))
    return AutoModelForCausalLM.from_pretrained(
        local if os.path.isdir(local) else name, dtype=dtype, revision=revision, device_map="cpu", **kwargs
    )


def _method_of(name: str, local: str, revision: str | None, trust_remote_code: bool) -> str | None:
    if os.path.isdir(local):
        return quantization_method(read_config(local))
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    return quantization_method({"quantization_config": qc if isinstance(qc, dict) else qc.to_dict()})


def _download(repo: str, revision: str | None) -> str:
    """A hub 4-bit checkpoint's config and safetensors files, in the local hub cache."""
    from huggingface_hub import snapshot_download

    return snapshot_download(repo, revision=revision, allow_patterns=["*.json", "*.safetensors"])


def build_empty(config: Any, dtype: torch.dtype, device: torch.device, **kwargs: Any) -> nn.Module:
    """The model of ``config`` with its linear weights on the meta device (placed on ``device`` when loaded).

    Embeddings, norms and buffers are allocated on ``device`` but not initialised (they are loaded
    next); rotary tables and other computed buffers are computed there as usual.
    """
    from lightning.fabric.plugins.precision.utils import _DtypeContextManager
    from lightning.fabric.utilities.init import _EmptyInit
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    # Built as a plain model: the plugin converts it, not transformers' quantizer.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with _EmptyInit(enabled=True), torch.device(device), deferred_linear_init(), _DtypeContextManager(dtype):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    for _, layer in named_linears(model):
        layer.target_device = device  # adapters and weights are created where the model will live
    return model


def load_4bit_checkpoint(
    path: str | os.PathLike,
    plugin: Any,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    **kwargs: Any,
) -> nn.Module:
    """A 4-bit checkpoint built empty, converted by ``plugin`` and loaded without re-quantizing.

    Args:
        path: the checkpoint directory.
        plugin: a ``QLoRAPrecision`` whose quantization settings match the checkpoint.
        dtype: dtype of the 16-bit weights (default: the plugin's compute dtype).
        device: where the weights go (default: the current default device; the host if that is meta).
        progress: show a progress bar.
        **kwargs: passed to ``AutoModelForCausalLM.from_config`` (``attn_implementation``, ...).

    Raises:
        ValueError: the plugin's settings contradict the checkpoint, or its tensors do not fit the model.
    """
    from transformers import AutoConfig

    ckpt = read_4bit_checkpoint(path)
    quant = getattr(plugin, "quant", None)
    if plugin is None or not hasattr(plugin, "convert_module"):
        raise ValueError(
            f"'{path}' is a 4-bit checkpoint: load it under QLoRAPrecision (give plugin=QLoRAPrecision(...))"
        )
    dtype = dtype or getattr(plugin, "dtype", None) or torch.get_default_dtype()
    device = _resolve_device(device)
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=kwargs.get("trust_remote_code", False))
    model = build_empty(config, dtype, device, **kwargs)
    linears = [n for n, _ in named_linears(model)]
    check_quant(ckpt, quant, linears)
    plugin.convert_module(model)
    load_weights(model, ckpt, device, progress=progress)
    return model


def _resolve_device(device: torch.device | str | None) -> torch.device:
    device = torch.device(device) if device is not None else torch.get_default_device()
    if device.type == "meta":  # an empty-init context: the weights still need a real home
        device = torch.device("cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


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


def _named_state(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, Tensor]]:
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


def load_weights(
    model: nn.Module, ckpt: Checkpoint4bit, device: torch.device | str, progress: bool = True
) -> None:
    """Places a 4-bit checkpoint's tensors into a model converted by ``QLoRAPrecision``, shard by shard.

    Packed weights go into their :class:`Linear4bit` layers as they are (byte for byte); 16-bit
    tensors are cast to the dtype of the parameter they fill. A tensor still on the meta device is
    replaced, any other is copied into, so tied weights stay tied.

    Raises:
        ValueError: a tensor the model does not have, one it has that the checkpoint lacks, or a
            shape mismatch; each names the tensor.
    """
    from safetensors import safe_open

    device = torch.device(device)
    quantized = {
        canonical_name(name): layer for name, layer in named_linears(model) if isinstance(layer, Linear4bit)
    }
    slots: dict[str, tuple[nn.Module, str, Tensor]] = {}
    groups: dict[int, list[str]] = {}  # tied tensors: one id, several names
    for key, module, attr, tensor in _named_state(model):
        if key.endswith(".weight") and key[: -len(".weight")] in quantized and isinstance(module, Linear4bit):
            continue
        slots.setdefault(key, (module, attr, tensor))
        groups.setdefault(id(tensor), []).append(key)
    ignored = _ignored_patterns(model)
    owner = {k: layer for layer, keys in ckpt.layers.items() for k in keys}
    pending: dict[str, dict[str, Tensor]] = {}
    loaded: set[int] = set()
    unexpected: list[str] = []
    bar = _progress(ckpt.total_bytes, len(ckpt.layers), "loading 4-bit checkpoint", progress)
    done_layers = 0
    for file in ckpt.files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                bar.update(ckpt.tensors[key].nbytes)
                if key in owner:
                    layer = owner[key]
                    if layer not in quantized:
                        raise ValueError(
                            f"'{ckpt.path}': {layer} is 4-bit in the checkpoint but not in the model"
                        )
                    parts = pending.setdefault(layer, {})
                    parts[key[len(layer) + len(".weight") :]] = f.get_tensor(key)
                    if len(parts) == len(ckpt.layers[layer]):
                        try:
                            quantized[layer].load_prequantized(pending.pop(layer), device)
                        except ValueError as err:
                            raise ValueError(f"'{ckpt.path}': {layer}: {err}") from None
                        done_layers += 1
                        bar.set_postfix_str(f"layers {done_layers}/{len(ckpt.layers)}", refresh=False)
                    continue
                if key not in slots:
                    if not any(p.search(key) for p in ignored):
                        unexpected.append(key)
                    continue
                module, attr, current = slots[key]
                _place(module, attr, current, f.get_tensor(key), device, f"'{ckpt.path}': {key}")
                loaded.add(id(current))
    bar.close()
    if pending:
        raise ValueError(f"'{ckpt.path}': incomplete 4-bit weights for {sorted(pending)[:3]}")
    if unexpected:
        raise ValueError(
            f"'{ckpt.path}' holds tensors the model built from its config.json does not have: {unexpected[:4]}"
        )
    missing = [names[0] for tid, names in groups.items() if tid not in loaded]
    missing += [n for n in quantized if n not in ckpt.layers]
    # A tie broken by placing one name of a meta tensor would leave its other name on meta.
    missing += [key for key, _, _, t in _named_state(model) if t.device.type == "meta"]
    if missing:
        raise ValueError(f"'{ckpt.path}' lacks tensors the model needs: {missing[:4]}")


def _ignored_patterns(model: nn.Module) -> list[re.Pattern]:
    patterns = list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
    patterns.append(r"rotary_emb\.inv_freq$")  # older checkpoints stored this computed buffer
    return [re.compile(p) for p in patterns]


@torch.no_grad()
def _place(
    module: nn.Module, attr: str, current: Tensor, value: Tensor, device: torch.device, what: str
) -> None:
    if tuple(value.shape) != tuple(current.shape):
        raise ValueError(f"{what} has shape {tuple(value.shape)}, the model expects {tuple(current.shape)}")
    if current.device.type == "meta":  # built empty (a DeferredLinear's weight): placed, not copied into
        tensor = value.to(device, current.dtype)
        if isinstance(current, nn.Parameter):
            setattr(module, attr, nn.Parameter(tensor, requires_grad=current.requires_grad))
        else:
            module._buffers[attr] = tensor
    else:
        current.copy_(value)


def _progress(total_bytes: int, layers: int, desc: str, enabled: bool) -> Any:
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


# ------------------------------------------------------------------------------------------ writing


def parse_size(size: int | str) -> int:
    """``"2GB"``, ``"500MB"``, ``"40KB"`` or a byte count as bytes."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        value = convert_file_size_to_int(size)
    except ValueError:
        raise ValueError(
            f"max_shard_size={size!r} is not a size; use e.g. 2GB, 500MB or a byte count"
        ) from None
    if value <= 0:
        raise ValueError(f"max_shard_size={size!r} must be positive")
    return value


class ShardWriter:
    """Writes tensors into safetensors shards of at most ``max_shard_size`` bytes, plus the index.

    Tensors are held on the host only until their shard is full, so a writer holds about one shard.
    Shards get transformers' names (``model-00001-of-00004.safetensors``; ``model.safetensors``
    when there is one) once the count is known, at :meth:`finish`.
    """

    def __init__(self, directory: str | os.PathLike, max_shard_size: int | str = "5GB") -> None:
        self.directory = Path(directory)
        self.max_bytes = parse_size(max_shard_size)
        self.buffer: dict[str, Tensor] = {}
        self.buffer_bytes = 0
        self.shards: list[list[str]] = []
        self.total_size = 0

    def add(self, name: str, tensor: Tensor) -> None:
        if name in self.buffer or any(name in shard for shard in self.shards):
            raise ValueError(f"tensor {name} written twice")
        size = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffer_bytes + size > self.max_bytes:
            self.flush()
        # A host copy: safetensors refuses views and shared storages, and the source may be on a GPU.
        self.buffer[name] = tensor.detach().to("cpu", copy=True).contiguous()
        self.buffer_bytes += size
        self.total_size += size

    def add_many(self, tensors: Mapping[str, Tensor]) -> None:
        for name, tensor in tensors.items():
            self.add(name, tensor)

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.buffer:
            return
        self.shards.append(list(self.buffer))
        save_file(
            self.buffer, str(self.directory / self._temp_name(len(self.shards))), metadata={"format": "pt"}
        )
        self.buffer, self.buffer_bytes = {}, 0

    @staticmethod
    def _temp_name(i: int) -> str:
        return f"shard-{i:05d}.partial.safetensors"

    def finish(self) -> list[Path]:
        """Writes what is left, names the shards and writes the index; returns the shard paths."""
        self.flush()
        n = len(self.shards)
        names = (
            [SAFE_WEIGHTS] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        )
        for i, name in enumerate(names, 1):
            os.replace(self.directory / self._temp_name(i), self.directory / name)
        if n > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": {key: names[i] for i, shard in enumerate(self.shards) for key in sorted(shard)},
            }
            (self.directory / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return [self.directory / name for name in names]


@contextlib.contextmanager
def staged_output(out: str | os.PathLike, what: str = "--out") -> Iterator[Path]:
    """A fresh directory next to ``out`` that becomes ``out`` only when the block succeeds.

    So an interrupted or failed write never leaves a half-written checkpoint behind.

    Raises:
        ValueError: ``out`` exists and is not an empty directory, or its parent cannot be written.
    """
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{what}='{out}' already exists and is not empty; give a new directory or remove it")
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
    except OSError as err:
        raise ValueError(
            f"{what}='{out}' cannot be written ({err.strerror or err}); choose a directory you can write to"
        ) from None
    try:
        yield staging
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def bnb_quantization_config(quant: QuantConfig, skip_modules: Sequence[str]) -> dict[str, Any]:
    """config.json's ``quantization_config`` for weights quantized with ``quant``, as transformers writes it.

    ``skip_modules`` are the linear layers kept in 16-bit, listed in full: with an explicit list
    transformers converts exactly the other linear layers (its own default would guess the head).
    The block size is not part of it: bitsandbytes keeps it in each weight's quant state.
    """
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=quant.compute_dtype,
        bnb_4bit_quant_storage=quant.quant_storage,
        llm_int8_skip_modules=list(skip_modules),
    ).to_dict()


def write_config(
    config: Any,
    directory: Path,
    quant: QuantConfig,
    skip_modules: Sequence[str],
    dtype: torch.dtype | None = None,
) -> None:
    """Writes ``config`` (a transformers config) with ``quantization_config`` (and ``dtype``, when given:
    that of the 16-bit tensors)."""
    config = copy.deepcopy(config)
    config.quantization_config = bnb_quantization_config(quant, skip_modules)
    if dtype is not None:
        config.dtype = dtype
    config.save_pretrained(directory)


def save_4bit_checkpoint(
    model: nn.Module,
    out: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    tokenizer: Any = None,
) -> Path:
    """Writes a converted model's base in transformers' bitsandbytes 4-bit format.

    ``AutoModelForCausalLM.from_pretrained(out)`` then gives a bitsandbytes 4-bit model computing
    what this one computes without adapters, and ``peft.PeftModel.from_pretrained`` puts an adapter
    written by :func:`~lightning_qlora.adapters.save_adapter` onto it. Adapters are not written here.

    Args:
        model: an HF model (or a module wrapping one) converted by ``QLoRAPrecision`` with
            quantization; weights not quantized yet are quantized where they lie.
        out: a new (or empty) directory; written in full or not at all.
        max_shard_size: largest safetensors shard.
        tokenizer: saved alongside when given.

    Returns:
        The directory.

    Raises:
        ValueError: the model has no 4-bit layers, or its 4-bit layers differ in settings.
    """
    from .adapters import hf_root

    root, _ = hf_root(model)
    linears = [(canonical_name(n), m) for n, m in named_linears(root)]
    quantized = [m for _, m in linears if isinstance(m, Linear4bit)]
    if not quantized:
        raise ValueError(
            f"{type(root).__name__} has no 4-bit layers; convert it with QLoRAPrecision(quant=...) first"
        )
    settings = {(m.quant_type, m.blocksize, m.double_quant) for m in quantized}
    if len(settings) > 1:
        raise ValueError(
            f"the model's 4-bit layers differ in settings {sorted(settings)}; one checkpoint holds one"
        )
    skip = [n for n, m in linears if not isinstance(m, Linear4bit)]
    quant = quantized[0].quant_config(skip_modules=skip)
    dense = [t for _, _, _, t in _named_state(root) if t.is_floating_point() and not _is_packed(t)]
    dtype = dense[0].dtype if dense else quant.compute_dtype
    with staged_output(out, "out") as staging:
        writer = ShardWriter(staging, max_shard_size)
        seen: set[int] = set()
        for key, module, attr, tensor in _named_state(root):
            if id(tensor) in seen:  # a tied weight is written once, under its first name
                continue
            seen.add(id(tensor))
            if isinstance(module, Linear4bit) and attr == "weight":
                writer.add_many({key + suffix: t for suffix, t in module.serialized_weight().items()})
            else:
                writer.add(key, tensor)
        writer.finish()
        write_config(root.config, staging, quant, skip, dtype)
        if getattr(root, "generation_config", None) is not None:
            root.generation_config.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return Path(out)


def _is_packed(tensor: Tensor) -> bool:
    import bitsandbytes as bnb

    return isinstance(tensor, bnb.nn.Params4bit)


# ------------------------------------------------------------------------------- random checkpoints


@torch.no_grad()
def write_random_4bit_checkpoint(
    hf_config: Any,
    out_dir: str | os.PathLike,
    device: torch.device | str = "cpu",
    quant: QuantConfig | None = None,
    seed: int = 0,
    max_shard_size: int | str = "2GB",
    progress: bool = True,
) -> Path:
    """Writes a random-initialised model as a 4-bit checkpoint without ever holding it in 16-bit.

    The model exists on the meta device only; each of its modules in turn (an embedding, one
    projection of one decoder layer, a norm, ...) is materialised on ``device``, initialised as
    transformers initialises it (``_init_weights``), its weight quantized there when it is a linear
    layer's, written, and freed again. Embeddings, norms and the head are written in
    ``quant.compute_dtype``. A 70B-architecture checkpoint thus needs one weight matrix on the GPU
    and one output shard on the host.

    Args:
        hf_config: a transformers config (``AutoConfig.for_model("llama", ...)``).
        out_dir: a new (or empty) directory; written in full or not at all.
        device: where layers are initialised and quantized (``cuda`` for large models).
        quant: the quantization (default: :class:`QuantConfig`'s); ``skip_modules`` stay 16-bit.
        seed: seeds the random weights.
        max_shard_size: largest safetensors shard.
        progress: show a progress bar (bytes written and layers).

    Returns:
        The directory.
    """
    from transformers import AutoModelForCausalLM

    quant = quant or QuantConfig()
    device = torch.device(device)
    dtype = quant.compute_dtype
    config = copy.deepcopy(hf_config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    names = {id(m): n for n, m in model.named_modules()}
    linear_names = {id(m): n for n, m in named_linears(model)}
    for name, layer in named_linears(model):
        if not _matches(name, quant.skip_modules) and layer.in_features < quant.blocksize:
            raise ValueError(
                f"quant.blocksize={quant.blocksize} is larger than the input width ({layer.in_features}) of "
                f"'{name}'; use blocksize <= {_largest_blocksize(layer.in_features)} or skip that layer"
            )
    skip = [n for n in linear_names.values() if _matches(n, quant.skip_modules)]
    first_name: dict[int, str] = {}  # tied weights: written once, under their first name
    for mname, module in model.named_modules():
        for attr, param in module.named_parameters(recurse=False):
            first_name.setdefault(id(param), f"{mname}.{attr}".lstrip("."))

    def quantized_here(module: nn.Module, attr: str) -> bool:
        return attr == "weight" and id(module) in linear_names and linear_names[id(module)] not in skip

    # The bar counts packed weights at 4 bits (their small constants aside) and 16-bit tensors at their size.
    total = sum(
        p.numel() // 2 if quantized_here(m, a) else p.numel() * p.element_size()
        for m in model.modules()
        for a, p in m.named_parameters(recurse=False)
    )
    torch.manual_seed(seed)
    n_quantized = len(linear_names) - len(skip)
    bar = _progress(total, n_quantized, "writing random 4-bit checkpoint", progress)
    done = 0
    with staged_output(out_dir, "out_dir") as staging:
        writer = ShardWriter(staging, max_shard_size)
        for module in model.modules():
            own = [
                (a, p)
                for a, p in module.named_parameters(recurse=False)
                if first_name[id(p)] == f"{names[id(module)]}.{a}".lstrip(".")
            ]
            persistent = [
                (a, b)
                for a, b in module.named_buffers(recurse=False)
                if a not in module._non_persistent_buffers_set
            ]
            if not own and not persistent:
                continue
            module.to_empty(device=device, recurse=False)
            for p in module.parameters(recurse=False):  # transformers' init skips tensors flagged as loaded
                p.__dict__.pop("_is_hf_initialized", None)
            model._init_weights(module)
            prefix = names[id(module)]
            prefix = prefix + "." if prefix else ""
            for attr, _ in own:
                value = getattr(module, attr)
                key = prefix + attr
                if quantized_here(module, attr):
                    packed = serialize_params4bit(quantize_tensor(value, quant, device))
                    writer.add_many({key + s: t for s, t in packed.items()})
                    done += 1
                    bar.set_postfix_str(f"layers {done}/{n_quantized}", refresh=False)
                    bar.update(value.numel() // 2)
                else:
                    writer.add(key, value.to(dtype) if value.is_floating_point() else value)
                    bar.update(value.numel() * value.element_size())
            for attr, _ in persistent:
                writer.add(prefix + attr, getattr(module, attr))
            module.to_empty(device="meta", recurse=False)  # freed: one module at a time
        writer.finish()
        write_config(config, staging, replace(quant, skip_modules=skip), skip, dtype)
    bar.close()
    return Path(out_dir)


__all__ = [
    "Checkpoint4bit",
    "ShardWriter",
    "bnb_quantization_config",
    "check_quant",
    "checkpoint_quant",
    "is_4bit_checkpoint",
    "load_4bit_checkpoint",
    "load_pretrained",
    "preflight_checkpoint",
    "quantization_method",
    "read_4bit_checkpoint",
    "save_4bit_checkpoint",
    "staged_output",
    "write_random_4bit_checkpoint",
]
