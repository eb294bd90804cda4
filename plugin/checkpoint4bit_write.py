"""Writing bitsandbytes 4-bit checkpoints in transformers' format (the reading side is :mod:`.checkpoint4bit`).

* :class:`ShardWriter` and :func:`staged_output`: safetensors shards of bounded size, in a directory
  that appears only when complete; every writer here and the merged export use them.
* :func:`save_4bit_checkpoint` writes a converted model's quantized base, so transformers
  (``from_pretrained``) and PEFT load it back.
* :func:`write_random_4bit_checkpoint` writes a random-initialised model one module at a time (the
  70B benchmark's checkpoint, which has no 16-bit copy anywhere).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint4bit import (
    SAFE_INDEX,
    SAFE_WEIGHTS,
    WEIGHT_SUFFIXES,
    canonical_name,
    named_state,
    progress_bar,
)
from .nf4 import (
    Linear4bit,
    QuantConfig,
    largest_blocksize,
    name_matches,
    named_linears,
    quantize_tensor,
    serialize_params4bit,
)


def parse_size(size: int | str) -> int:
    """``"2GB"``, ``"500MB"``, ``"40KB"`` or a byte count (an int, or digits as a command line gives them) as bytes."""
    from transformers.utils.hub import convert_file_size_to_int

    if isinstance(size, str) and size.strip().isdigit():
        size = int(size)
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
    from .anatomy import hf_root

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
    dense = [t for _, _, _, t in named_state(root) if t.is_floating_point() and not _is_packed(t)]
    dtype = dense[0].dtype if dense else quant.compute_dtype
    with staged_output(out, "out") as staging:
        writer = ShardWriter(staging, max_shard_size)
        seen: set[int] = set()
        for key, module, attr, tensor in named_state(root):
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


def copy_side_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copies a model directory's small files (tokenizer, generation config, license, ...) into ``dst``.

    Everything but config.json and the weights (and their index), which the caller writes itself.

    Returns:
        The names copied.
    """
    copied = []
    for extra in sorted(Path(src).iterdir()):
        if extra.is_file() and extra.name != "config.json" and not extra.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(extra, Path(dst) / extra.name)
            copied.append(extra.name)
    return copied


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
        if not name_matches(name, quant.skip_modules) and layer.in_features < quant.blocksize:
            raise ValueError(
                f"quant.blocksize={quant.blocksize} is larger than the input width ({layer.in_features}) of "
                f"'{name}'; use blocksize <= {largest_blocksize(layer.in_features)} or skip that layer"
            )
    skip = [n for n in linear_names.values() if name_matches(n, quant.skip_modules)]
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
    bar = progress_bar(total, n_quantized, "writing random 4-bit checkpoint", progress)
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
    "ShardWriter",
    "bnb_quantization_config",
    "copy_side_files",
    "parse_size",
    "save_4bit_checkpoint",
    "staged_output",
    "write_config",
    "write_random_4bit_checkpoint",
]
