"""`DataConfig`: every data setting, declared once.

It is both the keyword arguments of `InstructDataModule` and the schema of the `data` config
group, so its field types are those OmegaConf structured configs accept. It imports nothing
heavy: loading the schema does not load `datasets`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .formats import FORMATS, resolve_template

ON_OVERLONG = ("truncate", "drop", "error")  # what `data.on_overlong` may be


@dataclass
class DataConfig:
    """Where the fine-tuning data comes from and how it is turned into batches.

    Args:
        path: a local .jsonl/.json/.csv/.parquet/.txt file, a folder or hub dataset id for
            `datasets.load_dataset`, or `None`/"builtin:tiny_instruct" for the shipped data.
        name: the hub dataset's configuration name.
        format: auto|instruction|chat|text; auto picks from the columns.
        train_split: the split to train on (hub datasets and folders).
        val_split: a split name, or a file path, to validate on; `None` holds out
            `val_fraction` of the training rows instead.
        val_fraction: the seeded share of training rows held out when `val_split` is None
            (at least one row); 0 disables validation.
        max_length: the longest example, in tokens (packed rows have exactly it); what happens to
            longer ones is `on_overlong`.
        on_overlong: an example longer than `max_length` is cut to it ("truncate"; one whose
            prompt alone fills it is dropped, having nothing to train on), left out ("drop"), or
            stops the run naming its file and row ("error"). What was cut or dropped is counted
            in `InstructDataModule.stats` and reported.
        train_on_prompt: also put loss on prompt tokens (and user turns in chats).
        packing: concatenate examples into rows of exactly `max_length` tokens.
        batch_size: rows per batch.
        num_workers: DataLoader workers (0: load in the main process).
        prompt_template: "alpaca" (`None`), "short", or a format string with `{instruction}`
            and optionally `{input}`.
        text_field: the column holding plain text (text format, and .txt files).
        max_samples: keep only the first N rows of each split (quick runs); `None` keeps all.
        seed: seeds the held-out split, the order rows are packed in, and the order of
            training batches (epoch `e` uses a permutation seeded with `seed + e`).
        cache_dir: where processed data is cached (`None`: the datasets cache).

    Raises:
        ValueError: a value out of range, naming the key `data.<field>`, the value and the fix.
    """

    path: str | None = None
    name: str | None = None
    format: str = "auto"
    train_split: str = "train"
    val_split: str | None = None
    val_fraction: float = 0.05
    max_length: int = 512
    on_overlong: str = "truncate"
    train_on_prompt: bool = False
    packing: bool = False
    batch_size: int = 4
    num_workers: int = 0
    prompt_template: str | None = None
    text_field: str = "text"
    max_samples: int | None = None
    seed: int = 42
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.format not in ("auto", *FORMATS):
            raise ValueError(
                f"data.format: unknown data format {self.format!r}; allowed: auto, {', '.join(FORMATS)}"
            )
        if not 0 <= self.val_fraction < 1:
            raise ValueError(
                f"data.val_fraction must be in [0, 1), got {self.val_fraction}; 0 turns validation off"
            )
        if self.max_length < 2:  # the first token of an example carries no loss: one more must
            raise ValueError(f"data.max_length must be at least 2, got {self.max_length}")
        if self.on_overlong not in ON_OVERLONG:
            raise ValueError(
                f"data.on_overlong={self.on_overlong!r} is not one of {', '.join(ON_OVERLONG)}: truncate cuts "
                "long examples to data.max_length, drop leaves them out, error stops at the first one"
            )
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be at least 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(
                f"data.num_workers must be >= 0 (0 loads in the main process), got {self.num_workers}"
            )
        if self.max_samples is not None and self.max_samples < 0:
            raise ValueError(f"data.max_samples must be >= 0 or null, got {self.max_samples}")
        resolve_template(self.prompt_template)  # raises on a template with unknown fields
