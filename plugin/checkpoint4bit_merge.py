"""A LoRA adapter merged into a bitsandbytes 4-bit checkpoint, streamed one tensor at a time.

Merging into a 4-bit base means: dequantize each 4-bit weight (bitsandbytes), add ``B @ A * scaling``
in float32, and cast. The result is a 16-bit model, as PEFT's ``merge_and_unload`` gives for a
4-bit base; it can also be re-quantized to a 4-bit checkpoint with the base's settings, which
rounds the merged weights to 4 bits once more (lossy).

No model is built: the checkpoint's shards are read tensor by tensor (``safe_open``), each 4-bit
layer is merged on ``device`` as soon as its packed codes and quant state are in, and the result
goes into bounded safetensors shards (:class:`~.checkpoint4bit_write.ShardWriter`). The host holds
one output shard, one layer in float32 and its temporaries, never the 16-bit model.
"""

from __future__ import annotations

import copy
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .adapters import adapter_lora_config, read_adapter
from .checkpoint4bit import Checkpoint4bit, progress_bar, read_4bit_checkpoint
from .checkpoint4bit_check import linear_names
from .checkpoint4bit_write import ShardWriter, copy_side_files, staged_output, write_config
from .nf4 import as_dtype, params4bit_from_serialized, quantize_tensor, serialize_params4bit
from .nf4_matmul import dequantize


def check_adapter_fits(
    ckpt: Checkpoint4bit,
    adapter: str | os.PathLike,
    cfg: dict[str, Any],
    pairs: dict[str, tuple[Tensor, Tensor]],
    where: str = "--base",
) -> None:
    """Refuses an adapter whose layers the checkpoint does not have, or has with other shapes.

    Read from the checkpoint's headers and quant states only, so a wrong pairing is refused before
    a weight is read.

    Args:
        ckpt: the base (:func:`~.checkpoint4bit.read_4bit_checkpoint`).
        adapter: the adapter directory, for messages.
        cfg: its ``adapter_config.json``.
        pairs: its ``(A, B)`` per layer (:func:`~.adapters.read_adapter`).
        where: the setting that named the base, for messages.

    Raises:
        ValueError: one line naming the first layer that does not fit, and the fix.
    """
    trained_on = cfg.get("base_model_name_or_path")
    fix = "give the base model the adapter was trained on" + (
        f" (its adapter_config.json names {trained_on!r})" if trained_on else ""
    )
    for name, (a, b) in pairs.items():
        shape = ckpt.weight_shape(name)
        if shape is None:
            raise ValueError(
                f"adapter '{adapter}' adapts {name}, which {where}='{ckpt.path}' has no weight for; {fix}"
            )
        wanted = (b.shape[0], a.shape[1])
        if tuple(shape) != wanted:
            raise ValueError(
                f"adapter '{adapter}' does not fit {where}='{ckpt.path}': {name} is {tuple(shape)} there, the "
                f"adapter's lora_B @ lora_A is {wanted}; {fix}"
            )


