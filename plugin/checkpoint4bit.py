"""Bitsandbytes 4-bit checkpoints in transformers' format: read, checked and loaded.

A transformers ``save_pretrained`` of a model loaded with ``BitsAndBytesConfig(load_in_4bit=True)``
(the ``...-bnb-4bit`` hub repos) has ``quantization_config`` in its config.json and, for every
quantized linear layer, the packed 4-bit codes under ``<layer>.weight`` next to bitsandbytes' quant
state: ``.weight.absmax``, ``.weight.quant_map``, ``.weight.quant_state.bitsandbytes__nf4`` (a JSON
blob: block size, dtype, shape) and, with double quantization, ``.weight.nested_absmax`` and
``.weight.nested_quant_map``. Everything else is stored in 16-bit.

* :func:`read_4bit_checkpoint` reads a checkpoint's layout (headers and quant-state blobs, no
  weights) and refuses an incomplete one; :func:`check_quant` and :func:`preflight_checkpoint`
  refuse settings that contradict it.
* :func:`load_pretrained` gives ``CausalLMModule`` the model ready for training from either kind
  of checkpoint; a 4-bit one is built empty, converted by ``QLoRAPrecision`` and its packed weights
  are placed into the :class:`~lightning_qlora.Linear4bit` layers as they are, shard by shard,
  straight onto the device (never re-quantized, never 16-bit on the GPU).

Writing lives next door: :mod:`.checkpoint4bit_write` (``save_4bit_checkpoint``,
``write_random_4bit_checkpoint``, the shard writer), :mod:`.checkpoint4bit_merge` (an adapter
merged into a 4-bit checkpoint, streamed) and :mod:`lightning_qlora.quantize`
(``lightning-qlora-quantize``, one made from a 16-bit checkpoint).
"""

from __future__ import annotations

import copy
import json
import os
import re
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .nf4 import (
    SERIALIZED_PARTS,
    Linear4bit,
    QuantConfig,
    deferred_linear_init,
    name_matches,
    named_linears,
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

    name = str(path)
    source, method = locate_checkpoint(name, revision, trust_remote_code)
    dtype = dtype if dtype is not None else torch.get_default_dtype()
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if method == BNB_4BIT:
        return load_4bit_checkpoint(source, plugin, dtype=dtype, device=device, progress=progress, **kwargs)
    if method is not None:
        raise ValueError(_other_method(f"model.name_or_path={name!r}", method))
    return AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, revision=revision, device_map="cpu", **kwargs
    )


def locate_checkpoint(
    name: str | os.PathLike,
    revision: str | None = None,
    trust_remote_code: bool = False,
    where: str = "model.name_or_path",
) -> tuple[str, str | None]:
    """Where a model loads from, and how it is quantized (:func:`quantization_method`).

    A local directory is read as it is. For a hub id only the config is fetched, unless it is a
    bitsandbytes 4-bit checkpoint: then its config and safetensors files are downloaded, since
    those are read directly (transformers' loader is not used for them).

    Args:
        name: a local directory or a hub id.
        revision: hub revision.
        trust_remote_code: passed to transformers.
        where: the setting that named it, for messages.

    Returns:
        The local directory (or the hub id of a 16-bit model) and the quantization method (None: 16-bit).

    Raises:
        FileNotFoundError: a local-looking path that does not exist.
    """
    from .hub import looks_local

    name = str(name)
    local = os.path.expanduser(name)
    if looks_local(name) and not os.path.isdir(local):
        raise FileNotFoundError(f"{where}={name!r} does not exist")
    method = _method_of(name, local, revision, trust_remote_code)
    if os.path.isdir(local):
        return local, method
    return (_download(name, revision) if method == BNB_4BIT else name), method


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
    for key, module, attr, tensor in named_state(model):
        if key.endswith(".weight") and key[: -len(".weight")] in quantized and isinstance(module, Linear4bit):
            continue
        slots.setdefault(key, (module, attr, tensor))
        groups.setdefault(id(tensor), []).append(key)
    ignored = _ignored_patterns(model)
    owner = {k: layer for layer, keys in ckpt.layers.items() for k in keys}
    pending: dict[str, dict[str, Tensor]] = {}
    loaded: set[int] = set()
    unexpected: list[str] = []
    bar = progress_bar(ckpt.total_bytes, len(ckpt.layers), "loading 4-bit checkpoint", progress)
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
    missing += [key for key, _, _, t in named_state(model) if t.device.type == "meta"]
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
    "build_empty",
    "canonical_name",
    "check_quant",
    "checkpoint_quant",
    "is_4bit_checkpoint",
    "linear_names",
    "load_4bit_checkpoint",
    "load_pretrained",
    "load_weights",
    "locate_checkpoint",
    "preflight_checkpoint",
    "quantization_method",
    "read_4bit_checkpoint",
    "read_config",
    "read_safetensors_header",
    "weight_files",
]
