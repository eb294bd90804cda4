"""Property-based: whatever a data file holds, it loads or fails with our one line naming the file.

Arbitrary bytes, and arbitrary JSON-ish rows serialised as .jsonl/.json/.csv/.txt, go through what the
data module does to a local file (read, detect the format, validate each row) and, for fewer examples,
through the whole module (tokenize, split, cache). Each either loads or raises exactly ``ValueError`` /
``FileNotFoundError`` (not a library's exception, not a subclass such as ``JSONDecodeError`` or
``UnicodeDecodeError``) whose one-line message names the file; never a traceback from inside a library.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path
from typing import Any

import datasets
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from lightning_qlora.data import DataConfig, InstructDataModule, build_byte_tokenizer, describe_data_losses
from lightning_qlora.data.readers import detect_format, normalize_row, read_file

datasets.disable_progress_bars()

EXTS = (".jsonl", ".json", ".csv", ".txt")
FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WHOLE = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FIELDS = ["instruction", "output", "input", "response", "context", "messages", "text", "role", "content"]

# Text with what breaks naive readers: newlines, quotes, commas, NUL, a BOM, and lone surrogates
# (json.dumps writes them as \ud800 escapes, which json.loads turns back into unencodable str).
chars = st.one_of(
    st.characters(),
    st.sampled_from(list('\n\r",\x00\ufeff{}[]\\')),
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
)
texts = st.text(chars, max_size=20)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), texts)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(st.sampled_from(FIELDS), texts), inner, max_size=3),
    ),
    max_leaves=6,
)
messages = st.lists(
    st.dictionaries(st.sampled_from(["role", "content", "x"]), st.one_of(texts, values), max_size=3),
    max_size=3,
)
rows = st.lists(
    st.dictionaries(
        st.one_of(st.sampled_from(FIELDS), texts),
        st.one_of(texts, values, messages),
        max_size=4,
    ),
    max_size=5,
)

# Rows that mostly fit a format, so the whole pipeline (not only the row checks) runs often.
plain = st.text(st.characters(codec="utf-8"), min_size=1, max_size=60).filter(str.strip)
instruction_rows = st.fixed_dictionaries({"instruction": plain, "output": plain}, optional={"input": plain})
chat_rows = st.fixed_dictionaries(
    {
        "messages": st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["user", "assistant", "system"]), "content": plain}
            ),
            min_size=1,
            max_size=3,
        )
    }
)
good_rows = st.lists(instruction_rows, min_size=1, max_size=6) | st.lists(chat_rows, min_size=1, max_size=6)


def serialise(ext: str, records: list[dict[str, Any]]) -> bytes:
    """Rows as a file of that kind would hold them (a .txt file gets one text per line)."""
    if ext == ".jsonl":
        return "".join(json.dumps(r) + "\n" for r in records).encode()
    if ext == ".json":
        return json.dumps(records).encode()
    if ext == ".csv":
        keys = sorted({k for r in records for k in r})
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=keys)
        writer.writeheader()
        for r in records:
            writer.writerow({k: v if isinstance(v, str) else json.dumps(v) for k, v in r.items()})
        return out.getvalue().encode("utf-8", "surrogatepass")
    return "\n".join(str(v) for r in records for v in r.values()).encode("utf-8", "surrogatepass")


def assert_our_error(err: BaseException, path: Path) -> None:
    assert type(err) in (ValueError, FileNotFoundError), f"{type(err).__name__} escaped: {err}"
    message = str(err)
    assert str(path) in message, f"the message does not name the file: {message}"
    assert "\n" not in message and "\r" not in message, f"not one line: {message!r}"
    message.encode("utf-8")  # printable as it is


def read_like_the_module(path: Path, fmt: str = "auto") -> list[dict]:
    """What InstructDataModule does to a local file before tokenizing it."""
    pairs = read_file(path, "text")
    columns = sorted({k for _, r in pairs for k in r})
    fmt = detect_format(columns, "text", str(path)) if fmt == "auto" else fmt
    return [normalize_row(r, fmt, where, "text") for where, r in pairs]


def check_file(ext: str, content: bytes, fmt: str = "auto") -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{ext}"
        path.write_bytes(content)
        try:
            loaded = read_like_the_module(path, fmt)
        except Exception as err:  # noqa: BLE001 - what escapes is the property under test
            assert_our_error(err, path)
            return
        for row in loaded:  # loaded rows are canonical: text that every tokenizer takes
            for value in row.values():
                items = value if isinstance(value, list) else [value]
                for item in items:
                    for text in item.values() if isinstance(item, dict) else [item]:
                        assert isinstance(text, str)
                        text.encode("utf-8")


@pytest.mark.parametrize("ext", EXTS)
@FAST
@given(content=st.binary(max_size=200))
@example(content=b"\xff\xfe bad")
@example(content=b"[" * 100_000)  # nested past the recursion limit
@example(content=b'{"instruction": "a", "output": 1' + b"1" * 5000 + b"}")  # an int too long to convert
def test_any_bytes_load_or_fail_with_one_line(ext, content):
    check_file(ext, content)


@pytest.mark.parametrize("ext", EXTS)
@pytest.mark.parametrize("fmt", ["auto", "instruction", "chat", "text"])
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=rows)
@example(records=[{"instruction": "\ud800", "output": "x"}])
@example(records=[{"messages": [{"role": "\udfff", "content": "x"}]}])
@example(records=[{"instruction": "a", "output": "x" * 200_000}])  # a cell over csv's default field limit
def test_any_rows_load_or_fail_with_one_line(ext, fmt, records):
    check_file(ext, serialise(ext, records), fmt)


@pytest.mark.parametrize("ext", EXTS)
@WHOLE
@given(
    records=st.one_of(good_rows, rows),
    max_length=st.integers(2, 160),
    policy=st.sampled_from(["truncate", "drop", "error"]),
)
def test_the_whole_data_module_loads_or_fails_with_one_line(ext, records, max_length, policy):
    """Through tokenization, length policy, splitting and the cache: same property, and honest counts."""
    tok = build_byte_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{ext}"
        path.write_bytes(serialise(ext, records))
        dm = InstructDataModule(
            tok,
            path=str(path),
            val_fraction=0,
            max_length=max_length,
            on_overlong=policy,
            prompt_template="short",
            cache_dir=str(Path(tmp) / "cache"),
        )
        try:
            dm.setup()
        except Exception as err:  # noqa: BLE001
            assert_our_error(err, path)
            event("refused")
            return
        event("loaded")
        stats = dm.stats
        assert stats["train_rows"] == len(dm.train_dataset) == stats["rows"] - stats["dropped"] > 0
        assert all(len(ids) <= max_length for ids in dm.train_dataset["input_ids"])
        assert policy != "drop" or stats["truncated"] == 0
        assert policy != "error" or stats["truncated"] == stats["dropped"] - stats["dropped_empty"] == 0
        line = describe_data_losses(stats)
        assert (line is None) == (stats["truncated"] == stats["dropped"] == 0)
        assert line is None or "\n" not in line


SETTINGS = {  # each setting with values of its declared type, in range and out of it
    "val_fraction": st.floats(),
    "max_length": st.integers(),
    "batch_size": st.integers(),
    "num_workers": st.integers(),
    "max_samples": st.none() | st.integers(),
    "format": st.sampled_from(["auto", "chat", "Chat", ""]) | texts,
    "on_overlong": st.sampled_from(["truncate", "drop", "error", "cut"]) | texts,
    "prompt_template": st.none()
    | st.sampled_from(["short", "{instruction}", "{instruction.x}", "{instruction[a]}", "{input}", "{0}"])
    | texts,
}


@FAST
@given(data=st.data(), field=st.sampled_from(sorted(SETTINGS)))
def test_a_data_setting_is_accepted_or_refused_naming_its_key(data, field):
    """Any value of its declared type: DataConfig takes it, or raises one line starting with data.<field>."""
    value = data.draw(SETTINGS[field])
    try:
        DataConfig(**{field: value})
    except ValueError as err:
        assert type(err) is ValueError and str(err).startswith(f"data.{field}"), str(err)
        assert "\n" not in str(err)
