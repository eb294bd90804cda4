"""Adapters in PEFT's LoRA format, and merging them into 16-bit weights.

``save_adapter`` writes ``adapter_model.safetensors`` + ``adapter_config.json`` exactly as PEFT
does, so ``peft.PeftModel.from_pretrained(base, directory)`` loads them; it also writes
``qlora_config.json`` (our quantization + LoRA settings) so the same 4-bit base can be rebuilt.
``load_adapter`` reads ours and PEFT-made LoRA adapters into a model converted by
:class:`~lightning_qlora.QLoRAPrecision`, validating everything before it touches the model.
``merge_adapter`` folds adapters into 16-bit weights one layer at a time. Building a model from a
base + adapter and the merged export live in :mod:`lightning_qlora.export`; the
``AdapterCheckpoint`` callback in :mod:`lightning_qlora.callbacks`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .anatomy import hf_root
from .atomic import TMP_MARK, fsync_path, owner_alive, remove_entry, replace_file, write_directory_atomically
from .lora import LoRAConfig, LoRALinear, lora_layers
from .nf4 import Linear4bit, QuantConfig, as_dtype, named_linears, parent_module
from .nf4_matmul import dequantize

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"  # older PEFT releases
ADAPTER_CONFIG = "adapter_config.json"
QLORA_CONFIG = "qlora_config.json"
PEFT_PREFIX = "base_model.model."

# PEFT features that change the adapter's arithmetic; loading them as plain LoRA would be silently wrong.
_UNSUPPORTED = {
    "use_dora": "DoRA adapters",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D) adapters",
    "lora_bias": "adapters with a LoRA bias",
    "layer_replication": "layer replication",
    "modules_to_save": "modules_to_save (fully trained extra modules)",
    "trainable_token_indices": "trainable token indices",
}


def _target_modules(root: nn.Module, names: Sequence[str]) -> list[str] | str:
    """What PEFT should match: leaf names when they select exactly ``names``, else a full-name regex.

    PEFT matches a list by name suffix, so ``["q_proj"]`` would also adapt q_proj layers that we
    left alone (a regex target or ``exclude_modules``); a regex over full names is exact.
    """
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    # Linear layers as PEFT sees them: a LoRALinear stands for its base, whose own name is hidden.
    linears = [n for n, _ in named_linears(root) if not n.endswith(".base_layer")] + list(lora_layers(root))
    selected = {n for n in linears if n.rsplit(".", 1)[-1] in leaves}
    if selected == set(names):
        return leaves
    return "(" + "|".join(re.escape(n) for n in sorted(names)) + ")"


def _infer_quant(root: nn.Module) -> QuantConfig | None:
    """The QuantConfig a converted model was built with (skip_modules: its 16-bit linear layers)."""
    quantized = [m for _, m in named_linears(root) if isinstance(m, Linear4bit)]
    if not quantized:
        return None
    first = quantized[0]
    skipped = [n for n, m in named_linears(root) if not isinstance(m, Linear4bit)]
    return first.quant_config(skip_modules=tuple(skipped))


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    precision: Any = None,
) -> Path:
    """Writes the model's LoRA adapters in PEFT's format.

    Args:
        model: a model converted by ``QLoRAPrecision`` (an HF model, or a module wrapping one).
        directory: created if needed. The directory is written whole or not at all (a hidden temporary
            sibling, fsynced, then renamed into place: :mod:`lightning_qlora.atomic`), so an
            interrupted save leaves the previous adapter or none, never a partial one. A directory
            that also holds other files keeps them; there the adapter files are replaced one by one,
            ``adapter_config.json`` removed first and written last.
        base_model_name_or_path: recorded for PEFT; default ``model.config._name_or_path``.
        precision: the ``QLoRAPrecision`` used for training; its quantization goes to
            ``qlora_config.json`` (inferred from the model's layers when omitted).

    Returns:
        The directory.

    Raises:
        ValueError: the model has no LoRA layers, or its layers differ in rank, alpha or rsLoRA
            (PEFT's ``rank_pattern`` / ``alpha_pattern`` are not written).
    """
    from safetensors.torch import save_file

    root, _ = hf_root(model)
    layers = lora_layers(root)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no LoRA layers to save; convert it with QLoRAPrecision.convert_module "
            "(the Trainer does this) first"
        )
    first_name, first = next(iter(layers.items()))
    lora_cfg = first.config  # each layer keeps the LoRAConfig it was built (or loaded) with

    def settings(cfg: LoRAConfig) -> str:
        return f"r={cfg.r}, alpha={cfg.alpha:g}, use_rslora={cfg.use_rslora}"

    for name, layer in layers.items():
        if settings(layer.config) != settings(lora_cfg):
            raise ValueError(
                f"LoRA layers differ: '{first_name}' has {settings(lora_cfg)} but '{name}' has "
                f"{settings(layer.config)}; per-layer ranks and alphas are not supported"
            )
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(root, "config", None), "_name_or_path", None) or None
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora_cfg.r,
        "lora_alpha": lora_cfg.alpha,
        "lora_dropout": lora_cfg.dropout,
        "target_modules": _target_modules(root, list(layers)),
        "use_rslora": lora_cfg.use_rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    tensors = {}
    for name, layer in layers.items():
        for part in ("lora_A", "lora_B"):
            weight = getattr(layer, part).weight
            tensors[f"{PEFT_PREFIX}{name}.{part}.weight"] = (
                weight.detach().to("cpu", torch.float32).contiguous()
            )
    quant = getattr(precision, "quant", None) if precision is not None else _infer_quant(root)
    qlora = {
        "quant": None if quant is None else quant.to_dict(),
        "lora": {**lora_cfg.to_dict(), "target_modules": list(layers)},
    }
    out = Path(directory)
    files = {
        ADAPTER_WEIGHTS: lambda p: save_file(tensors, str(p), metadata={"format": "pt"}),
        QLORA_CONFIG: lambda p: p.write_text(json.dumps(qlora, indent=2) + "\n"),
        # last: it is what marks a directory as an adapter (read_adapter_config looks for it first)
        ADAPTER_CONFIG: lambda p: p.write_text(json.dumps(config, indent=2) + "\n"),
    }
    owned = {*files, ADAPTER_WEIGHTS_BIN}
    if out.is_dir() and any(entry.name not in owned for entry in out.iterdir()):
        # A directory that holds other files too (the user's): never swap it as a whole. Its adapter config
        # goes first and comes back last, so an interrupted save leaves a directory that is refused as
        # "no adapter_config.json", never old weights with a new config or the reverse.
        for entry in out.iterdir():  # temporaries of an earlier interrupted save like this one
            if (
                entry.name.startswith(".")
                and entry.name[1:].split(TMP_MARK)[0] in files
                and not owner_alive(entry.name)
            ):
                remove_entry(entry)
        (out / ADAPTER_CONFIG).unlink(missing_ok=True)
        (out / ADAPTER_WEIGHTS_BIN).unlink(missing_ok=True)  # would shadow nothing, but mislead a reader
        for name, write in files.items():
            replace_file(out / name, write)
        fsync_path(out)
        return out

    def write_all(tmp: Path) -> None:
        for name, write in files.items():
            write(tmp / name)

    write_directory_atomically(out, write_all)
    return out


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The validated ``adapter_config.json`` of a LoRA adapter directory.

    Raises:
        ValueError: no adapter there, malformed JSON, not LoRA, or a LoRA variant this package
            cannot apply exactly (DoRA, per-layer ranks or alphas, ...).
    """
    path = Path(directory)
    where = f"adapter directory '{path}'"
    if not path.is_dir():
        raise ValueError(f"{where} does not exist")
    cfg_file = path / ADAPTER_CONFIG
    if not cfg_file.is_file():
        raise ValueError(
            f"{where} has no {ADAPTER_CONFIG} (found: {sorted(p.name for p in path.iterdir())[:10]}); "
            "it must hold adapter_config.json + adapter_model.safetensors as written by save_adapter or PEFT"
        )
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{where}: {ADAPTER_CONFIG} is not valid JSON: {err}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: {ADAPTER_CONFIG} must hold a JSON object, not {type(cfg).__name__}")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{where}: peft_type={cfg.get('peft_type')!r}; only LoRA adapters can be loaded")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"{where}: {ADAPTER_CONFIG} has r={r!r}; it must be a positive integer")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ValueError(f"{where}: {ADAPTER_CONFIG} has lora_alpha={alpha!r}; it must be a positive number")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise ValueError(
                f"{where}: {key}={cfg[key]!r} gives layers different ranks or alphas; lightning-qlora supports one "
                "rank and alpha for all layers"
            )
    for key, what in _UNSUPPORTED.items():
        if cfg.get(key):
            raise ValueError(f"{where}: {key}={cfg[key]!r}; {what} are not supported")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{where}: bias={cfg['bias']!r}; only bias='none' adapters are supported")
    return cfg


