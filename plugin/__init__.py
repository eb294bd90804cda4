"""lightning-qlora: QLoRA fine-tuning as a drop-in PyTorch Lightning precision plugin."""

from .adapters import AdapterCheckpoint, export_merged, load_adapter, load_model, merge_adapter, save_adapter
from .callbacks import GradNormMonitor, MemoryMonitor, RunSummary
from .data import InstructDataModule
from .generate import generate
from .lora import LoRAConfig, LoRALinear, merge_lora
from .module import CausalLMModule
from .nf4 import Linear4bit, QuantConfig
from .precision import QLoRAPrecision

__all__ = [
    "AdapterCheckpoint",
    "CausalLMModule",
    "GradNormMonitor",
    "InstructDataModule",
    "Linear4bit",
    "LoRAConfig",
    "LoRALinear",
    "MemoryMonitor",
    "QLoRAPrecision",
    "QuantConfig",
    "RunSummary",
    "export_merged",
    "generate",
    "load_adapter",
    "load_model",
    "merge_adapter",
    "merge_lora",
    "save_adapter",
]
__version__ = "0.1.0"
