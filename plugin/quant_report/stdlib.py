"""The standard-library study (``--stdlib-llama``): a corpus of the running Python's own sources, a BPE
tokenizer trained on it, and a ~100M-parameter Llama (``tiny``: a 2-layer one for CPUs) to fit on it
before :func:`~lightning_qlora.quant_report.study.run_study` measures the 4-bit formats on the held-out
files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import sysconfig
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .study import PreparedStudy, StudySettings, check_settings, prepare_study

STDLIB_LLAMA: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 12,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
}
TINY_STDLIB_LLAMA: dict[str, Any] = {
    **STDLIB_LLAMA,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
}


@dataclass
class StdlibPlan:
    """The sizes of a standard-library study (full: one H200 in ~6 minutes; tiny: a CPU in ~1)."""

    model: dict[str, Any]
    vocab_size: int
    max_length: int
    batch_size: int
    train_steps: int
    max_train_seconds: float | None
    lr: float
    lora_steps: int
    lora_lr: float
    eval_tokens: int
    corpus_bytes: int | None  # None: every file
    tokenizer_bytes: int  # BPE trained on at most this many bytes of training text


STDLIB_PLANS: dict[str, StdlibPlan] = {
    "full": StdlibPlan(
        model=STDLIB_LLAMA,
        vocab_size=8192,
        max_length=512,
        batch_size=32,
        train_steps=1500,
        max_train_seconds=150.0,
        lr=1e-3,
        lora_steps=200,
        lora_lr=1e-3,
        eval_tokens=1 << 18,
        corpus_bytes=None,
        tokenizer_bytes=8 << 20,
    ),
    "tiny": StdlibPlan(
        model=TINY_STDLIB_LLAMA,
        vocab_size=1024,
        max_length=128,
        batch_size=16,
        train_steps=60,
        max_train_seconds=None,
        lr=3e-3,
        lora_steps=10,
        lora_lr=2e-3,
        eval_tokens=4096,
        corpus_bytes=600_000,
        tokenizer_bytes=600_000,
    ),
}


def stdlib_files() -> tuple[Path, list[Path]]:
    """Every ``.py`` file of the running Python's standard library, sorted (no site-packages)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p
        for p in root.rglob("*.py")
        if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts) and p.is_file()
    ]
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


def is_held_out(relpath: str) -> bool:
    """1 file in 20, chosen by a hash of its path: whole files are held out, so no text leaks."""
    return zlib.crc32(relpath.encode()) % 20 == 0


def _chunks(text: str, max_chars: int) -> list[str]:
    """Whole lines, at most ``max_chars`` per chunk (a longer line is cut)."""
    out, cur, size = [], [], 0
    for line in text.splitlines(keepends=True):
        while len(line) > max_chars:
            out.append(line[:max_chars])
            line = line[max_chars:]
        if size + len(line) > max_chars and cur:
            out.append("".join(cur))
            cur, size = [], 0
        cur.append(line)
        size += len(line)
    if cur:
        out.append("".join(cur))
    return [c for c in out if c.strip()]


