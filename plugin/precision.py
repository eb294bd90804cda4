"""``QLoRAPrecision``: the Lightning precision plugin that turns a training run into QLoRA."""

from __future__ import annotations

from collections.abc import Generator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from lightning.fabric.plugins.precision.utils import _convert_fp_tensor, _DtypeContextManager
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.plugins.precision import Precision
from torch import Tensor, nn

from .lora import LoRAConfig, find_targets, inject_lora
from .nf4 import Linear4bit, QuantConfig, as_dtype, deferred_linear_init, dtype_name, quantize_linears

_DEFAULT: Any = object()


class QLoRAPrecision(Precision):
    """Quantizes a model's linear layers to 4-bit with bitsandbytes and trains LoRA adapters on them.

    Add it to any Trainer; the LightningModule needs no change::

        trainer = L.Trainer(plugins=[QLoRAPrecision(lora=LoRAConfig(r=16))])

    Args:
        quant: how base weights are quantized; ``None`` keeps them in 16-bit (plain LoRA, same code).
        lora: which linear layers get adapters, and their rank.
        compute_dtype: dtype of the forward pass with ``quant=None`` (else ``quant.compute_dtype``).
    """

    def __init__(
        self,
        quant: QuantConfig | dict | None = _DEFAULT,
        lora: LoRAConfig | dict | None = None,
        compute_dtype: str | torch.dtype | None = None,
    ) -> None:
        if quant is _DEFAULT:
            quant = QuantConfig()
        self.quant = QuantConfig(**quant) if isinstance(quant, dict) else quant
        self.lora = LoRAConfig(**lora) if isinstance(lora, dict) else (lora or LoRAConfig())
        if compute_dtype is not None:
            self.dtype = as_dtype(compute_dtype, "compute_dtype")
        else:
            self.dtype = self.quant.compute_dtype if self.quant is not None else torch.bfloat16
        if self.quant is not None and self.quant.compute_dtype != self.dtype:
            raise ValueError(
                f"compute_dtype={self.dtype} differs from quant.compute_dtype={self.quant.compute_dtype}; set one"
            )
        self.precision = f"{'nf4' if self.quant is None else self.quant.quant_type}-lora-{dtype_name(self.dtype)}"

    def convert_module(self, module: nn.Module) -> nn.Module:
        """Quantizes, then adds adapters, then freezes all but the adapters. Idempotent."""
        if getattr(module, "_qlora_converted", False):
            return module
        targets = find_targets(module, self.lora, head_names=self._skip_modules())
        if self.quant is not None:
            quantize_linears(module, self.quant)
        for param in module.parameters():
            param.requires_grad_(False)
            if param.is_floating_point() and param.dtype != self.dtype and not isinstance(param, _Params4bit()):
                param.data = param.data.to(self.dtype)
        inject_lora(module, self.lora, targets)
        _checkpoint_only_adapters(module)
        module._qlora_converted = True
        return module

    def _skip_modules(self) -> tuple[str, ...]:
        return self.quant.skip_modules if self.quant is not None else ("lm_head",)

    def tensor_init_context(self) -> Any:
        return _init_context(self.dtype, self.quant)

    def module_init_context(self) -> Any:
        return self.tensor_init_context()

    def forward_context(self) -> Any:
        return _DtypeContextManager(self.dtype)

    def convert_input(self, data: Any) -> Any:
        return apply_to_collection(data, function=_convert_fp_tensor, dtype=Tensor, dst_type=self.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {
            "quant": None if self.quant is None else self.quant.to_dict(),
            "lora": self.lora.to_dict(),
            "compute_dtype": dtype_name(self.dtype),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuses a checkpoint whose adapters or quantization differ from this plugin's."""
        mine = self.state_dict()
        diffs = [
            f"{group}.{key}: checkpoint {theirs.get(key)!r}, plugin {value!r}"
            for group in ("quant", "lora")
            for theirs, ours in [(state_dict.get(group) or {}, mine[group] or {})]
            for key, value in ours.items()
            if key in theirs and theirs[key] != value
        ]
        if (state_dict.get("quant") is None) != (mine["quant"] is None):
            diffs.append(f"quant: checkpoint {state_dict.get('quant')!r}, plugin {mine['quant']!r}")
        if diffs:
            raise ValueError(
                "this checkpoint was trained with other QLoRA settings; build the plugin with the checkpoint's "
                "settings to resume: " + "; ".join(diffs)
            )


def _Params4bit() -> type:
    import bitsandbytes as bnb

    return bnb.nn.Params4bit


@contextmanager
def _init_context(dtype: torch.dtype, quant: QuantConfig | None) -> Generator[None, None, None]:
    with ExitStack() as stack:
        stack.enter_context(_DtypeContextManager(dtype))
        stack.enter_context(deferred_linear_init(quant))
        yield


def _is_adapter_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def _checkpoint_only_adapters(module: nn.Module) -> None:
    """Makes ``module.state_dict()`` hold the trainable weights only, and loading tolerate the rest.

    A Lightning checkpoint then holds adapters (megabytes), not the 4-bit base (gigabytes), which
    is rebuilt from its source when the run resumes. Missing adapter keys still fail a strict load.
    """

    def keep_trainable(mod: nn.Module, state_dict: dict[str, Tensor], prefix: str, local_metadata: Any) -> None:
        trainable = {prefix + name for name, p in mod.named_parameters() if p.requires_grad}
        for key in [k for k in state_dict if k.startswith(prefix)]:
            if key not in trainable and not _is_adapter_key(key):
                del state_dict[key]

    def ignore_missing_base(mod: nn.Module, incompatible: Any) -> None:
        frozen = [k for k in incompatible.missing_keys if not _is_adapter_key(k)]
        for key in frozen:
            incompatible.missing_keys.remove(key)

    module._register_state_dict_hook(keep_trainable)
    module.register_load_state_dict_post_hook(ignore_missing_base)


def is_converted(module: nn.Module) -> bool:
    return bool(getattr(module, "_qlora_converted", False))


__all__ = ["QLoRAPrecision", "Linear4bit"]
