"""What tokens and labels an example becomes, and how packing cuts them into rows.

Labels line up with input ids (the model shifts them) and are `IGNORE_INDEX` where no loss
is wanted: prompt tokens unless `train_on_prompt`, and padding.
"""

from __future__ import annotations

from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc

from ..loss import IGNORE_INDEX
from .formats import instruction_prompt


def encode_examples(
    tokenizer: Any, batch: dict, fmt: str, templates: tuple[str, str], train_on_prompt: bool
) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) for each example of a batch of normalised rows, before truncation.

    Args:
        tokenizer: the tokenizer; its chat template renders chats.
        batch: columns of rows in the canonical columns of `fmt` (see `readers.normalize_row`).
        fmt: instruction|chat|text.
        templates: the prompt templates of instruction rows (`formats.resolve_template`).
        train_on_prompt: also put loss on prompt tokens (and user turns in chats).

    Raises:
        ValueError: the chat template is not prefix-stable, so assistant turns cannot be found.
    """
    tok = tokenizer
    bos = [] if tok.bos_token_id is None else [tok.bos_token_id]

    def enc(texts: list[str]) -> list[list[int]]:
        return tok(texts, add_special_tokens=False)["input_ids"] if texts else []

    if fmt == "instruction":
        prompts = enc(
            [
                instruction_prompt(templates, i, x)
                for i, x in zip(batch["instruction"], batch["input"], strict=True)
            ]
        )
        outs = enc(batch["output"])
        pairs = []
        for p, r in zip(prompts, outs, strict=True):
            p, r = bos + p, r + [tok.eos_token_id]  # EOS so generation learns to stop
            pairs.append((p + r, (p if train_on_prompt else [IGNORE_INDEX] * len(p)) + r))
        return pairs
    if fmt == "text":
        return [(ids, ids) for ids in (bos + t + [tok.eos_token_id] for t in enc(batch["text"]))]
    pairs = []
    for msgs in batch["messages"]:
        ids = enc([tok.apply_chat_template(msgs, tokenize=False)])[0]
        if train_on_prompt:
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


def flat(ds: datasets.Dataset, column: str) -> np.ndarray:
    """All values of a list column, concatenated (through Arrow, not Python lists)."""
    return pc.list_flatten(ds.with_format("arrow")[column]).to_numpy()


def pack(ds: datasets.Dataset, max_length: int, pad_id: int, seed: int) -> datasets.Dataset:
    """Concatenate examples in a seeded order and cut rows of exactly max_length.

    An example may straddle two rows (as in HF's `group_texts`); the last row is padded
    (attention 0, label -100), so every token is kept. Attention is not blocked between
    examples of a row, but no loss term predicts one example from another.
    """
    ds = ds.shuffle(seed=seed).flatten_indices()
    ids, labels = flat(ds, "input_ids"), flat(ds, "labels")
    rows = -(-len(ids) // max_length)
    pad = rows * max_length - len(ids)
    mask = np.r_[np.ones(len(ids), np.int64), np.zeros(pad, np.int64)]
    ids = np.r_[ids, np.full(pad, pad_id, ids.dtype)]
    labels = np.r_[labels, np.full(pad, IGNORE_INDEX, labels.dtype)]
    shape = (rows, max_length)
    return datasets.Dataset.from_dict(
        {
            k: v.reshape(shape).tolist()
            for k, v in (("input_ids", ids), ("labels", labels), ("attention_mask", mask))
        }
    )