@torch.no_grad()
def merge_4bit_checkpoint(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    dtype: str | torch.dtype = "bfloat16",
    max_shard_size: int | str = "2GB",
    device: str | torch.device = "cpu",
    quantize: bool = False,
    tokenizer: Any = None,
    progress: bool = True,
    where: str = "--base",
) -> Path:
    """Writes a 4-bit checkpoint + adapter as one merged checkpoint, layer by layer.

    Every 4-bit weight is dequantized (to the dtype its quant state records), the adapter's
    ``B @ A * scaling`` added in float32 where it has one, and the sum cast to ``dtype``; 16-bit
    tensors are cast to ``dtype`` (an adapted 16-bit linear layer gets its update added first).
    ``quantize=True`` quantizes each merged weight of a layer that was 4-bit in the base again, with
    the base's settings (its weights cast to ``dtype`` first, as training casts to its compute
    dtype), and writes a bitsandbytes 4-bit checkpoint instead.

    Args:
        base: the 4-bit checkpoint directory.
        adapter: the adapter directory (ours or PEFT's).
        out: a new (or empty) directory; written in full or not at all.
        dtype: dtype of the merged weights (with ``quantize``: of the 16-bit tensors, and the compute
            dtype recorded in ``quantization_config``).
        max_shard_size: largest safetensors shard.
        device: where each layer is dequantized, merged (and re-quantized); ``cuda`` for speed.
        quantize: write a re-quantized 4-bit checkpoint instead of a 16-bit one.
        tokenizer: saved over the base's tokenizer files when given (they are copied otherwise).
        progress: show a progress bar (bytes read, layers merged).
        where: the setting that named ``base``, for messages.

    Returns:
        The output directory.

    Raises:
        ValueError: an incomplete checkpoint, an adapter that does not fit it, or an ``out`` that
            exists non-empty or cannot be written; before anything is written.
    """
    from safetensors import safe_open
    from transformers import AutoConfig

    out_dtype = as_dtype(dtype, "dtype")
    work = torch.device(device)
    ckpt = read_4bit_checkpoint(base, where)
    cfg, pairs = read_adapter(adapter)
    check_adapter_fits(ckpt, adapter, cfg, pairs, where)
    scaling = adapter_lora_config(cfg).scaling
    hf_config = AutoConfig.from_pretrained(str(ckpt.path))
    requant = None
    if quantize:
        skip = [n for n in linear_names(ckpt.path) if n not in ckpt.layers]
        requant = replace(ckpt.quant, compute_dtype=out_dtype, skip_modules=skip)
    owner = {key: layer for layer, keys in ckpt.layers.items() for key in keys}

    def write_layer(writer: ShardWriter, layer: str, weight: Tensor) -> None:
        """``weight`` (float32, on ``work``) merged with the layer's adapter, written as 16-bit or re-quantized."""
        if layer in pairs:
            a, b = pairs[layer]
            # LoRALinear.delta_weight's arithmetic, so a 16-bit base's export gives the same bits; in place, so
            # the layer costs two float32 copies, not three.
            delta = b.to(work).float() @ a.to(work).float()
            delta *= scaling
            weight += delta
            del delta
        if requant is not None and layer in ckpt.layers:
            packed = serialize_params4bit(quantize_tensor(weight, requant, work))
            writer.add_many({f"{layer}.weight{suffix}": t for suffix, t in packed.items()})
        else:
            writer.add(f"{layer}.weight", weight.to(out_dtype))

    with staged_output(out, "--out") as staging:
        writer = ShardWriter(staging, max_shard_size)
        bar = progress_bar(
            ckpt.total_bytes, len(ckpt.layers), "merging adapter into 4-bit checkpoint", progress
        )
        pending: dict[str, dict[str, Tensor]] = {}
        done = 0
        for file in ckpt.files:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    bar.update(ckpt.tensors[key].nbytes)
                    if key in owner:  # a part of a 4-bit weight: merged once all its parts are in
                        layer = owner[key]
                        parts = pending.setdefault(layer, {})
                        parts[key[len(layer) + len(".weight") :]] = f.get_tensor(key)
                        if len(parts) == len(ckpt.layers[layer]):
                            # Packed codes stored as a float dtype (for FSDP) are the same bytes: read as uint8, as bitsandbytes does.
                            packed = params4bit_from_serialized(
                                pending.pop(layer), work, quant_storage=torch.uint8
                            )
                            weight = dequantize(packed).float()
                            write_layer(writer, layer, weight)
                            del weight
                            done += 1
                            bar.set_postfix_str(f"layers {done}/{len(ckpt.layers)}", refresh=False)
                        continue
                    tensor = f.get_tensor(key)
                    layer = key.removesuffix(".weight")
                    if key.endswith(".weight") and layer in pairs:  # an adapted layer kept 16-bit in the base
                        write_layer(writer, layer, tensor.to(work, torch.float32, copy=True))
                    else:
                        writer.add(key, tensor.to(out_dtype) if tensor.is_floating_point() else tensor)
                    del tensor
        bar.close()
        writer.finish()
        copy_side_files(ckpt.path, staging)  # tokenizer, generation config, license, ...
        if requant is not None:
            write_config(hf_config, staging, requant, requant.skip_modules, out_dtype)
        else:
            config = copy.deepcopy(hf_config)
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            config.dtype = out_dtype
            config.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return Path(out)


__all__ = ["check_adapter_fits", "merge_4bit_checkpoint"]
