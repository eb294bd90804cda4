"""Loading a 16-bit or a bitsandbytes 4-bit checkpoint into the model that trains.

:func:`load_pretrained` gives ``CausalLMModule`` the model ready for training from either kind of
checkpoint: a 4-bit one is built empty, converted by ``QLoRAPrecision`` and its packed weights are placed
into the :class:`~lightning_qlora.Linear4bit` layers as they are, shard by shard, straight onto the device
(never re-quantized, never 16-bit on the GPU). Its layout is read by :mod:`.checkpoint4bit`; the settings
are checked against it by :mod:`.checkpoint4bit_check`.
"""

from __future__ import annotations

import copy
import os
import re
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint4bit import (
    BNB_4BIT,
    Checkpoint4bit,
    canonical_name,
    named_state,
    progress_bar,
    quantization_method,
    read_4bit_checkpoint,
    read_config,
)
from .checkpoint4bit_check import _other_method, check_quant
from .nf4 import (
    Linear4bit,
    deferred_linear_init,
    named_linears,
)


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
