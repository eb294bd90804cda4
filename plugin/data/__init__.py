"""Fine-tuning data: readers, prompt formats, tokenization and the Lightning data module.

`InstructDataModule(tokenizer, DataConfig(...))` (or `InstructDataModule(tokenizer, path=...)`)
turns instruction, chat or plain-text rows into batches; `load_tokenizer` and
`build_byte_tokenizer` give it a tokenizer. Names load on first use, like the package's own
API: `DataConfig`, the `data` config group's schema, then does not import `datasets`.
"""

import importlib
from typing import Any

_LAZY = {
    "DataConfig": ".config",
    "ON_OVERLONG": ".config",
    "InstructDataModule": ".datamodule",
    "describe_data_losses": ".datamodule",
    "EpochSampler": ".loader",
    "ResumableLoader": ".loader",
    "FORMATS": ".formats",
    "PROMPT_TEMPLATES": ".formats",
    "BUILTIN": ".readers",
    "EXTENSIONS": ".readers",
    "build_byte_tokenizer": ".tokenizer",
    "load_tokenizer": ".tokenizer",
    "IGNORE_INDEX": "..loss",  # owned by the loss; re-exported because batches' labels use it
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_LAZY)
