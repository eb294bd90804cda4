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
        why = f"{type(e).__name__}: {' '.join(str(e).split())}"
        if Path(path).expanduser().is_dir():
            raise ValueError(
                f"could not load the data folder '{path}' with datasets.load_dataset ({why}); a folder needs "
                f"data files ({', '.join(EXTENSIONS)}), split by name into train.*, validation.*, test.*, "
                "or give data.path one file"
            ) from e
        raise ValueError(
            f"could not load dataset '{path}': it is not a local file or folder, and datasets.load_dataset "
            f"failed ({why}). Local files may be {', '.join(EXTENSIONS)}"
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
    """Read a local file into (where, row) pairs; `where` ("file, line 7") goes into errors.

    Raises:
        ValueError: naming the file and, where there is one, the line: not UTF-8, malformed
            JSON/CSV, an unreadable Parquet file, a row that is not an object.
        FileNotFoundError, PermissionError: the file cannot be opened.
    """
    ext = path.suffix.lower()
    if ext == ".parquet":
        return _read_parquet(path)
    text = _read_text(path)
    if ext == ".txt":  # one row per non-blank line, as datasets' "text" loader does
        return [
            (f"{path}, line {i}", {text_field: s.rstrip("\r")})
            for i, s in enumerate(text.split("\n"), 1)
            if s.strip()
        ]
    if ext == ".csv":
        return _read_csv(path, text)
    if ext == ".json":
        try:
            obj = _json(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # "Extra data" = JSON Lines in a .json file; read it as such
                raise ValueError(
                    f"{path}, line {e.lineno}: malformed JSON ({e.msg}, column {e.colno})"
                ) from e
        except ValueError as e:  # too deeply nested, a number too long to convert
            raise ValueError(f"{path}: malformed JSON ({e})") from e
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
            r = _json(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {i}: malformed JSON ({e.msg}, column {e.colno})") from e
        except ValueError as e:
            raise ValueError(f"{path}, line {i}: malformed JSON ({e})") from e
        if not isinstance(r, dict):
            raise ValueError(f"{path}, line {i}: expected a JSON object, got {type(r).__name__}")
        rows.append((f"{path}, line {i}", r))
    return rows


def _read_text(path: Path) -> str:
    """The file as text; not UTF-8 is an error naming the line and column (not a byte offset)."""
    raw = path.read_bytes()
    raw = raw.removeprefix(b"\xef\xbb\xbf")  # the BOM spreadsheet exports add
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise ValueError(
            f"{path}, line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {column}, {e.reason}); "
            "save the file as UTF-8"
        ) from None


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _read_csv(path: Path, text: str) -> list[tuple[str, dict]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(text)))  # a long text cell is data, not an error (default: 128 KiB)
    try:
        for r in reader:
            rows.append((f"{path}, line {reader.line_num}", {k: v for k, v in r.items() if k is not None}))
    except csv.Error as e:
        raise ValueError(f"{path}, line {reader.line_num}: malformed CSV ({e})") from None
    finally:
        csv.field_size_limit(limit)
    return rows


def _read_parquet(path: Path) -> list[tuple[str, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        if isinstance(e, (FileNotFoundError, PermissionError)):
            raise
        raise ValueError(f"{path}: not a readable Parquet file ({' '.join(str(e).split())})") from None
    return [(f"{path}, row {i}", r) for i, r in enumerate(table.to_pylist(), 1)]


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
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a JSON "\ud800" escape: no tokenizer takes it
            raise ValueError(
                f"{where}: field '{field}' holds an unpaired surrogate (a \\ud800-\\udfff escape), not text"
            ) from None
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
            at = f"{where}, message {j}"
            out.append({"role": _text(m["role"], "role", at), "content": _text(m["content"], "content", at)})
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

    Returns:
        The rows in canonical columns, plus `_row`: each row's index in `rows` (for messages that
        name where an example came from).
    """
    if max_samples is not None:
        rows = (
            rows[:max_samples] if isinstance(rows, list) else rows.select(range(min(max_samples, len(rows))))
        )
    if isinstance(rows, list):
        return datasets.Dataset.from_list(
            [{**normalize_row(r, fmt, where, text_field), "_row": i} for i, (where, r) in enumerate(rows)]
        )

    def norm(batch: dict, idx: list[int]) -> dict:
        out = [
            {
                **normalize_row({k: batch[k][j] for k in batch}, fmt, f"{desc}, row {i + 1}", text_field),
                "_row": i,
            }
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
