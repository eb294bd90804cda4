"""lightning-qlora: QLoRA fine-tuning as a drop-in PyTorch Lightning precision plugin."""

import importlib
import logging
from typing import Any

# bitsandbytes' CPU backend logs at import that an optional hub kernel is missing; nothing here uses it.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "kernels-community" not in record.getMessage()
)

from .lora import LoRAConfig, LoRALinear  # noqa: E402
from .nf4 import Linear4bit, QuantConfig  # noqa: E402
from .precision import QLoRAPrecision  # noqa: E402
from .sharding import FSDP2Strategy  # noqa: E402

# `Trainer(strategy="fsdp2")` once this package is imported, like Lightning's own strategy names.
FSDP2Strategy.register_strategies(__import__("lightning.pytorch.strategies", fromlist=["x"]).StrategyRegistry)

# The rest of the API pulls in transformers/datasets/wandb: imported on first use, so that the plugin
# alone (`from lightning_qlora import QLoRAPrecision`) stays a light import.
_LAZY = {
    "load_adapter": "adapters",
    "merge_adapter": "adapters",
    "save_adapter": "adapters",
    "AdapterCheckpoint": "callbacks",
    "GradNormMonitor": "callbacks",
    "MemoryMonitor": "callbacks",
    "RunSummary": "callbacks",
    "load_pretrained": "checkpoint4bit",
    "save_4bit_checkpoint": "checkpoint4bit_write",
    "write_random_4bit_checkpoint": "checkpoint4bit_write",
    "InstructDataModule": "data",
    "NonFiniteGuard": "guards",
    "export_merged": "export",
    "load_model": "export",
    "generate": "generate",
    "CausalLMModule": "module",
    "quantize_checkpoint": "quantize",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FSDP2Strategy", "LoRAConfig", "LoRALinear", "Linear4bit", "QLoRAPrecision", "QuantConfig", *_LAZY]
__version__ = "0.1.0"
