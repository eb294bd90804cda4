"""Fine-tuning data as a LightningDataModule: instruction, chat and plain-text rows.

Rows come from a local file (jsonl/json/csv/parquet/txt), a folder or hub dataset read by
`datasets.load_dataset`, or the shipped `builtin:tiny_instruct`. They are validated (errors
name the file and line), tokenized once with loss on response tokens only, optionally
packed, and cached on disk under a key of (source fingerprint, tokenizer, settings).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import datasets
import lightning as L
import numpy as np
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader

from .tokenizer import load_tokenizer

FORMATS = ("instruction", "chat", "text")
EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet", ".txt")
BUILTIN = {"tiny_instruct": Path(__file__).parent / "data" / "tiny_instruct.jsonl"}
IGNORE_INDEX = -100
_CACHE_VERSION = 1  # bump when the processing below changes what ends up in the cache
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

_ALPACA_HEAD = "Below is an instruction that describes a task{}. Write a response that appropriately completes the request.\n\n"
# name -> (template for rows with an input, template for rows without one)
PROMPT_TEMPLATES = {
    "alpaca": (
        _ALPACA_HEAD.format(", paired with an input that provides further context")
        + "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        _ALPACA_HEAD.format("") + "### Instruction:\n{instruction}\n\n### Response:\n",
    ),
    # Same markers without the preamble: 5x fewer prompt tokens for tiny CPU runs.
    "short": (
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "### Instruction:\n{instruction}\n\n### Response:\n",
    ),
}
_NEEDS = {
    "instruction": "fields 'instruction' and 'output' (or 'response'), optional 'input' (or 'context')",
    "chat": "a 'messages' field: a list of {'role': ..., 'content': ...}",
    "text": "a text field (data.text_field, default 'text')",
}


# ---------------------------------------------------------------------------- reading rows


def _read_file(path: Path, text_field: str) -> list[tuple[str, dict]]:
    """Read a local file into (where, row) pairs; `where` ("file, line 7") goes into errors."""
    ext = path.suffix.lower()
    try:
        if ext == ".parquet":
            import pyarrow.parquet as pq

            return [(f"{path}, row {i}", r) for i, r in enumerate(pq.read_table(path).to_pylist(), 1)]
        text = path.read_text(encoding="utf-8-sig")  # -sig: tolerate the BOM spreadsheet exports add
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: {e}") from e
    if ext == ".txt":  # one row per non-blank line, as datasets' "text" loader does
        return [
            (f"{path}, line {i}", {text_field: s.rstrip("\r")})
            for i, s in enumerate(text.split("\n"), 1)
            if s.strip()
        ]
    if ext == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        return [
            (f"{path}, line {reader.line_num}", {k: v for k, v in r.items() if k is not None}) for r in reader
        ]
    if ext == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # "Extra data" = JSON Lines in a .json file; read it as such
                raise ValueError(
                    f"{path}, line {e.lineno}: malformed JSON ({e.msg}, column {e.colno})"
                ) from e
        else:
            [(key, val)] = obj.items() if isinstance(obj, dict) and len(obj) == 1 else [(None, None)]
            if key != "messages" and isinstance(val, list):
                obj = val  # {"data": [...]}, what datasets' `field=` reads
            if not isinstance(obj, list):
                raise ValueError(
                    f"{path}: expected a JSON list of objects (or JSON Lines), got {type(obj).__name__}"
                )
            rows = [(f"{path}, row {i}", r) for i, r in enumerate(obj, 1)]
            for where, r in rows:
                if not isinstance(r, dict):
                    raise ValueError(f"{where}: expected a JSON object, got {type(r).__name__}")
            return rows
    rows = []
    for i, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {i}: malformed JSON ({e.msg}, column {e.colno})") from e
        if not isinstance(r, dict):
            raise ValueError(f"{path}, line {i}: expected a JSON object, got {type(r).__name__}")
        rows.append((f"{path}, line {i}", r))
    return rows


def _value(row: dict, names: tuple[str, ...]) -> Any:
    for n in names:
        v = row.get(n)
        if v is not None and not (isinstance(v, float) and math.isnan(v)):  # pandas/parquet nulls
            return v
    return None


def _text(v: Any, field: str, where: str) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float, bool)):  # a numeric answer such as 42 in JSON
        return str(v)
    raise ValueError(f"{where}: field '{field}' must be text, got {type(v).__name__}")


def _normalize(row: dict, fmt: str, where: str, text_field: str) -> dict:
    """Validate one row and return it in the canonical columns of its format."""

    def missing(field: str) -> ValueError:
        return ValueError(
            f"{where}: missing or empty field '{field}'; the {fmt} format needs {_NEEDS[fmt]}; "
            f"this row has fields {sorted(row)}"
        )

    if fmt == "instruction":
        out = {}
        for field, names in (("instruction", ("instruction",)), ("output", ("output", "response"))):
            v = _value(row, names)
            if v is None or (isinstance(v, str) and not v.strip()):
                raise missing(field)
            out[field] = _text(v, field, where)
        v = _value(row, ("input", "context"))
        out["input"] = "" if v is None else _text(v, "input", where)
        return out
    if fmt == "chat":
        msgs = _value(row, ("messages",))
        if msgs is None:
            raise missing("messages")
        if isinstance(msgs, str):  # csv cells hold JSON text
            try:
                msgs = json.loads(msgs)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: field 'messages' is not valid JSON ({e.msg})") from e
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f"{where}: field 'messages' must be a non-empty list of {{'role', 'content'}}")
        out = []
        for j, m in enumerate(msgs, 1):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m.get("content") is None:
                raise ValueError(f"{where}: message {j} needs 'role' (text) and 'content'; got {m!r:.200}")
            out.append(
                {"role": m["role"], "content": _text(m["content"], "content", f"{where}, message {j}")}
            )
        return {"messages": out}
    v = _value(row, (text_field,))
    if v is None:
        raise missing(text_field)
    return {"text": _text(v, text_field, where)}


def _detect_format(columns: list[str], text_field: str, source: str) -> str:
    cols = set(columns)
    if "instruction" in cols and cols & {"output", "response"}:
        return "instruction"
    if "messages" in cols:
        return "chat"
    if text_field in cols:
        return "text"
    needs = "; ".join(f"{f} needs {n}" for f, n in _NEEDS.items())
    raise ValueError(
        f"cannot detect the data format of {source}: columns found {sorted(cols)}; {needs}. "
        "Rename the columns, set data.text_field, or set data.format to one of instruction|chat|text"
    )


# ---------------------------------------------------------------------------- tokenizer id


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


def _flat(ds: datasets.Dataset, column: str) -> np.ndarray:
    """All values of a list column, concatenated (through Arrow, not Python lists)."""
    return pc.list_flatten(ds.with_format("arrow")[column]).to_numpy()


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


# ---------------------------------------------------------------------------- the module


class InstructDataModule(L.LightningDataModule):
    """Instruction, chat or plain-text data, tokenized once and cached.

    Batches are `{"input_ids", "attention_mask", "labels"}` LongTensors, right-padded;
    `labels` is -100 on prompt tokens (unless `train_on_prompt`), on padding, and on the
    first token of every example (nothing inside the example predicts it; in packed rows
    this also keeps the loss from crossing example boundaries).

    Args:
        tokenizer: a tokenizer, or a name for `load_tokenizer` (`None`/"byte": built-in).
        path: a local .jsonl/.json/.csv/.parquet/.txt file, a folder or hub dataset id for
            `datasets.load_dataset`, or `None`/"builtin:tiny_instruct" for the shipped data.
        name: the hub dataset's configuration name.
        format: auto|instruction|chat|text; auto picks from the columns.
        train_split: the split to train on (hub datasets and folders).
        val_split: a split name, or a file path, to validate on; `None` holds out
            `val_fraction` of the training rows instead.
        val_fraction: the seeded share of training rows held out when `val_split` is None
            (at least one row); 0 disables validation.
        max_length: examples are truncated to this many tokens (packed rows have exactly it).
        train_on_prompt: also put loss on prompt tokens (and user turns in chats).
        packing: concatenate examples into rows of exactly `max_length` tokens.
        batch_size: rows per batch.
        num_workers: DataLoader workers.
        prompt_template: "alpaca" (default), "short", or a format string with
            `{instruction}` and optionally `{input}`.
        text_field: the column holding plain text (text format).
        max_samples: keep only the first N rows of each split (quick runs).
        seed: seeds the held-out split and the order rows are packed in.
        cache_dir: where processed data is cached (default: the datasets cache).
    """

    def __init__(
        self,
        tokenizer: Any = None,
        path: str | None = None,
        name: str | None = None,
        format: str = "auto",
        train_split: str = "train",
        val_split: str | None = None,
        val_fraction: float = 0.05,
        max_length: int = 512,
        train_on_prompt: bool = False,
        packing: bool = False,
        batch_size: int = 4,
        num_workers: int = 0,
        prompt_template: str | None = None,
        text_field: str = "text",
        max_samples: int | None = None,
        seed: int = 42,
        cache_dir: str | None = None,
    ):
        super().__init__()
        if format not in ("auto", *FORMATS):
            raise ValueError(f"unknown data format '{format}'; allowed: auto, {', '.join(FORMATS)}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        if max_samples is not None and max_samples < 0:
            raise ValueError(f"max_samples must be >= 0 or null, got {max_samples}")
        self.tokenizer = (
            load_tokenizer(tokenizer) if tokenizer is None or isinstance(tokenizer, str) else tokenizer
        )
        if self.tokenizer.eos_token_id is None:
            raise ValueError(
                "the tokenizer has no eos_token; responses need one so generation learns to stop"
            )
        self.templates = self._resolve_template(prompt_template)
        self.path, self.name, self.format = path, name, format
        self.train_split, self.val_split, self.val_fraction = train_split, val_split, val_fraction
        self.max_length, self.train_on_prompt, self.packing = max_length, train_on_prompt, packing
        self.batch_size, self.num_workers = batch_size, num_workers
        self.prompt_template, self.text_field = prompt_template, text_field
        self.max_samples, self.seed = max_samples, seed
        self._own_cache = cache_dir is not None
        self.cache_dir = (
            Path(cache_dir) if cache_dir else Path(datasets.config.HF_DATASETS_CACHE) / "lightning_qlora"
        )
        bos = self.tokenizer.bos_token_id
        self._bos = [] if bos is None else [bos]
        pad = self.tokenizer.pad_token_id
        self.pad_id = self.tokenizer.eos_token_id if pad is None else pad
        self.train_dataset: datasets.Dataset | None = None
        self.val_dataset: datasets.Dataset | None = None
        self.stats: dict[str, Any] = {}
        self.data_format: str | None = None if format == "auto" else format  # known after setup
        self._key = ""
        self._samples: list[dict] = []

    # ------------------------------------------------------------------ prompts

    @staticmethod
    def _resolve_template(t: str | None) -> tuple[str, str]:
        t = "alpaca" if t is None else t
        if t in PROMPT_TEMPLATES:
            return PROMPT_TEMPLATES[t]
        try:
            t.format(instruction="", input="")
            ok = "{instruction}" in t
        except (KeyError, IndexError, ValueError):
            ok = False
        if not ok:
            raise ValueError(
                f"prompt_template must be one of {sorted(PROMPT_TEMPLATES)} or a format string with "
                f"'{{instruction}}' and optionally '{{input}}' (no other fields), got {t!r}"
            )
        return t, t

    def _instruction_prompt(self, instruction: str, input: str = "") -> str:
        with_input, without = self.templates
        if input and "{input}" not in with_input:  # a custom template without {input}
            instruction, input = f"{instruction}\n\n{input}", ""
        return (with_input if input else without).format(instruction=instruction, input=input)

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
            return self._instruction_prompt(example["instruction"], example.get("input") or "")
        return example.get(self.text_field, example.get("text", ""))

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

    # ------------------------------------------------------------------ loading

    def _source(self) -> tuple[str, Any]:
        """("file", Path) or ("hub", name-or-folder); raises on a missing/unsupported file."""
        path = self.path
        if path is None or path.startswith("builtin:"):
            key = "tiny_instruct" if path is None else path.split(":", 1)[1]
            if key not in BUILTIN:
                raise ValueError(
                    f"unknown builtin dataset '{path}'; available: {['builtin:' + k for k in BUILTIN]}"
                )
            return "file", BUILTIN[key]
        return self._local_or_hub(path)

    @staticmethod
    def _local_or_hub(path: str) -> tuple[str, Any]:
        p = Path(path).expanduser()
        if p.is_dir():
            return "hub", str(p)  # load_dataset reads a folder of train/validation/test files
        if p.is_file():
            if p.suffix.lower() not in EXTENSIONS:
                raise ValueError(
                    f"unsupported data file {p} (extension '{p.suffix}'); supported: {', '.join(EXTENSIONS)}"
                )
            return "file", p
        if p.suffix.lower() in EXTENSIONS or path.startswith((".", "/", "~")) or not _HUB_ID.match(path):
            raise FileNotFoundError(
                f"data file not found: {p}; give an existing {'/'.join(EXTENSIONS)} file, a folder, "
                "a hub dataset id, or builtin:tiny_instruct"
            )
        return "hub", path

    def _load_hub(self, path: str) -> datasets.DatasetDict:
        cache = str(self.cache_dir / "hf") if self._own_cache else None  # else the shared HF cache
        try:
            return datasets.load_dataset(path, self.name, cache_dir=cache)
        except Exception as e:  # offline hub, bad folder layout, ...: one message that names it
            raise ValueError(
                f"could not load dataset '{path}': it is not a local file, and datasets.load_dataset "
                f"failed ({type(e).__name__}: {e}). Local files may be {', '.join(EXTENSIONS)}"
            ) from e

    def _rows(
        self, kind: str, src: Any, split: str, hub: datasets.DatasetDict | None
    ) -> tuple[list | datasets.Dataset, list[str], str]:
        """Raw rows of one split: (rows, columns, description for messages)."""
        if kind == "file":
            rows = _read_file(src, self.text_field)
            cols = sorted({k for _, r in rows for k in r})
            return rows, cols, str(src)
        if split not in hub:
            raise ValueError(f"dataset '{src}' has no split '{split}'; its splits are {sorted(hub)}")
        return hub[split], hub[split].column_names, f"dataset '{src}' split '{split}'"

    def _normalized(self, rows: list | datasets.Dataset, desc: str, fmt: str) -> datasets.Dataset:
        if self.max_samples is not None:
            rows = (
                rows[: self.max_samples]
                if isinstance(rows, list)
                else rows.select(range(min(self.max_samples, len(rows))))
            )
        if isinstance(rows, list):
            return datasets.Dataset.from_list(
                [_normalize(r, fmt, where, self.text_field) for where, r in rows]
            )

        def norm(batch: dict, idx: list[int]) -> dict:
            out = [
                _normalize({k: batch[k][j] for k in batch}, fmt, f"{desc}, row {i + 1}", self.text_field)
                for j, i in enumerate(idx)
            ]
            return {k: [o[k] for o in out] for k in out[0]} if out else {}

        fp = f"{self._key}-norm-{len(rows)}"  # given, so datasets need not hash this closure
        return rows.map(
            norm,
            batched=True,
            with_indices=True,
            remove_columns=rows.column_names,
            keep_in_memory=True,
            new_fingerprint=fp,
        )

    # ------------------------------------------------------------------ tokenizing

    def _encode(self, batch: dict, fmt: str) -> list[tuple[list[int], list[int]]]:
        """(input_ids, labels) for each example of a batch, before truncation."""
        tok = self.tokenizer

        def enc(texts: list[str]) -> list[list[int]]:
            return tok(texts, add_special_tokens=False)["input_ids"] if texts else []

        if fmt == "instruction":
            prompts = enc(
                [
                    self._instruction_prompt(i, x)
                    for i, x in zip(batch["instruction"], batch["input"], strict=True)
                ]
            )
            outs = enc(batch["output"])
            pairs = []
            for p, r in zip(prompts, outs, strict=True):
                p, r = self._bos + p, r + [tok.eos_token_id]  # EOS so generation learns to stop
                pairs.append((p + r, (p if self.train_on_prompt else [IGNORE_INDEX] * len(p)) + r))
            return pairs
        if fmt == "text":
            return [(ids, ids) for ids in (self._bos + t + [tok.eos_token_id] for t in enc(batch["text"]))]
        pairs = []
        for msgs in batch["messages"]:
            ids = enc([tok.apply_chat_template(msgs, tokenize=False)])[0]
            if self.train_on_prompt:
                pairs.append((ids, ids))
                continue
            # The template's own turn end (e.g. EOS) is part of the assistant span: found by
            # rendering the conversation up to each assistant turn, with and without it.
            labels = [IGNORE_INDEX] * len(ids)
            for i, m in enumerate(msgs):
                if m["role"] != "assistant":
                    continue
                before, upto = enc(
                    [
                        tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
                        if i
                        else "",
                        tok.apply_chat_template(msgs[: i + 1], tokenize=False),
                    ]
                )
                if ids[: len(upto)] != upto or upto[: len(before)] != before:
                    raise ValueError(
                        "the tokenizer's chat template renders a conversation differently from its "
                        "prefixes, so assistant tokens cannot be located; set data.train_on_prompt=true"
                    )
                labels[len(before) : len(upto)] = upto[len(before) :]
            pairs.append((ids, labels))
        return pairs

    def _tokenize(
        self, ds: datasets.Dataset, fmt: str, what: str, source: str
    ) -> tuple[datasets.Dataset, dict]:
        n = {"rows": len(ds), "truncated": 0, "dropped": 0}

        def fn(batch: dict) -> dict:
            out = {"input_ids": [], "labels": []}
            for ids, labels in self._encode(batch, fmt):
                if len(ids) > self.max_length:
                    n["truncated"] += 1
                    ids, labels = ids[: self.max_length], labels[: self.max_length]
                labels = [IGNORE_INDEX, *labels[1:]]
                if all(x == IGNORE_INDEX for x in labels):  # the prompt alone fills max_length
                    n["dropped"] += 1
                    continue
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
            why = f"{n['dropped']} of {n['rows']} dropped because the prompt alone fills max_length={self.max_length}"
            if n["rows"] == 0:
                why = "no rows" + (
                    f" (max_samples={self.max_samples})" if self.max_samples is not None else ""
                )
            raise ValueError(
                f"empty dataset after filtering: the {what} set of {source} has no examples left ({why}); "
                "raise data.max_length, check data.max_samples, or add data"
            )
        return ds, n

    def _pack(self, ds: datasets.Dataset) -> datasets.Dataset:
        """Concatenate examples in a seeded order and cut rows of exactly max_length.

        An example may straddle two rows (as in HF's `group_texts`); the last row is padded
        (attention 0, label -100), so every token is kept. Attention is not blocked between
        examples of a row, but no loss term predicts one example from another.
        """
        ds = ds.shuffle(seed=self.seed).flatten_indices()
        ids, labels = _flat(ds, "input_ids"), _flat(ds, "labels")
        rows = -(-len(ids) // self.max_length)
        pad = rows * self.max_length - len(ids)
        mask = np.r_[np.ones(len(ids), np.int64), np.zeros(pad, np.int64)]
        ids = np.r_[ids, np.full(pad, self.pad_id, ids.dtype)]
        labels = np.r_[labels, np.full(pad, IGNORE_INDEX, labels.dtype)]
        shape = (rows, self.max_length)
        return datasets.Dataset.from_dict(
            {
                k: v.reshape(shape).tolist()
                for k, v in (("input_ids", ids), ("labels", labels), ("attention_mask", mask))
            }
        )

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
            else [src, self.name, {s: d._fingerprint for s, d in hub.items()}]
        )
        settings = {
            k: getattr(self, k)
            for k in (
                "format",
                "train_split",
                "val_split",
                "val_fraction",
                "max_length",
                "train_on_prompt",
                "packing",
            )
            + ("prompt_template", "text_field", "max_samples", "seed")
        }
        blob = [_CACHE_VERSION, source, fingerprint(val), _tokenizer_fingerprint(self.tokenizer), settings]
        return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def _prepare(self) -> Path:
        """Build the processed train/val sets unless cached; return their cache directory."""
        kind, src = self._source()
        hub = self._load_hub(src) if kind == "hub" else None
        val_src = None
        if self.val_split is not None and (
            Path(self.val_split).suffix.lower() in EXTENSIONS or kind == "file"
        ):
            vkind, val_src = self._local_or_hub(self.val_split)
            if vkind != "file":
                raise ValueError(
                    f"val_split '{self.val_split}' is not a file, and {src} is a single file with no named "
                    "splits; give val_split a file path, or null to hold out val_fraction of the rows"
                )
        self._key = self._cache_key(kind, src, hub, val_src)
        out = self.cache_dir / self._key
        if (out / "meta.json").exists():
            return out

        rows, cols, desc = self._rows(kind, src, self.train_split, hub)
        fmt = _detect_format(cols, self.text_field, desc) if self.format == "auto" else self.format
        train = self._normalized(rows, desc, fmt)
        if val_src is not None:
            vrows, _, vdesc = self._rows("file", val_src, "", None)
            val = self._normalized(vrows, vdesc, fmt)
        elif self.val_split is not None:
            vrows, _, vdesc = self._rows(kind, src, self.val_split, hub)
            val = self._normalized(vrows, vdesc, fmt)
        elif self.val_fraction > 0 and len(train) > 0:
            n_val = max(1, round(len(train) * self.val_fraction))
            if n_val >= len(train):
                raise ValueError(
                    f"empty dataset after filtering: {desc} has {len(train)} row(s), and holding out "
                    f"val_fraction={self.val_fraction} (at least 1 row) leaves none to train on; add rows, "
                    "set data.val_split, or data.val_fraction=0"
                )
            perm = np.random.default_rng(self.seed).permutation(len(train))
            train, val = train.select(np.sort(perm[n_val:])), train.select(np.sort(perm[:n_val]))
        else:
            val = None
        samples = (val if val is not None else train).select(
            range(min(8, len(val if val is not None else train)))
        )

        train, tn = self._tokenize(train, fmt, "training", desc)
        stats = {
            "format": fmt,
            "train_rows": tn["rows"] - tn["dropped"],
            "truncated": tn["truncated"],
            "dropped": tn["dropped"],
        }
        if val is not None:
            val, vn = self._tokenize(val, fmt, "validation", desc)
            stats.update(val_rows=vn["rows"] - vn["dropped"], truncated=tn["truncated"] + vn["truncated"])
            stats["dropped"] += vn["dropped"]
        if self.packing:
            train, val = self._pack(train), val if val is None else self._pack(val)
        for split, ds in (("train", train), ("val", val)):
            if ds is not None:
                packed = "attention_mask" in ds.column_names
                stats[f"{split}_sequences"] = len(ds)
                stats[f"{split}_tokens"] = int(
                    _flat(ds, "attention_mask").sum() if packed else len(_flat(ds, "input_ids"))
                )
                stats[f"{split}_label_tokens"] = int((_flat(ds, "labels") != IGNORE_INDEX).sum())

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

    def _loader(self, ds: datasets.Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=_Collator(self.pad_id),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches."""
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches, or `[]` (Lightning then skips validation) without a val set."""
        return [] if self.val_dataset is None else self._loader(self.val_dataset, shuffle=False)