def build_stdlib_corpus(out_dir: Path, plan: StdlibPlan, max_length: int | None = None) -> dict[str, Any]:
    """Write ``train.jsonl`` and ``val.jsonl`` (text rows) from the standard library's sources.

    Files are read as UTF-8 (the few that are not, test fixtures with other encodings, are skipped),
    held out whole by :func:`is_held_out`, and cut into chunks of whole lines short enough to fit
    ``max_length`` tokens (the data module truncates an example to ``max_length`` before packing).
    """
    root, files = stdlib_files()
    out_dir.mkdir(parents=True, exist_ok=True)
    # ~3 characters per BPE token on Python source: 2 characters per token of budget leaves room.
    max_chars = 2 * (max_length or plan.max_length)
    stats = {
        "root": str(root),
        "python": sys.version.split()[0],
        "files": 0,
        "skipped_not_utf8": 0,
        "skipped_empty": 0,
        "bytes": 0,
        "train_files": 0,
        "val_files": 0,
        "train_bytes": 0,
        "val_bytes": 0,
        "chunk_chars": max_chars,
    }
    # A size-limited corpus (the tiny plan) fills each split to its share of the budget, so a small
    # corpus still holds out whole files (the first files in path order are rarely held out).
    budget = {"train": None, "val": None}
    if plan.corpus_bytes is not None:
        budget = {"train": plan.corpus_bytes * 19 // 20, "val": plan.corpus_bytes // 20}
    with open(out_dir / "train.jsonl", "w") as train, open(out_dir / "val.jsonl", "w") as val:
        for p in files:
            if plan.corpus_bytes is not None and all(stats[f"{k}_bytes"] >= v for k, v in budget.items()):
                break
            rel = p.relative_to(root).as_posix()
            split = "val" if is_held_out(rel) else "train"
            if budget[split] is not None and stats[f"{split}_bytes"] >= budget[split]:
                continue
            try:
                text = p.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                stats["skipped_not_utf8"] += 1
                continue
            if not text.strip():
                stats["skipped_empty"] += 1
                continue
            fh = val if split == "val" else train
            for chunk in _chunks(text, max_chars):
                fh.write(json.dumps({"text": chunk}) + "\n")
            n = len(text.encode())
            stats["files"] += 1
            stats["bytes"] += n
            stats[f"{split}_files"] += 1
            stats[f"{split}_bytes"] += n
    stats["pydoc_data"] = "included (pydoc_data/topics.py is one of the .py files)"
    return stats


def train_bpe_tokenizer(train_jsonl: Path, out_dir: Path, vocab_size: int, max_bytes: int) -> dict[str, Any]:
    """A byte-level BPE tokenizer trained on the start of the training text, saved for ``load_tokenizer``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts, size = [], 0
    with open(train_jsonl) as fh:
        for line in fh:
            t = json.loads(line)["text"]
            texts.append(t)
            size += len(t)
            if size >= max_bytes:
                break
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=1 << 16
    )
    fast.save_pretrained(str(out_dir))
    return {"kind": "byte-level BPE (tokenizers)", "vocab_size": len(fast), "trained_on_chars": size}


def _quoted(value: str) -> str:
    """A Hydra override value quoted, so any path is taken literally."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def stdlib_config(
    out_dir: Path, plan: StdlibPlan, device: torch.device, overrides: Sequence[str] = ()
) -> Any:
    """The ``default`` recipe, pointed at the corpus, its tokenizer and the plan's Llama.

    The plan's settings are Hydra overrides that come before the user's, so a user's override
    (``data.max_length=1024``, ``optimizer.lr=3e-4``) wins over the plan.
    """
    from ..builders import compose_recipe

    data = out_dir / "data"
    model = ",".join(f"{k}:{str(v).lower() if isinstance(v, bool) else v}" for k, v in plan.model.items())
    settings = [
        f"++model.from_config={{{model}}}",
        f"model.tokenizer={_quoted(str(out_dir / 'tokenizer'))}",
        "model.compile=false",
        f"data.path={_quoted(str(data / 'train.jsonl'))}",
        f"data.val_split={_quoted(str(data / 'val.jsonl'))}",
        "data.format=text",
        "data.packing=true",
        f"data.max_length={plan.max_length}",
        f"data.batch_size={plan.batch_size}",
        f"data.cache_dir={_quoted(str(out_dir / 'cache'))}",
        f"optimizer.lr={plan.lr}",
        "optimizer.warmup_ratio=0.05",
        "optimizer.weight_decay=0.1",
        "trainer.accumulate_grad_batches=1",
        f"quant.compute_dtype={'bfloat16' if device.type == 'cuda' else 'float32'}",
    ]
    return compose_recipe("default", [*settings, *overrides])


def prepare_stdlib_study(
    out_dir: str | os.PathLike[str],
    plan_name: str,
    settings: StudySettings,
    device: torch.device,
    overrides: Sequence[str] = (),
    log: Callable[[str], None] | None = None,
) -> PreparedStudy:
    """Corpus, tokenizer and the plan's Llama on the standard library, ready for :func:`run_study`.

    Settings given explicitly (steps, evaluation tokens, LoRA steps) win over the plan's.
    """
    from omegaconf import OmegaConf

    say = log or (lambda _m: None)
    plan = STDLIB_PLANS[plan_name]
    out = Path(out_dir)
    cfg = stdlib_config(out, plan, device, overrides)  # composed first: a bad override fails at once
    # The fit from scratch and the LoRA phase share every setting but the learning rate.
    lora_cfg = cfg.copy()
    OmegaConf.update(lora_cfg, "optimizer.lr", plan.lora_lr)
    s = dataclasses.replace(
        settings,
        train_steps=settings.train_steps or plan.train_steps,
        max_train_seconds=settings.max_train_seconds or plan.max_train_seconds,
        eval_tokens=settings.eval_tokens or plan.eval_tokens,
        lora_steps=plan.lora_steps if settings.lora_steps is None else settings.lora_steps,
    )
    check_settings(cfg, s, device, lora_cfg)  # before anything is written
    t = time.perf_counter()
    corpus = build_stdlib_corpus(out / "data", plan, int(cfg.data.max_length))
    corpus["tokenizer"] = train_bpe_tokenizer(
        out / "data" / "train.jsonl", out / "tokenizer", plan.vocab_size, plan.tokenizer_bytes
    )
    corpus["plan"] = plan_name
    corpus["seconds"] = time.perf_counter() - t
    say(
        f"corpus: {corpus['files']} files, {corpus['bytes'] / 1e6:.1f} MB of the standard library "
        f"({corpus['val_files']} held out); BPE vocabulary {corpus['tokenizer']['vocab_size']}, "
        f"{corpus['seconds']:.0f} s"
    )
    return prepare_study(cfg, f"stdlib-llama ({plan_name})", s, out, device, corpus, lora_cfg)
