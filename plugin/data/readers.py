"""Reading rows: local files, folders and hub datasets, validated and normalised per format.

Local files are parsed here rather than by `datasets`, so an error names the file and line.
Every row is checked and rewritten to the canonical columns of its format: instruction rows
to `instruction`/`input`/`output`, chats to `messages`, plain text to `text`.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import datasets

from ..hub import is_hub_id, looks_local
from .formats import NEEDS

EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet", ".txt")
BUILTIN = {"tiny_instruct": Path(__file__).parent / "tiny_instruct.jsonl"}

# ---------------------------------------------------------------------------- where rows come from


def resolve_source(path: str | None) -> tuple[str, Any]:
    """("file", Path) or ("hub", name-or-folder) for `data.path`; raises on a missing/unsupported file."""
    if path is None or path.startswith("builtin:"):
        key = "tiny_instruct" if path is None else path.split(":", 1)[1]
        if key not in BUILTIN:
            raise ValueError(
                f"unknown builtin dataset '{path}'; available: {['builtin:' + k for k in BUILTIN]}"
            )
        return "file", BUILTIN[key]
    return local_or_hub(path)


def local_or_hub(path: str) -> tuple[str, Any]:
    """("file", Path) for a local file, ("hub", str) for a folder or a hub dataset id."""
    p = Path(path).expanduser()
    if p.is_dir():
        return "hub", str(p)  # load_dataset reads a folder of train/validation/test files
    if p.is_file():
        if p.suffix.lower() not in EXTENSIONS:
            raise ValueError(
                f"unsupported data file {p} (extension '{p.suffix}'); supported: {', '.join(EXTENSIONS)}"
            )
        return "file", p
    if p.suffix.lower() in EXTENSIONS or looks_local(path) or not is_hub_id(path):
        raise FileNotFoundError(
            f"data file not found: {p}; give an existing {'/'.join(EXTENSIONS)} file, a folder, "
            "a hub dataset id, or builtin:tiny_instruct"
        )
    return "hub", path


def load_hub(path: str, name: str | None, cache_dir: str | None) -> datasets.DatasetDict:
    """`datasets.load_dataset(path, name)`, with one message naming the source when it fails."""
    try:
        return datasets.load_dataset(path, name, cache_dir=cache_dir)
    except Exception as e:  # offline hub, bad folder layout, ...: one message that names it
        raise ValueError(
            f"could not load dataset '{path}': it is not a local file, and datasets.load_dataset "
            f"failed ({type(e).__name__}: {e}). Local files may be {', '.join(EXTENSIONS)}"
        ) from e


def split_rows(
    kind: str, src: Any, split: str, hub: datasets.DatasetDict | None, text_field: str
) -> tuple[list | datasets.Dataset, list[str], str]:
    """Raw rows of one split: (rows, columns, description for messages)."""
    if kind == "file":
        rows = read_file(src, text_field)
        cols = sorted({k for _, r in rows for k in r})
        return rows, cols, str(src)
    if split not in hub:
        raise ValueError(f"dataset '{src}' has no split '{split}'; its splits are {sorted(hub)}")
    return hub[split], hub[split].column_names, f"dataset '{src}' split '{split}'"


# ---------------------------------------------------------------------------- local files


def read_file(path: Path, text_field: str) -> list[tuple[str, dict]]:
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


# ---------------------------------------------------------------------------- rows of a format


def detect_format(columns: list[str], text_field: str, source: str) -> str:
    """The format that `data.format=auto` picks from the columns of the training split."""
    cols = set(columns)
    if "instruction" in cols and cols & {"output", "response"}:
        return "instruction"
    if "messages" in cols:
        return "chat"
    if text_field in cols:
        return "text"
    needs = "; ".join(f"{f} needs {n}" for f, n in NEEDS.items())
    raise ValueError(
        f"cannot detect the data format of {source}: columns found {sorted(cols)}; {needs}. "
        "Rename the columns, set data.text_field, or set data.format to one of instruction|chat|text"
    )


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


def normalize_row(row: dict, fmt: str, where: str, text_field: str) -> dict:
    """Validate one row and return it in the canonical columns of its format."""

    def missing(field: str) -> ValueError:
        return ValueError(
            f"{where}: missing or empty field '{field}'; the {fmt} format needs {NEEDS[fmt]}; "
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


def normalize_rows(
    rows: list | datasets.Dataset,
    desc: str,
    fmt: str,
    text_field: str,
    max_samples: int | None,
    cache_key: str,
) -> datasets.Dataset:
    """The first `max_samples` rows of a split, validated, as a Dataset in canonical columns.

    Args:
        rows: (where, row) pairs from `read_file`, or a split of a hub dataset.
        desc: the split's description, for messages about hub rows.
        fmt: instruction|chat|text.
        text_field: the column holding plain text.
        max_samples: keep only the first N rows; `None` keeps all.
        cache_key: the data module's cache key; it names the result in `datasets`' cache.
    """
    if max_samples is not None:
        rows = (
            rows[:max_samples] if isinstance(rows, list) else rows.select(range(min(max_samples, len(rows))))
        )
    if isinstance(rows, list):
        return datasets.Dataset.from_list([normalize_row(r, fmt, where, text_field) for where, r in rows])

    def norm(batch: dict, idx: list[int]) -> dict:
        out = [
            normalize_row({k: batch[k][j] for k in batch}, fmt, f"{desc}, row {i + 1}", text_field)
            for j, i in enumerate(idx)
        ]
        return {k: [o[k] for o in out] for k in out[0]} if out else {}

    fp = f"{cache_key}-norm-{len(rows)}"  # given, so datasets need not hash this closure
    return rows.map(
        norm,
        batched=True,
        with_indices=True,
        remove_columns=rows.column_names,
        keep_in_memory=True,
        new_fingerprint=fp,
    )
