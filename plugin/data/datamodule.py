"""`InstructDataModule`: fine-tuning data as a LightningDataModule.

Rows come from `readers` (a local file, a folder or hub dataset, or the shipped
`builtin:tiny_instruct`). They are tokenized once with loss on response tokens only,
optionally packed, and cached on disk under a key of (source fingerprint, tokenizer, settings).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from ..loss import IGNORE_INDEX
from .config import ON_OVERLONG, DataConfig
from .encoding import encode_examples, flat, pack
from .formats import instruction_prompt, resolve_template
from .loader import EpochSampler, ResumableLoader, resume_mismatch
from .readers import (
    EXTENSIONS,
    detect_format,
    load_hub,
    local_or_hub,
    normalize_rows,
    resolve_source,
    split_rows,
)
from .tokenizer import load_tokenizer

_CACHE_VERSION = 2  # bump when reading, encoding or packing changes what ends up in the cache
# The settings that change the processed data, hence its cache key (batching and workers do not).
_KEYED_SETTINGS = (
    "format",
    "train_split",
    "val_split",
    "val_fraction",
    "max_length",
    "on_overlong",
    "train_on_prompt",
    "packing",
    "prompt_template",
    "text_field",
    "max_samples",
    "seed",
)


def _tokenizer_fingerprint(tok: Any) -> str:
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    h.update(
        backend.to_str().encode()
        if backend is not None
        else json.dumps(sorted(tok.get_vocab().items())).encode()
    )
    ids = [type(tok).__name__, tok.chat_template, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id]
    h.update(json.dumps(ids, default=str).encode())
    return h.hexdigest()[:16]


def describe_data_losses(stats: dict[str, Any]) -> str | None:
    """One line saying what `data.max_length` / `data.on_overlong` cost, or None when nothing was lost.

    Args:
        stats: `InstructDataModule.stats` after `setup`.

    Example:
        "data: of 1,600 examples, 2 truncated to data.max_length=128, 1 dropped (its prompt alone
        fills data.max_length=128); 1,234 tokens lost. Raise data.max_length to keep them, or set
        data.on_overlong=drop|error"
    """
    truncated, dropped = stats.get("truncated", 0), stats.get("dropped", 0)
    if not truncated and not dropped:
        return None
    empty, max_length = stats.get("dropped_empty", 0), stats.get("max_length")
    policy = stats.get("on_overlong", "truncate")
    parts = [f"{truncated:,} truncated to data.max_length={max_length}"] if truncated else []
    if long := dropped - empty:
        parts.append(
            f"{long:,} dropped as longer than data.max_length={max_length} (data.on_overlong=drop)"
            if policy == "drop"
            else f"{long:,} dropped (the prompt alone fills data.max_length={max_length})"
        )
    if empty:
        parts.append(
            f"{empty:,} dropped with nothing to train on (no response, e.g. a chat without an assistant turn)"
        )
    line = f"data: of {stats.get('rows', 0):,} examples, {', '.join(parts)}; {stats.get('lost_tokens', 0):,} tokens lost"
    if truncated or long:
        others = "|".join(p for p in ON_OVERLONG if p != policy)
        line += f". Raise data.max_length to keep them, or set data.on_overlong={others}"
    return line


class _Collator:
    """Right-pad a list of rows into a batch; padding gets attention 0 and label -100."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        n = max(len(r["input_ids"]) for r in rows)
        batch = {
            "input_ids": torch.full((len(rows), n), self.pad_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(rows), n), dtype=torch.long),
            "labels": torch.full((len(rows), n), IGNORE_INDEX, dtype=torch.long),
        }
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            batch["input_ids"][i, :k] = torch.as_tensor(r["input_ids"])
            batch["labels"][i, :k] = torch.as_tensor(r["labels"])
            batch["attention_mask"][i, :k] = (
                torch.as_tensor(r["attention_mask"]) if "attention_mask" in r else 1
            )
        return batch