def adapter_lora_config(cfg: dict[str, Any], target_modules: Any = "all-linear") -> LoRAConfig:
    """The :class:`LoRAConfig` a validated ``adapter_config.json`` describes (rank, alpha, rsLoRA).

    Args:
        cfg: from :func:`read_adapter_config`.
        target_modules: the layers to adapt (e.g. :func:`target_names` of the directory); the file's
            own ``target_modules`` uses PEFT's suffix matching, not ours.
    """
    return LoRAConfig(
        r=cfg["r"],
        alpha=cfg["lora_alpha"],
        target_modules=target_modules,
        use_rslora=bool(cfg.get("use_rslora")),
    )


def _read_adapter_weights(directory: Path) -> dict[str, Tensor]:
    safetensors_file, bin_file = directory / ADAPTER_WEIGHTS, directory / ADAPTER_WEIGHTS_BIN
    try:
        if safetensors_file.is_file():
            from safetensors.torch import load_file

            return load_file(str(safetensors_file))
        if bin_file.is_file():
            return torch.load(bin_file, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which
        raise ValueError(f"adapter directory '{directory}': cannot read its weights: {err}") from None
    raise ValueError(f"adapter directory '{directory}' has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")


_KEY = re.compile(r"^(?P<layer>.+)\.(?P<part>lora_A|lora_B)(?:\.[^.]+)?\.weight$")


def _layer_key(key: str) -> tuple[str, str] | None:
    """``base_model.model.X.lora_A[.default].weight`` -> ``("X", "lora_A")``; None for other keys."""
    match = _KEY.match(key.removeprefix(PEFT_PREFIX))
    return (match["layer"], match["part"]) if match else None


def target_names(directory: str | os.PathLike) -> list[str]:
    """Qualified names (relative to the HF model) of the layers an adapter directory adapts."""
    read_adapter_config(directory)
    names = []
    for key in _read_adapter_weights(Path(directory)):
        parsed = _layer_key(key)
        if parsed and parsed[0] not in names:
            names.append(parsed[0])
    return names


def read_adapter(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, tuple[Tensor, Tensor]]]:
    """An adapter directory read without a model: its validated config and each layer's ``(A, B)``.

    For tools that apply an adapter to weights they stream (the merged export of a 4-bit
    checkpoint); :func:`load_adapter` checks the same file against a model instead.

    Returns:
        ``adapter_config.json`` (:func:`read_adapter_config`) and, per adapted layer (named as in
        the HF model), its float ``lora_A`` (r x in) and ``lora_B`` (out x r) weights.

    Raises:
        ValueError: a key that is not a LoRA weight, a layer with only one of A and B, a rank other
            than the config's ``r``, or no weights at all; naming the directory and the key.
    """
    path = Path(directory)
    cfg = read_adapter_config(path)
    where = f"adapter directory '{path}'"
    parts: dict[str, dict[str, Tensor]] = {}
    for key, tensor in _read_adapter_weights(path).items():
        parsed = _layer_key(key)
        if parsed is None:
            raise ValueError(
                f"{where}: key '{key}' is not a LoRA weight (lora_A/lora_B); it is not a LoRA adapter"
            )
        parts.setdefault(parsed[0], {})[parsed[1]] = tensor
    if not parts:
        raise ValueError(f"{where}: the adapter file holds no LoRA weights")
    pairs: dict[str, tuple[Tensor, Tensor]] = {}
    for name, found in parts.items():
        for part in ("lora_A", "lora_B"):
            if part not in found:
                raise ValueError(
                    f"{where}: '{name}' has no {part} weight in the adapter file; save the adapter again"
                )
        a, b = found["lora_A"], found["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != cfg["r"] or b.shape[1] != cfg["r"]:
            raise ValueError(
                f"{where}: '{name}' has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, which do not make rank "
                f"r={cfg['r']} of its {ADAPTER_CONFIG}; the files do not belong together"
            )
        pairs[name] = (a, b)
    return cfg, pairs


@torch.no_grad()
def load_adapter(model: nn.Module, directory: str | os.PathLike) -> list[str]:
    """Loads a LoRA adapter (ours or PEFT's) into a model converted by ``QLoRAPrecision``.

    Every adapter layer must exist in the model as a LoRA layer of the same rank and shape; the
    adapter's ``lora_alpha`` and ``use_rslora`` replace those in every LoRA layer's config, hence
    its scaling (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA).
    LoRA layers of the model that the adapter does not cover get ``B = 0``, so the model computes
    exactly base + this adapter. Everything is checked before any weight changes: on error the
    model is untouched.

    Args:
        model: the converted model (an HF model or a module wrapping one).
        directory: holds ``adapter_config.json`` and ``adapter_model.safetensors``.

    Returns:
        The qualified names of the layers that received adapter weights.

    Raises:
        ValueError: naming the directory and the first mismatch, when the directory holds no
            usable adapter or the adapter does not fit the model.
    """
    path = Path(directory)
    cfg = read_adapter_config(path)
    tensors = _read_adapter_weights(path)
    root, _ = hf_root(model)
    layers = lora_layers(root)
    where = f"cannot load adapter '{path}'"
    if not layers:
        raise ValueError(
            f"{where}: {type(model).__name__} has no LoRA layers. Convert it first with "
            "QLoRAPrecision(lora=LoRAConfig(r=..., target_modules=...)).convert_module(model), or build it with "
            "lightning_qlora.export.load_model(base, adapter_dir)"
        )
    sample = next(iter(layers.values()))
    model_desc = (
        f"the model has {len(layers)} LoRA layers with r={sample.r} (e.g. {list(layers)[:3]}); "
        f"the adapter has r={cfg['r']}, lora_alpha={cfg['lora_alpha']}, target_modules={cfg.get('target_modules')}"
    )
    staged: dict[tuple[str, str], Tensor] = {}
    for key, tensor in tensors.items():
        parsed = _layer_key(key)
        if parsed is None:
            raise ValueError(f"{where}: key '{key}' is not a LoRA weight (lora_A/lora_B); {model_desc}")
        name, part = parsed
        if name not in layers:
            raise ValueError(
                f"{where}: key '{key}' targets '{name}', which is not a LoRA layer of the model; {model_desc}"
            )
        layer = layers[name]
        if layer.r != cfg["r"]:
            raise ValueError(
                f"{where}: rank mismatch at '{key}': the adapter has r={cfg['r']}, the model's layer r={layer.r}; "
                f"{model_desc}"
            )
        target = getattr(layer, part).weight
        if tuple(tensor.shape) != tuple(target.shape):
            raise ValueError(
                f"{where}: shape mismatch at '{key}': adapter {tuple(tensor.shape)}, model {tuple(target.shape)}; "
                f"{model_desc}"
            )
        if target.device.type == "meta":
            raise ValueError(
                f"{where}: the model's adapter weights are on the meta device; materialize the model first"
            )
        staged[(name, part)] = tensor.to(target.device, target.dtype)
    covered = {name for name, _ in staged}
    for name in covered:
        for part in ("lora_A", "lora_B"):
            if (name, part) not in staged:
                raise ValueError(f"{where}: '{name}' has no {part} weight in the adapter file; {model_desc}")
    if not covered:
        raise ValueError(f"{where}: the adapter file holds no LoRA weights")
    alpha, use_rslora = cfg["lora_alpha"], bool(cfg.get("use_rslora"))
    # Built before any change (replace re-validates): the layers' configs then say what the file says.
    configs = {
        name: dataclasses.replace(layer.config, alpha=alpha, use_rslora=use_rslora)
        for name, layer in layers.items()
    }
    # Validated: from here on nothing can fail halfway. copy_ keeps the Parameter objects (and any
    # optimizer state pointing at them).
    for name, layer in layers.items():
        layer.config = configs[name]
        if name in covered:
            layer.lora_A.weight.copy_(staged[(name, "lora_A")])
            layer.lora_B.weight.copy_(staged[(name, "lora_B")])
        else:
            layer.lora_B.weight.zero_()
    return sorted(covered, key=list(layers).index)


def _release_adapter_hooks(model: nn.Module) -> None:
    """Undoes QLoRAPrecision's adapters-only ``state_dict`` so ``save_pretrained`` sees every weight."""
    for module in model.modules():
        for handle in getattr(module, "_qlora_hooks", ()):
            handle.remove()
        for attr in ("_qlora_hooks", "_qlora_converted"):
            if attr in module.__dict__:
                delattr(module, attr)


@torch.no_grad()
def merge_adapter(
    model: nn.Module, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None
) -> nn.Module:
    """Folds every adapter into its base weight and leaves a plain 16-bit model, in place.

    One layer at a time: the 4-bit weight is dequantized by bitsandbytes (on ``device`` when
    given, e.g. ``"cuda"``), ``B @ A * scaling`` is added in float32, and the result is cast to
    ``dtype`` and moved to the host before the next layer, so the device never holds more than one
    16-bit layer. A 4-bit weight not yet quantized is quantized on ``device`` first, as the
    training forward would have. 4-bit layers without an adapter are dequantized too. No re-quantization.

    Args:
        model: a model converted by ``QLoRAPrecision`` (adapters loaded).
        dtype: dtype of the merged model (default: the quantization's compute dtype).
        device: where to dequantize and merge (merged layers then go to the host); default: where
            each layer lies, and it stays there.

    Returns:
        ``model``, now made of ``nn.Linear`` layers, with a full ``state_dict`` again.
    """
    out_dtype = as_dtype(dtype, "dtype") if dtype is not None else None
    work = torch.device(device) if device is not None else None
    adapted = lora_layers(model)
    plain4 = [n for n, m in named_linears(model) if isinstance(m, Linear4bit) and not _inside(n, adapted)]
    for name in [*adapted, *plain4]:
        parent, attr = parent_module(model, name)
        layer = getattr(parent, attr)
        base = layer.base_layer if isinstance(layer, LoRALinear) else layer
        # With a work device the merged layer goes to the host; else it stays where the layer was.
        lives = base.weight.device
        host = torch.device("cpu") if work is not None or lives.type == "meta" else lives
        if isinstance(base, Linear4bit):
            if not base.quantized:  # quantize as the training forward would have, then dequantize
                base.quantize_(work or base.weight.device)
            w4 = base.weight if work is None or base.weight.device == work else base.weight.to(work)
            weight = dequantize(w4).float()
            default_dtype = base.compute_dtype
        else:
            weight = base.weight.detach().to(work or base.weight.device).float()
            default_dtype = base.weight.dtype
        if isinstance(layer, LoRALinear):
            weight += layer.delta_weight().to(weight.device)
        target = out_dtype or default_dtype
        linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight.to(host, target), requires_grad=False)
        if base.bias is not None:
            linear.bias = nn.Parameter(base.bias.detach().to(host, target), requires_grad=False)
        setattr(parent, attr, linear)
        del weight, layer, base
    if out_dtype is not None:
        model.to(out_dtype)
    _release_adapter_hooks(model)
    return model


def _inside(name: str, parents: dict[str, Any]) -> bool:
    return any(name.startswith(p + ".") for p in parents)


def read_qlora_config(directory: str | os.PathLike) -> dict[str, Any] | None:
    """Our ``qlora_config.json`` next to an adapter (None for a PEFT-made adapter)."""
    path = Path(directory) / QLORA_CONFIG
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"'{path}' is not valid JSON: {err}") from None


__all__ = [
    "adapter_lora_config",
    "load_adapter",
    "merge_adapter",
    "read_adapter",
    "read_adapter_config",
    "read_qlora_config",
    "save_adapter",
    "target_names",
]
