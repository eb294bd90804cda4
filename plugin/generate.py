"""Text generation from a base model (+ a LoRA adapter, or merged), on CPU or GPU.

:func:`generate` works on any HF causal LM, including one converted by ``QLoRAPrecision`` (the
4-bit forward runs on CPU too) or wrapped in a LightningModule; the console script
``lightning-qlora-generate`` builds the model with :func:`lightning_qlora.export.load_model`, from a
16-bit base (quantized as training quantized it) or a bitsandbytes 4-bit checkpoint (loaded as it is).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .anatomy import hf_root
from .checkpoint4bit_load import locate_checkpoint
from .data import load_tokenizer
from .export import load_model
from .messages import EXIT_USAGE, one_line
from .sharding import is_sharded

PROG = "lightning-qlora-generate"


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: str | Sequence[str],
    max_new_tokens: int = 64,
    temperature: float = 0.7,
    top_p: float = 0.9,
    top_k: int = 0,
    greedy: bool = False,
    seed: int | None = None,
    batch_size: int = 8,
    chat: bool = False,
    synced_gpus: bool | None = None,
) -> list[str]:
    """Completes each prompt; returns only the new text, special tokens removed.

    Args:
        model: an HF causal LM, converted or not, or a module wrapping exactly one.
        tokenizer: its tokenizer.
        prompts: one prompt or several.
        max_new_tokens: tokens generated per prompt at most.
        temperature: sampling temperature (ignored with ``greedy``).
        top_p: nucleus sampling mass; 1.0 disables it.
        top_k: keep the k most likely tokens; 0 disables it.
        greedy: pick the most likely token (deterministic).
        seed: seeds torch's RNG before sampling, for repeatable samples.
        batch_size: prompts per forward batch (left-padded).
        chat: wrap each prompt as a user message with the tokenizer's chat template.
        synced_gpus: every rank keeps running forwards until all ranks have finished their tokens: needed
            when every rank of a sharded (FSDP) model generates, since each forward gathers weights from all
            ranks. ``None``: on when the model is sharded over more than one process.

    Returns:
        One completion per prompt, in order.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not greedy and temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 when sampling; use greedy=True instead")
    lm, _ = hf_root(model)
    if not hasattr(lm, "generate"):
        raise TypeError(f"{type(model).__name__} holds no transformers model with .generate()")
    device = next((p.device for p in lm.parameters() if p.device.type != "meta"), torch.device("cpu"))
    if synced_gpus is None:
        synced_gpus = (
            is_sharded(lm) and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling: dict[str, Any] = (
        {"do_sample": False}
        if greedy
        else {
            "do_sample": True,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
        }
    )
    if seed is not None:
        torch.manual_seed(seed)
    texts = [_render(tokenizer, p) for p in prompts] if chat else list(prompts)
    was_training, side = lm.training, tokenizer.padding_side
    # Left padding keeps every prompt's last token next to its first generated one.
    tokenizer.padding_side = "left"
    lm.eval()
    completions: list[str] = []
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=not chat,  # a chat template already adds its own
            ).to(device)
            out = lm.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id,
                synced_gpus=synced_gpus,
                **sampling,
            )
            new = out[:, batch["input_ids"].shape[1] :]
            completions += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        lm.train(was_training)
    return completions


def _render(tokenizer: Any, prompt: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("--chat needs a tokenizer with a chat template")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: ``.jsonl`` rows (strings, or objects with ``prompt``/``instruction``/``text``),
    or plain text with one prompt per non-empty line."""
    path = Path(path)
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return lines
    prompts = []
    for number, line in enumerate(lines, 1):
        row = json.loads(line)
        if isinstance(row, dict):
            row = next((row[k] for k in ("prompt", "instruction", "text") if k in row), None)
        if not isinstance(row, str):
            raise ValueError(f"{path}:{number}: expected a string or an object with a 'prompt' field")
        prompts.append(row)
    return prompts


def main(argv: Sequence[str] | None = None) -> int:
    """``lightning-qlora-generate``: completions from a base model (+ adapter) for prompts."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Generate completions from a base model, a base + LoRA adapter, or a merged model.",
    )
    parser.add_argument(
        "--model",
        required=True,
        help="base or merged model: save_pretrained directory or hub id; a bitsandbytes 4-bit checkpoint "
        "(lightning-qlora-quantize's output, a ...-bnb-4bit repo) loads as it is, never re-quantized",
    )
    parser.add_argument("--adapter", default=None, help="LoRA adapter directory (lightning-qlora or PEFT)")
    parser.add_argument(
        "--quant",
        default="auto",
        choices=["auto", "nf4", "fp4", "none"],
        help="quantize the base (auto: the adapter's saved settings, nf4 for a PEFT adapter, none without adapter; "
        "a 4-bit base's own settings, checked against the adapter's; naming its type applies the adapter anyway)",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt")
    source.add_argument("--prompts-file", help="a .txt (one prompt a line) or .jsonl file of prompts")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--top-k", type=int, default=0, help="0 disables top-k")
    parser.add_argument("--greedy", action="store_true", help="deterministic: always the most likely token")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--chat", action="store_true", help="wrap prompts with the tokenizer's chat template")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument(
        "--dtype", default=None, help="compute dtype (default: float32 on CPU, bfloat16 on GPU)"
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer path or 'byte' (default: the model's)")
    parser.add_argument(
        "--output", default=None, help="also write {prompt, completion} rows to this .jsonl file"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar while a 4-bit base loads")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts_file)
        if not prompts:
            raise ValueError(f"{args.prompts_file} holds no prompts")
        # A missing model is named as such, before its tokenizer is looked for there.
        locate_checkpoint(args.model, where="--model")
        tokenizer = load_tokenizer(args.tokenizer or args.model)  # an EOS pad when it has no pad token
        model = load_model(
            args.model,
            args.adapter,
            quant=args.quant,
            compute_dtype=args.dtype,
            device=device,
            progress=not args.no_progress,
            where="--model",
        )
        completions = generate(
            model,
            tokenizer,
            prompts,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            greedy=args.greedy,
            seed=args.seed,
            batch_size=args.batch_size,
            chat=args.chat,
        )
    except (ValueError, OSError) as err:
        print(f"{PROG}: error: {one_line(err)}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    for prompt, completion in zip(prompts, completions, strict=True):
        print(completion if len(prompts) == 1 else f"### {prompt}\n{completion}\n")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            for prompt, completion in zip(prompts, completions, strict=True):
                f.write(json.dumps({"prompt": prompt, "completion": completion}, ensure_ascii=False) + "\n")
    return 0


__all__ = ["generate", "main", "read_prompts"]
