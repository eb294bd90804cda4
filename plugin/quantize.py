"""``lightning-qlora-quantize``: a bitsandbytes 4-bit checkpoint made from a 16-bit one, shard by shard.

    lightning-qlora-quantize --model llama-2-70b --out llama-2-70b-nf4 --device cuda

Reads one safetensors shard at a time, quantizes each linear weight on ``--device`` exactly as
training would (cast to the compute dtype, then bitsandbytes), copies every other tensor as it
is, and writes one output shard per input shard, the index, config.json with
``quantization_config``, and the tokenizer and other small files. The host holds about one input
shard plus one output shard; the GPU one weight. Point ``model.name_or_path`` at the output to
train from it; transformers loads it too.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from .checkpoint4bit import (
    progress_bar,
    quantization_method,
    read_config,
    read_safetensors_header,
    weight_files,
)
from .checkpoint4bit_write import ShardWriter, copy_side_files, staged_output, write_config
from .host_memory import host_peak_rss
from .messages import EXIT_USAGE, one_line
from .nf4 import (
    BLOCKSIZES,
    QUANT_TYPES,
    QuantConfig,
    largest_blocksize,
    name_matches,
    named_linears,
    quantize_tensor,
    serialize_params4bit,
)

PROG = "lightning-qlora-quantize"


def quantize_checkpoint(
    model: str | os.PathLike,
    out: str | os.PathLike,
    quant: QuantConfig | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, float]:
    """Writes a 16-bit ``save_pretrained`` directory as a bitsandbytes 4-bit checkpoint.

    Args:
        model: the 16-bit checkpoint directory (safetensors, one file or sharded).
        out: a new (or empty) directory; written in full or not at all.
        quant: the quantization (default :class:`QuantConfig`'s: nf4, double quant, block size 64,
            bfloat16, head kept 16-bit); ``skip_modules`` are copied in 16-bit.
        device: where each weight is quantized.
        progress: show a progress bar (bytes read, layers quantized).

    Returns:
        ``layers`` quantized, ``bytes_in`` and ``bytes_out``, and ``peak_rss`` (bytes, this process).

    Raises:
        ValueError: a missing or non-transformers directory, an already-quantized model, a weight
            the model's config does not explain, or an unwritable ``out``; one line each.
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    quant = quant or QuantConfig()
    src = Path(model).expanduser()
    if not src.is_dir():
        raise ValueError(
            f"--model='{model}' is not a directory; give a save_pretrained directory of the 16-bit model"
        )
    config_json = read_config(src, "--model")
    method = quantization_method(config_json)
    if method is not None:
        raise ValueError(
            f"--model='{model}' is already quantized ({method}, see quantization_config in its config.json); give "
            "the 16-bit model"
        )
    files = weight_files(src)
    headers = {}
    for file in files:
        headers.update(read_safetensors_header(file))
    hf_config = AutoConfig.from_pretrained(str(src))
    with torch.device("meta"):  # the layer names and shapes, without weights
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    targets: dict[str, tuple[int, int]] = {}
    skipped: list[str] = []
    for name, layer in named_linears(skeleton):
        if name_matches(name, quant.skip_modules):
            skipped.append(name)
            continue
        if layer.in_features < quant.blocksize:
            raise ValueError(
                f"--blocksize={quant.blocksize} is larger than the input width ({layer.in_features}) of '{name}'; "
                f"use --blocksize {largest_blocksize(layer.in_features)} or add '{name}' to --skip-modules"
            )
        targets[name + ".weight"] = (layer.out_features, layer.in_features)
    del skeleton
    absent = [k for k in targets if k not in headers]
    if absent:
        raise ValueError(
            f"--model='{model}' lacks {absent[:3]}: its tensor names do not match the {hf_config.model_type} model its "
            "config.json describes"
        )
    for key, shape in targets.items():
        if headers[key].shape != shape:
            raise ValueError(
                f"--model='{model}': {key} has shape {headers[key].shape}, its config says {shape}"
            )
    device = torch.device(device)
    bytes_in = sum(t.nbytes for t in headers.values())
    done = 0
    with staged_output(out) as staging:
        bar = progress_bar(bytes_in, len(targets), "quantizing", progress)
        # One output shard per input shard: the host holds at most one of each.
        writer = ShardWriter(staging, max_shard_size=2**62)
        for file in files:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    tensor = f.get_tensor(key)
                    if key in targets:
                        packed = serialize_params4bit(quantize_tensor(tensor, quant, device))
                        writer.add_many({key + suffix: t for suffix, t in packed.items()})
                        done += 1
                        bar.set_postfix_str(f"layers {done}/{len(targets)}", refresh=False)
                    else:
                        writer.add(key, tensor)
                    bar.update(headers[key].nbytes)
                    del tensor
            writer.flush()
        writer.finish()
        bytes_out = writer.total_size
        # The 16-bit tensors keep their dtype, so config.json's dtype stays as it was.
        write_config(hf_config, staging, replace(quant, skip_modules=skipped), skipped)
        copy_side_files(src, staging)  # tokenizer, generation config, license, ...
    bar.close()
    return {
        "layers": done,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "peak_rss": host_peak_rss(),
    }


def _gb(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def main(argv: Sequence[str] | None = None) -> int:
    """``lightning-qlora-quantize``: 16-bit checkpoint in, bitsandbytes 4-bit checkpoint out."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Quantize a 16-bit transformers checkpoint to a bitsandbytes 4-bit one, shard by shard "
        "(transformers' format: lightning-qlora, transformers and PEFT load it).",
    )
    parser.add_argument("--model", required=True, help="the 16-bit model: a save_pretrained directory")
    parser.add_argument("--out", required=True, help="output directory (new or empty)")
    parser.add_argument(
        "--quant-type", default="nf4", choices=QUANT_TYPES, help="4-bit data type (default nf4)"
    )
    parser.add_argument(
        "--blocksize", type=int, default=64, choices=BLOCKSIZES, help="weights per absmax constant"
    )
    parser.add_argument(
        "--no-double-quant",
        action="store_true",
        help="keep the absmax constants in float32 (no double quantization)",
    )
    parser.add_argument(
        "--compute-dtype",
        default="bfloat16",
        choices=["bfloat16", "float16", "float32"],
        help="dtype weights are cast to before quantizing and computed in (default bfloat16)",
    )
    parser.add_argument(
        "--skip-modules",
        default="lm_head",
        help="comma-separated linear layers (names or name suffixes) kept in 16-bit (default lm_head)",
    )
    parser.add_argument(
        "--device",
        default=None,
        choices=["cpu", "cuda"],
        help="where weights are quantized (default: cuda when a GPU is visible, else cpu)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        return _error("--device=cuda but no CUDA GPU is visible; use --device cpu")
    skip = [s.strip() for s in args.skip_modules.split(",") if s.strip()]
    quant = QuantConfig(
        quant_type=args.quant_type,
        double_quant=not args.no_double_quant,
        blocksize=args.blocksize,
        compute_dtype=args.compute_dtype,
        skip_modules=skip,
    )
    try:
        stats = quantize_checkpoint(args.model, args.out, quant, device, progress=not args.no_progress)
    except (ValueError, OSError) as err:
        return _error(one_line(err))
    print(
        f"{args.out}: {stats['layers']} linear layers quantized ({quant.quant_type}, blocksize {quant.blocksize}, "
        f"double quant {'on' if quant.double_quant else 'off'}, on {device}); {_gb(stats['bytes_in'])} -> "
        f"{_gb(stats['bytes_out'])}; peak host memory {_gb(stats['peak_rss'])}"
    )
    return 0


def _error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
