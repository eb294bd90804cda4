"""lightning-qlora: QLoRA fine-tuning as a drop-in PyTorch Lightning precision plugin."""

from .lora import LoRAConfig, LoRALinear, merge_lora
from .nf4 import Linear4bit, QuantConfig
from .precision import QLoRAPrecision

__all__ = ["LoRAConfig", "LoRALinear", "Linear4bit", "QLoRAPrecision", "QuantConfig", "merge_lora"]
__version__ = "0.1.0"
