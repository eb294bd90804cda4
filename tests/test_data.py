"""Data module and tokenizer: formats, loss masks, packing, splits, caching, bad input."""

import csv
import dataclasses
import json

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lightning_qlora.data import (
    IGNORE_INDEX,
    DataConfig,
    InstructDataModule,
    build_byte_tokenizer,
    describe_data_losses,
    load_tokenizer,
)

datasets.disable_progress_bars()

ROWS = [
    {"instruction": "What is 2 + 3?", "input": "", "output": "5"},
    {"instruction": "Reverse the word.", "input": "stone", "output": "enots"},
    {"instruction": "Say hi.", "output": "hi there"},  # no input field at all
    {"instruction": "Capital of France?", "input": "", "output": "Paris"},
    {"instruction": "Uppercase.", "input": "héllo wörld", "output": "HÉLLO WÖRLD"},
    {"instruction": "What is 7 - 4?", "input": "", "output": "3"},
]
CHATS = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ]
    },
    {"messages": [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]},
]


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def dm_for(tmp_path, tok, path, **kw):
    kw.setdefault("val_fraction", 0)
    dm = InstructDataModule(tok, path=str(path), cache_dir=str(tmp_path / "cache"), **kw)
    dm.prepare_data()
    dm.setup()
    return dm


def labeled(dm, row):
    """Token ids that carry loss in one dataset row."""
    return [t for t in row["labels"] if t != IGNORE_INDEX]


# ------------------------------------------------------------------------------- tokenizer


def test_byte_tokenizer_round_trip_and_specials(tok):
    assert len(tok) <= 512 and tok.vocab_size <= 512
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<s>", "</s>")
    for s in ["", "hello", "héllo wörld 🤖\n\t\x00 end", "日本語のテキスト", "<b>not special</b>"]:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(s.encode("utf-8"))  # one token per byte
        assert tok.decode(ids) == s
        assert tok(s)["input_ids"][0] == tok.bos_token_id  # calling it prepends BOS, like Llama


def test_byte_tokenizer_chat_template_and_save_load(tok, tmp_path):
    msgs = CHATS[1]["messages"]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == "<s><|user|>\nping\n<|assistant|>\npong</s>"
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt) and prompt.endswith("<|assistant|>\n")
    assert tok.convert_tokens_to_ids("<|assistant|>") in tok(text, add_special_tokens=False)["input_ids"]
    tok.save_pretrained(tmp_path / "tok")
    back = load_tokenizer(str(tmp_path / "tok"))
    assert back(text)["input_ids"] == tok(text)["input_ids"]
    assert back.apply_chat_template(msgs, tokenize=False) == text


def test_load_tokenizer_names():
    assert load_tokenizer(None).vocab_size == load_tokenizer("byte").vocab_size == 262
    with pytest.raises(FileNotFoundError, match="./missing/tokenizer"):
        load_tokenizer("./missing/tokenizer")


# ------------------------------------------------------------------------------- formats