class InstructDataModule(L.LightningDataModule):
    """Instruction, chat or plain-text data, tokenized once and cached.

    Batches are `{"input_ids", "attention_mask", "labels"}` LongTensors, right-padded;
    `labels` is -100 on prompt tokens (unless `train_on_prompt`), on padding, and on the
    first token of every example (nothing inside the example predicts it; in packed rows
    this also keeps the loss from crossing example boundaries).

    Args:
        tokenizer: a tokenizer, or a name for `load_tokenizer` (`None`/"byte": built-in).
        config: the data settings; `None` builds one from `settings`.
        **settings: fields of `DataConfig` (see there for each), e.g. `path=`, `batch_size=`;
            with a `config`, they replace its values.

    Raises:
        TypeError: `config` is not a `DataConfig`, or a setting is not one of its fields.
        ValueError: a setting out of range (naming `data.<field>`), or a tokenizer without EOS.
    """

    def __init__(self, tokenizer: Any = None, config: DataConfig | None = None, **settings: Any):
        super().__init__()
        if config is None:
            config = DataConfig(**settings)
        elif not isinstance(config, DataConfig):
            raise TypeError(
                f"config must be a DataConfig, got {type(config).__name__}; pass settings as keywords, "
                "e.g. InstructDataModule(tok, path=...)"
            )
        elif settings:
            config = dataclasses.replace(config, **settings)
        self.config = config
        self.tokenizer = (
            load_tokenizer(tokenizer) if tokenizer is None or isinstance(tokenizer, str) else tokenizer
        )
        if self.tokenizer.eos_token_id is None:
            raise ValueError(
                "the tokenizer has no eos_token; responses need one so generation learns to stop"
            )
        self.templates = resolve_template(config.prompt_template)
        self._own_cache = config.cache_dir is not None
        self.cache_dir = (
            Path(config.cache_dir)
            if config.cache_dir
            else Path(datasets.config.HF_DATASETS_CACHE) / "lightning_qlora"
        )
        bos = self.tokenizer.bos_token_id
        self._bos = [] if bos is None else [bos]
        pad = self.tokenizer.pad_token_id
        self.pad_id = self.tokenizer.eos_token_id if pad is None else pad
        self.train_dataset: datasets.Dataset | None = None
        self.val_dataset: datasets.Dataset | None = None
        self.stats: dict[str, Any] = {}
        self.data_format: str | None = None if config.format == "auto" else config.format  # known after setup
        self._key = ""
        self._samples: list[dict] = []

    # ------------------------------------------------------------------ prompts

    def format_prompt(self, example: dict | str) -> str:
        """The prompt text of an example, without its response: what generation continues.

        Args:
            example: an instruction row (`instruction`, optional `input`), a bare instruction
                string, a chat row (`messages`; trailing assistant turns are dropped), or a
                text row (returned as is).

        Returns:
            The prompt as the model sees it in training (`prompt_ids` adds BOS where needed).
        """
        if isinstance(example, str):
            example = {"instruction": example}
        if "messages" in example:
            msgs = list(example["messages"])
            while msgs and msgs[-1]["role"] == "assistant":
                msgs.pop()
            return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        if "instruction" in example:
            return instruction_prompt(self.templates, example["instruction"], example.get("input") or "")
        return example.get(self.config.text_field, example.get("text", ""))

    def prompt_ids(self, example: dict | str) -> list[int]:
        """Token ids of `format_prompt(example)` exactly as training tokenizes prompts."""
        ids = self.tokenizer(self.format_prompt(example), add_special_tokens=False)["input_ids"]
        return ids if isinstance(example, dict) and "messages" in example else self._bos + ids

    def sample_examples(self, n: int = 4) -> list[dict]:
        """Up to `n` validation rows (training rows if there is no validation), as raw dicts."""
        return self._samples[:n]

    @property
    def num_train_tokens(self) -> int:
        """Non-padding tokens in the training set (after truncation)."""
        return self.stats.get("train_tokens", 0)

    # ------------------------------------------------------------------ tokenizing

    def _tokenize(
        self, ds: datasets.Dataset, fmt: str, what: str, source: str, where: Callable[[int], str]
    ) -> tuple[datasets.Dataset, dict]:
        """Token ids and labels of every example, with `data.on_overlong` applied to the long ones.

        Returns the tokenized split and its counts: `rows` examples read, `truncated` and `dropped`
        examples, `dropped_empty` (nothing to train on even at full length, e.g. a chat without an
        assistant turn; part of `dropped`), `lost_tokens` (cut from truncated examples plus all
        tokens of dropped ones).
        """
        n = {"rows": len(ds), "truncated": 0, "dropped": 0, "dropped_empty": 0, "lost_tokens": 0}
        max_length, max_samples = self.config.max_length, self.config.max_samples
        policy = self.config.on_overlong

        def fn(batch: dict) -> dict:
            out = {"input_ids": [], "labels": []}
            pairs = encode_examples(self.tokenizer, batch, fmt, self.templates, self.config.train_on_prompt)
            for row, (ids, labels) in zip(batch.get("_row", []), pairs, strict=True):
                full = len(ids)
                # nothing inside an example predicts its first token, so its first label never counts
                if all(x == IGNORE_INDEX for x in labels[1:]):
                    n["dropped"] += 1
                    n["dropped_empty"] += 1
                    n["lost_tokens"] += full
                    continue
                if full > max_length:
                    if policy == "error":
                        raise ValueError(
                            f"{where(row)}: the example is {full} tokens, more than data.max_length={max_length}; "
                            "raise data.max_length, or set data.on_overlong=truncate (cut it) or drop (skip it)"
                        )
                    ids, labels = ids[:max_length], [IGNORE_INDEX, *labels[1:max_length]]
                    if policy == "drop" or all(x == IGNORE_INDEX for x in labels):  # the prompt fills it
                        n["dropped"] += 1
                        n["lost_tokens"] += full
                        continue
                    n["truncated"] += 1
                    n["lost_tokens"] += full - max_length
                else:
                    labels = [IGNORE_INDEX, *labels[1:]]
                out["input_ids"].append(ids)
                out["labels"].append(labels)
            return out

        ds = ds.map(
            fn,
            batched=True,
            remove_columns=ds.column_names,
            keep_in_memory=True,  # the result is saved under our own cache key below
            new_fingerprint=f"{self._key}-tok-{what}",
            desc=f"Tokenizing {what}",
        )
        if len(ds) == 0:
            why = f"{n['dropped']} of {n['rows']} dropped"
            if n["dropped_empty"]:
                why += f" ({n['dropped_empty']} with nothing to train on, e.g. no assistant turn)"
            if n["dropped"] > n["dropped_empty"]:
                why += (
                    f" because the prompt alone fills max_length={max_length}"
                    if policy == "truncate"
                    else f" as longer than max_length={max_length} (data.on_overlong=drop)"
                )
            if n["rows"] == 0:
                why = "no rows" + (f" (max_samples={max_samples})" if max_samples is not None else "")
            raise ValueError(
                f"empty dataset after filtering: the {what} set of {source} has no examples left ({why}); "
                "raise data.max_length, check data.max_samples, or add data"
            )
        return ds, n

    # ------------------------------------------------------------------ caching

    def _cache_key(self, kind: str, src: Any, hub: datasets.DatasetDict | None, val: Any) -> str:
        def fingerprint(x: Any) -> Any:
            if isinstance(x, Path):
                st = x.stat()
                return [str(x.resolve()), st.st_size, st.st_mtime_ns]
            return x

        source = (
            fingerprint(src)
            if kind == "file"
            else [src, self.config.name, {s: d._fingerprint for s, d in hub.items()}]
        )
        settings = {k: getattr(self.config, k) for k in _KEYED_SETTINGS}
        blob = [_CACHE_VERSION, source, fingerprint(val), _tokenizer_fingerprint(self.tokenizer), settings]
        return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def _prepare(self) -> Path:
        """Build the processed train/val sets unless cached; return their cache directory."""
        c = self.config
        kind, src = resolve_source(c.path)
        hub_cache = str(self.cache_dir / "hf") if self._own_cache else None  # else the shared HF cache
        hub = load_hub(src, c.name, hub_cache) if kind == "hub" else None
        val_src = None
        if c.val_split is not None and (Path(c.val_split).suffix.lower() in EXTENSIONS or kind == "file"):
            vkind, val_src = local_or_hub(c.val_split)
            if vkind != "file":
                raise ValueError(
                    f"val_split '{c.val_split}' is not a file, and {src} is a single file with no named "
                    "splits; give val_split a file path, or null to hold out val_fraction of the rows"
                )
        self._key = self._cache_key(kind, src, hub, val_src)
        out = self.cache_dir / self._key
        if (out / "meta.json").exists():
            return out

        def normalized(rows: list | datasets.Dataset, desc: str) -> datasets.Dataset:
            return normalize_rows(rows, desc, fmt, c.text_field, c.max_samples, self._key)

        def locator(rows: list | datasets.Dataset, desc: str) -> Callable[[int], str]:
            """Where row `i` (the `_row` column) came from, for messages: "file, line 7"."""
            return (lambda i: rows[i][0]) if isinstance(rows, list) else (lambda i: f"{desc}, row {i + 1}")

        rows, cols, desc = split_rows(kind, src, c.train_split, hub, c.text_field)
        fmt = detect_format(cols, c.text_field, desc) if c.format == "auto" else c.format
        train = normalized(rows, desc)
        where_train = where_val = locator(rows, desc)  # held-out rows keep their `_row`
        if val_src is not None:
            vrows, _, vdesc = split_rows("file", val_src, "", None, c.text_field)
            val, where_val = normalized(vrows, vdesc), locator(vrows, vdesc)
        elif c.val_split is not None:
            vrows, _, vdesc = split_rows(kind, src, c.val_split, hub, c.text_field)
            val, where_val = normalized(vrows, vdesc), locator(vrows, vdesc)
        elif c.val_fraction > 0 and len(train) > 0:
            n_val = max(1, round(len(train) * c.val_fraction))
            if n_val >= len(train):
                raise ValueError(
                    f"empty dataset after filtering: {desc} has {len(train)} row(s), and holding out "
                    f"val_fraction={c.val_fraction} (at least 1 row) leaves none to train on; add rows, "
                    "set data.val_split, or data.val_fraction=0"
                )
            perm = np.random.default_rng(c.seed).permutation(len(train))
            train, val = train.select(np.sort(perm[n_val:])), train.select(np.sort(perm[:n_val]))
        else:
            val = None
        samples = (val if val is not None else train).select(
            range(min(8, len(val if val is not None else train)))
        )
        samples = samples.remove_columns([c for c in ("_row",) if c in samples.column_names])

        train, tn = self._tokenize(train, fmt, "training", desc, where_train)
        stats = {
            "format": fmt,
            "train_rows": tn["rows"] - tn["dropped"],
            "max_length": c.max_length,
            "on_overlong": c.on_overlong,
        }
        counts = dict(tn)
        if val is not None:
            val, vn = self._tokenize(val, fmt, "validation", desc, where_val)
            stats["val_rows"] = vn["rows"] - vn["dropped"]
            counts = {k: tn[k] + vn[k] for k in tn}
        # totals over both splits: `rows` read, and what data.max_length / on_overlong cost of them
        stats.update(counts)
        if c.packing:
            train = pack(train, c.max_length, self.pad_id, c.seed)
            val = None if val is None else pack(val, c.max_length, self.pad_id, c.seed)
        for split, ds in (("train", train), ("val", val)):
            if ds is not None:
                packed = "attention_mask" in ds.column_names
                stats[f"{split}_sequences"] = len(ds)
                stats[f"{split}_tokens"] = int(
                    flat(ds, "attention_mask").sum() if packed else len(flat(ds, "input_ids"))
                )
                stats[f"{split}_label_tokens"] = int((flat(ds, "labels") != IGNORE_INDEX).sum())

        # Build in a temporary folder and rename, so a crash or a second process never sees half a cache.
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.cache_dir))
        train.save_to_disk(str(tmp / "train"))
        if val is not None:
            val.save_to_disk(str(tmp / "val"))
        meta = {"stats": stats, "samples": samples.to_list(), "source": desc}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False))
        try:
            os.rename(tmp, out)
        except OSError:  # another process finished first; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
        return out

    # ------------------------------------------------------------------ Lightning hooks

    def prepare_data(self) -> None:
        """Read, validate, tokenize and cache (Lightning runs this once per node)."""
        self._prepare()

    def setup(self, stage: str | None = None) -> None:
        """Load the cached train/val sets (building them if needed); a no-op when loaded."""
        if self.train_dataset is not None:
            return
        out = self._prepare()
        meta = json.loads((out / "meta.json").read_text())
        self.train_dataset = datasets.load_from_disk(str(out / "train"))
        self.val_dataset = datasets.load_from_disk(str(out / "val")) if (out / "val").exists() else None
        self.stats, self._samples = {**meta["stats"], "cache": str(out)}, meta["samples"]
        self.data_format = meta["stats"]["format"]

    def _loader_args(self) -> dict[str, Any]:
        return {
            "batch_size": self.config.batch_size,
            "num_workers": self.config.num_workers,
            "collate_fn": _Collator(self.pad_id),
            "persistent_workers": self.config.num_workers > 0,
            # worker seeds come from here, not from the global RNG, which dropout draws from
            "generator": torch.Generator(),
        }

    def train_dataloader(self) -> ResumableLoader:
        """Training batches in a seeded order per epoch; the position within the epoch is checkpointed.

        Epoch `e` visits the rows in the order of a permutation seeded with `data.seed + e` (split
        over the ranks under DDP), and the loader's `state_dict` (epoch, batches handed out, RNG
        state) goes into Lightning checkpoints, so a resumed run continues with the very next batch.
        """
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = EpochSampler(self.train_dataset, seed=self.config.seed, num_replicas=replicas, rank=rank)
        return ResumableLoader(
            self.train_dataset,
            sampler=sampler,
            limit_batches=lambda: getattr(self.trainer, "limit_train_batches", None),
            **self._loader_args(),
        )

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches, or `[]` (Lightning then skips validation) without a val set."""
        if self.val_dataset is None:
            return []
        return DataLoader(self.val_dataset, shuffle=False, **self._loader_args())

    def resume_problem(self, checkpoint: dict[str, Any], replicas: int | None = None) -> str | None:
        """Why a Lightning checkpoint's saved data position does not fit this data, or None.

        For a pre-flight check of `ckpt_path` (after `setup`): a position saved for another row
        count, batch size, seed or number of processes (``replicas``, when the caller knows it) cannot
        name the same batches. A checkpoint without a saved position (none of our loaders in it) is
        not a problem here.
        """
        try:
            states = checkpoint["loops"]["fit_loop"]["state_dict"].get("combined_loader") or []
        except (KeyError, TypeError, AttributeError):
            return None
        if not states or self.train_dataset is None:
            return None
        current = {
            "rows": len(self.train_dataset),
            "batch_size": self.config.batch_size,
            "seed": self.config.seed,
        }
        if replicas is not None:
            current["replicas"] = replicas
        return resume_mismatch(states[0], current)