def test_instruction_jsonl_response_only_loss(tmp_path, tok):
    dm = dm_for(tmp_path, tok, write_jsonl(tmp_path / "d.jsonl", ROWS))
    assert dm.data_format == "instruction" and len(dm.train_dataset) == len(ROWS)
    for src, row in zip(ROWS, dm.train_dataset, strict=True):
        prompt = dm.prompt_ids(src)
        response = tok(src["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert row["input_ids"] == prompt + response  # BOS + prompt, response, EOS
        assert row["labels"] == [IGNORE_INDEX] * len(prompt) + response  # loss on response + EOS only
    assert "### Input:\nstone" in dm.format_prompt(ROWS[1]) and "### Input" not in dm.format_prompt(ROWS[0])
    assert dm.num_train_tokens == sum(len(r["input_ids"]) for r in dm.train_dataset)


def test_train_on_prompt(tmp_path, tok):
    dm = dm_for(tmp_path, tok, write_jsonl(tmp_path / "d.jsonl", ROWS), train_on_prompt=True)
    for row in dm.train_dataset:  # everything but the first token, which nothing predicts
        assert row["labels"] == [IGNORE_INDEX] + row["input_ids"][1:]


def test_json_csv_and_custom_template(tmp_path, tok):
    (tmp_path / "d.json").write_text(json.dumps({"data": ROWS}))
    with open(tmp_path / "d.csv", "w", newline="", encoding="utf-8") as f:
        f.write("instruction,input,output\n")
        for r in ROWS:
            f.write(f'"{r["instruction"]}","{r.get("input", "")}","{r["output"]}"\n')
    template = "Q: {instruction} {input}\nA: "
    a = dm_for(tmp_path, tok, tmp_path / "d.json", prompt_template=template)
    b = dm_for(tmp_path, tok, tmp_path / "d.csv", prompt_template=template)
    assert a.train_dataset["input_ids"] == b.train_dataset["input_ids"]
    assert tok.decode(a.train_dataset[0]["input_ids"]) == "<s>Q: What is 2 + 3? \nA: 5</s>"


def test_chat_parquet_masks_assistant_turns(tmp_path, tok):
    pq.write_table(pa.Table.from_pylist(CHATS), tmp_path / "c.parquet")
    dm = dm_for(tmp_path, tok, tmp_path / "c.parquet")
    assert dm.data_format == "chat"
    row = dm.train_dataset[0]
    assert tok.decode(row["input_ids"]) == tok.apply_chat_template(CHATS[0]["messages"], tokenize=False)
    # Labeled tokens are exactly the two assistant replies, each with the EOS that ends it.
    spans, cur = [], []
    for t, lab in zip(row["input_ids"], row["labels"], strict=True):
        if lab != IGNORE_INDEX:
            assert lab == t
            cur.append(t)
        elif cur:
            spans, cur = [*spans, cur], []
    spans += [cur] if cur else []
    assert [tok.decode(s) for s in spans] == ["hello</s>", "4</s>"]
    assert dm.format_prompt(CHATS[1]) == "<s><|user|>\nping\n<|assistant|>\n"


def test_text_txt(tmp_path, tok):
    (tmp_path / "t.txt").write_text("first line\n\nsecond line ✓\n")
    dm = dm_for(tmp_path, tok, tmp_path / "t.txt")
    assert dm.data_format == "text" and len(dm.train_dataset) == 2  # blank lines skipped
    row = dm.train_dataset[1]
    assert tok.decode(row["input_ids"]) == "<s>second line ✓</s>"
    assert row["labels"] == [IGNORE_INDEX] + row["input_ids"][1:]


def test_truncation(tmp_path, tok):
    rows = [{"instruction": "Repeat.", "output": "x" * 500}, {"instruction": "Short.", "output": "ok"}]
    dm = dm_for(
        tmp_path, tok, write_jsonl(tmp_path / "d.jsonl", rows), max_length=64, prompt_template="short"
    )
    lens = [len(r["input_ids"]) for r in dm.train_dataset]
    assert lens[0] == 64 and lens[1] < 64 and dm.stats["truncated"] == 1
    assert dm.train_dataset[0]["input_ids"][-1] != tok.eos_token_id  # cut, so no EOS


def test_overlong_examples_are_counted_and_follow_on_overlong(tmp_path, tok):
    """A huge row and long ones: truncated (counted, reported), dropped, or refused naming the line."""
    rows = [
        {"instruction": "Short.", "output": "ok"},
        {"instruction": "Repeat.", "output": "x" * 150_000},  # line 2: over csv's 128 KiB field limit
        {"instruction": "y" * 200, "output": "z"},  # line 3: the prompt alone fills max_length
        {"instruction": "Echo.", "output": "w" * 100},  # line 4
    ]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    short = len(tok("### Instruction:\nShort.\n\n### Response:\nok")["input_ids"]) + 1  # + EOS
    dm = dm_for(tmp_path, tok, path, max_length=64, prompt_template="short")
    s = dm.stats
    assert (s["rows"], s["train_rows"], s["truncated"], s["dropped"], s["dropped_empty"]) == (4, 3, 2, 1, 0)
    kept = sum(len(ids) for ids in dm.train_dataset["input_ids"])
    assert kept == short + 64 + 64
    full = [
        len(tok(f"### Instruction:\n{r['instruction']}\n\n### Response:\n{r['output']}")["input_ids"]) + 1
        for r in rows
    ]
    assert s["lost_tokens"] == sum(full) - kept  # every token not trained on is counted
    line = describe_data_losses(s)
    assert line == (
        f"data: of 4 examples, 2 truncated to data.max_length=64, 1 dropped (the prompt alone fills "
        f"data.max_length=64); {s['lost_tokens']:,} tokens lost. Raise data.max_length to keep them, or set "
        "data.on_overlong=drop|error"
    )

    dropped = dm_for(tmp_path, tok, path, max_length=64, prompt_template="short", on_overlong="drop")
    assert (dropped.stats["truncated"], dropped.stats["dropped"], dropped.stats["train_rows"]) == (0, 3, 1)
    assert len(dropped.train_dataset[0]["input_ids"]) == short
    assert "3 dropped as longer than data.max_length=64" in describe_data_losses(dropped.stats)

    with pytest.raises(
        ValueError,
        match=r"long\.jsonl, line 2: the example is 150042 tokens, more than data\.max_length=64; .*on_overlong=truncate",
    ):
        dm_for(tmp_path, tok, path, max_length=64, prompt_template="short", on_overlong="error")
    csv_path = tmp_path / "long.csv"  # a cell over the csv module's 128 KiB field limit is data, not an error
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["instruction", "output"])
        writer.writeheader()
        writer.writerows(rows[:2])
    with pytest.raises(ValueError, match=r"long\.csv, line 3: the example is"):
        dm_for(tmp_path, tok, csv_path, max_length=64, prompt_template="short", on_overlong="error")
    assert dm_for(tmp_path, tok, csv_path, max_length=64, prompt_template="short").stats["truncated"] == 1
    assert describe_data_losses(dm_for(tmp_path, tok, write_jsonl(tmp_path / "ok.jsonl", ROWS)).stats) is None


def test_held_out_rows_are_named_by_their_own_line(tmp_path, tok):
    rows = [*ROWS * 3, {"instruction": "Repeat.", "output": "x" * 300}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    # The held-out rows are the first round(19 * 0.5) of a permutation seeded with data.seed: one seed
    # that holds line 19 out, one that trains on it; the message names line 19 either way.
    held = {18 in np.random.default_rng(seed).permutation(19)[:10]: seed for seed in range(50)}
    for seed in (held[True], held[False]):
        with pytest.raises(ValueError, match=r"d\.jsonl, line 19: the example is"):
            dm_for(
                tmp_path,
                tok,
                path,
                val_fraction=0.5,
                max_length=200,
                on_overlong="error",
                prompt_template="short",
                seed=seed,
            )


def test_batches_right_padded(tmp_path, tok):
    dm = dm_for(tmp_path, tok, write_jsonl(tmp_path / "d.jsonl", ROWS), batch_size=3)
    batch = next(iter(dm.val_dataloader() or [None]), None)
    assert batch is None  # val_fraction=0: no validation
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(v.dtype == torch.long and v.shape == batch["input_ids"].shape for v in batch.values())
    pad = batch["attention_mask"] == 0
    assert (
        pad.any()
        and (batch["input_ids"][pad] == tok.pad_token_id).all()
        and (batch["labels"][pad] == -100).all()
    )
    # Right padding: once a row's mask drops to 0 it stays 0.
    assert (batch["attention_mask"].diff(dim=1) <= 0).all()


def test_packing(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS * 5)
    plain = dm_for(tmp_path, tok, path, prompt_template="{instruction} {input}\n")
    packed = dm_for(
        tmp_path, tok, path, prompt_template="{instruction} {input}\n", packing=True, max_length=48
    )
    assert packed.stats["truncated"] == 0 and packed.stats["train_sequences"] < len(ROWS) * 5
    rows = packed.train_dataset
    assert all(len(r["input_ids"]) == 48 for r in rows)
    assert packed.num_train_tokens == plain.num_train_tokens  # every token kept, only the tail padded
    assert packed.stats["train_label_tokens"] == plain.stats["train_label_tokens"]
    assert sum(map(sum, rows["attention_mask"])) == plain.num_train_tokens
    flat = [t for r in rows for t in r["input_ids"]]
    flat_labels = [t for r in rows for t in r["labels"]]
    starts = [i for i, t in enumerate(flat) if t == tok.bos_token_id]
    assert len(starts) == len(ROWS) * 5
    # No loss term predicts one example's first token from the example before it.
    assert all(flat_labels[i] == IGNORE_INDEX for i in starts)
    batch = next(iter(packed.train_dataloader()))
    assert batch["input_ids"].shape == (4, 48)


# ------------------------------------------------------------------------------- splits


def test_val_fraction_seeded_and_disjoint(tmp_path, tok):
    rows = [{"instruction": f"Q{i}", "output": f"A{i}"} for i in range(40)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    dm = dm_for(tmp_path, tok, path, val_fraction=0.1)
    train = {tuple(r) for r in dm.train_dataset["input_ids"]}
    val = {tuple(r) for r in dm.val_dataset["input_ids"]}
    assert len(val) == 4 and len(train) == 36 and not train & val
    again = InstructDataModule(tok, path=str(path), val_fraction=0.1, cache_dir=str(tmp_path / "other"))
    again.setup()
    assert {tuple(r) for r in again.val_dataset["input_ids"]} == val  # same seed, same split
    tiny = dm_for(tmp_path, tok, write_jsonl(tmp_path / "t.jsonl", rows[:3]), val_fraction=0.01)
    assert len(tiny.val_dataset) == 1  # at least one row
    assert len(dm.val_dataloader()) == 1


def test_named_split_folder_and_val_file(tmp_path, tok):
    folder = tmp_path / "ds"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", ROWS)
    write_jsonl(folder / "validation.jsonl", ROWS[:2])
    dm = dm_for(tmp_path, tok, folder, val_split="validation")
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (len(ROWS), 2)
    dm = dm_for(tmp_path, tok, folder / "train.jsonl", val_split=str(folder / "validation.jsonl"))
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (len(ROWS), 2)
    with pytest.raises(ValueError, match="no split 'dev'.*'train', 'validation'"):
        dm_for(tmp_path, tok, folder, val_split="dev")


def test_shipped_dataset(tmp_path, tok):
    dm = InstructDataModule(tok, path=None, max_length=128, prompt_template="short", cache_dir=str(tmp_path))
    dm.setup()
    assert dm.data_format == "instruction"
    assert len(dm.train_dataset) + len(dm.val_dataset) == 1600 and len(dm.val_dataset) == 80
    assert dm.stats["dropped"] == 0 and len(dm.sample_examples(3)) == 3


# ------------------------------------------------------------------------------- caching


def test_tokenized_once_and_cached(tmp_path, tok, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    first = dm_for(tmp_path, tok, path, val_fraction=0.2)
    ds = first.train_dataset
    first.setup()
    assert first.train_dataset is ds  # second setup() is a no-op

    def boom(*a, **k):
        raise AssertionError("re-tokenized")

    monkeypatch.setattr(InstructDataModule, "_tokenize", boom)
    second = dm_for(tmp_path, tok, path, val_fraction=0.2)  # a fresh module reads the cache
    assert second.train_dataset["input_ids"] == ds["input_ids"]
    assert second.stats["cache"] == first.stats["cache"]
    with pytest.raises(AssertionError, match="re-tokenized"):  # other settings, other cache entry
        dm_for(tmp_path, tok, path, val_fraction=0.2, max_length=100)
    write_jsonl(path, ROWS[:4])  # the file changed: its fingerprint too
    with pytest.raises(AssertionError, match="re-tokenized"):
        dm_for(tmp_path, tok, path, val_fraction=0.2)


# ------------------------------------------------------------------------------- bad input


def test_missing_and_unsupported_files(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl.*\.jsonl/\.json/\.csv/\.parquet/\.txt"):
        dm_for(tmp_path, tok, tmp_path / "nope.jsonl")
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(ValueError, match=r"d\.xlsx.*supported: \.jsonl, \.json"):
        dm_for(tmp_path, tok, tmp_path / "d.xlsx")
    with pytest.raises(ValueError, match="unknown builtin"):
        dm_for(tmp_path, tok, "builtin:nothing")


def test_row_missing_field(tmp_path, tok):
    rows = [*ROWS[:3], {"instruction": "Q?", "answer": "oops"}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError) as e:
        dm_for(tmp_path, tok, path)
    msg = str(e.value)
    assert "bad.jsonl, line 4" in msg and "'output'" in msg and "'instruction'" in msg and "answer" in msg
    with open(tmp_path / "bad.csv", "w") as f:
        f.write("instruction,output\nQ1,A1\nQ2,\n")
    with pytest.raises(ValueError, match=r"bad\.csv, line 3: missing or empty field 'output'"):
        dm_for(tmp_path, tok, tmp_path / "bad.csv")
    chats = [CHATS[1], {"messages": [{"role": "user"}]}]
    with pytest.raises(ValueError, match=r"chat\.jsonl, line 2: message 1 needs 'role'.*'content'"):
        dm_for(tmp_path, tok, write_jsonl(tmp_path / "chat.jsonl", chats))


def test_not_utf8_names_the_line_and_a_folder_is_not_called_a_file(tmp_path, tok):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(
        json.dumps(ROWS[0]).encode() + b"\n" + '{"instruction": "café", "output": "x"}'.encode("latin-1")
    )
    with pytest.raises(ValueError, match=r"latin1\.jsonl, line 2: not UTF-8 text \(byte 0xe9 at column 21"):
        dm_for(tmp_path, tok, path)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.md").write_text("nothing to train on")
    with pytest.raises(ValueError) as e:
        dm_for(tmp_path, tok, folder)
    assert f"could not load the data folder '{folder}'" in str(e.value) and "not a local file" not in str(
        e.value
    )


def test_malformed_json(tmp_path, tok):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + '{"instruction": "x", "output": \n')
    with pytest.raises(ValueError, match=r"broken\.jsonl, line 3: malformed JSON"):
        dm_for(tmp_path, tok, path)
    (tmp_path / "broken.json").write_text('[\n {"instruction": "x",\n  "output": }\n]')
    with pytest.raises(ValueError, match=r"broken\.json, line 3: malformed JSON"):
        dm_for(tmp_path, tok, tmp_path / "broken.json")


def test_empty_after_filtering(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(ValueError, match=r"empty dataset after filtering.*max_samples=0"):
        dm_for(tmp_path, tok, path, max_samples=0)
    with pytest.raises(ValueError, match=r"empty dataset after filtering.*6 of 6 dropped.*max_length=16"):
        dm_for(tmp_path, tok, path, max_length=16)  # the Alpaca preamble alone is longer
    with pytest.raises(ValueError, match=r"empty dataset after filtering.*1 row"):
        dm_for(tmp_path, tok, write_jsonl(tmp_path / "one.jsonl", ROWS[:1]), val_fraction=0.5)


def test_bad_settings(tmp_path, tok):
    with pytest.raises(
        ValueError, match="unknown data format 'alpaca'; allowed: auto, instruction, chat, text"
    ):
        InstructDataModule(tok, format="alpaca")
    with pytest.raises(ValueError, match=r"prompt_template.*\{instruction\}"):
        InstructDataModule(tok, prompt_template="{question}")
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(
        ValueError, match=r"cannot detect.*d\.jsonl.*\['answer', 'question'\].*instruction needs"
    ):
        dm_for(tmp_path, tok, path)
    with pytest.raises(ValueError, match=r"val_split 'validation'.*single file"):
        dm_for(tmp_path, tok, write_jsonl(tmp_path / "e.jsonl", ROWS), val_split="validation")


def test_data_config_is_the_one_declaration(tmp_path, tok):
    """Every DataConfig field is a setting of the module, given as a config or as keywords."""
    settings = {
        "path": str(write_jsonl(tmp_path / "d.jsonl", ROWS * 2)),
        "name": None,
        "format": "instruction",
        "train_split": "train",
        "val_split": None,
        "val_fraction": 0.25,
        "max_length": 64,
        "on_overlong": "truncate",
        "train_on_prompt": True,
        "packing": True,
        "batch_size": 2,
        "num_workers": 0,
        "prompt_template": "short",
        "text_field": "body",
        "max_samples": 8,
        "seed": 7,
        "cache_dir": str(tmp_path / "cache"),
    }
    assert set(settings) == {f.name for f in dataclasses.fields(DataConfig)}
    config = DataConfig(**settings)
    dm = InstructDataModule(tok, config)
    assert dm.config == config
    assert InstructDataModule(tok, **settings).config == config
    assert InstructDataModule(tok, config, batch_size=3).config == dataclasses.replace(config, batch_size=3)
    dm.setup()
    assert (dm.stats["train_rows"], dm.stats["val_rows"]) == (6, 2)  # max_samples, val_fraction
    assert next(iter(dm.train_dataloader()))["input_ids"].shape == (2, 64)  # batch_size, packing
    assert InstructDataModule(tok).config == DataConfig()  # the defaults are DataConfig's
    for key, bad in (("batch_size", 0), ("max_length", 0), ("val_fraction", 1.0), ("num_workers", -1)):
        with pytest.raises(ValueError, match=rf"^data\.{key} .*got {bad}"):
            InstructDataModule(tok, **{key: bad})
    with pytest.raises(ValueError, match=r"^data\.on_overlong='cut' is not one of truncate, drop, error"):
        InstructDataModule(tok, on_overlong="cut")
    with pytest.raises(TypeError, match="DataConfig"):
        InstructDataModule(tok, {"batch_size": 2})
