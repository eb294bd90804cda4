"""``QLoRAPrecision``: the Lightning precision plugin that turns a training run into QLoRA."""

from __future__ import annotations

from collections.abc import Generator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from bitsandbytes.nn import Params4bit
from lightning.fabric.plugins.precision.utils import _convert_fp_tensor, _DtypeContextManager
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.plugins.precision import Precision
from torch import Tensor, nn
from torch.nn.modules.module import register_module_module_registration_hook
from typing_extensions import override

from .lora import LoRAConfig, find_targets, inject_lora, is_adapter_key, lora_layers
from .nf4 import QuantConfig, as_dtype, deferred_linear_init, dtype_name, named_linears, quantize_linears

_DEFAULT: Any = object()


class QLoRAPrecision(Precision):
    """Quantizes a model's linear layers to 4-bit with bitsandbytes and trains LoRA adapters on them.

    Add it to any Trainer; the LightningModule needs no change::

        trainer = L.Trainer(plugins=[QLoRAPrecision(lora=LoRAConfig(r=16))])

    Args:
        quant: how base weights are quantized; ``None`` (or ``enabled=False``) keeps them in 16-bit:
            plain LoRA, same code.
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
        quant = QuantConfig(**quant) if isinstance(quant, dict) else quant
        if quant is not None and not quant.enabled:  # 16-bit LoRA; its compute dtype still applies
            compute_dtype = compute_dtype if compute_dtype is not None else quant.compute_dtype
            quant = None
        self.quant = quant
        self.lora = LoRAConfig(**lora) if isinstance(lora, dict) else (lora or LoRAConfig())
        if compute_dtype is not None:
            self.dtype = as_dtype(compute_dtype, "compute_dtype")
        else:
            self.dtype = self.quant.compute_dtype if self.quant is not None else torch.bfloat16
        if self.quant is not None and self.quant.compute_dtype != self.dtype:
            raise ValueError(
                f"compute_dtype={self.dtype} differs from quant.compute_dtype={self.quant.compute_dtype}; set one"
            )
        self._init_depth = 0
        base = "16bit" if self.quant is None else self.quant.quant_type
        self.precision = f"{base}-lora-{dtype_name(self.dtype)}"  # e.g. "nf4-lora-bfloat16"

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        """Quantizes, then adds adapters, then freezes all but the adapters. Idempotent."""
        if getattr(module, "_qlora_converted", False):
            return module
        if not lora_layers(module):  # a submodule converted earlier (under init_module) is not redone
            targets = find_targets(module, self.lora, head_names=self._skip_modules())
            if self.quant is not None:
                quantize_linears(module, self.quant)
            for param in module.parameters():
                if (
                    param.is_floating_point()
                    and param.dtype != self.dtype
                    and not isinstance(param, Params4bit)
                ):
                    param.data = param.data.to(self.dtype)
            inject_lora(module, self.lora, targets)
        for name, param in module.named_parameters():
            param.requires_grad_(is_adapter_key(name))
        _checkpoint_only_adapters(module)
        module._qlora_converted = True
        return module

    def _skip_modules(self) -> tuple[str, ...]:
        return self.quant.skip_modules if self.quant is not None else ("lm_head",)

    @override
    def tensor_init_context(self) -> AbstractContextManager:
        """Builds linear layers off the accelerator (or on meta under ``empty_init``) and converts the model on exit.

        Converting as soon as the model exists (rather than in ``Trainer.fit``'s setup) means a run
        resumed with ``trainer.fit(model, ckpt_path=...)`` loads its adapters into adapted layers.
        """
        return self._init_context()

    @override
    def module_init_context(self) -> AbstractContextManager:
        return self._init_context()

    @contextmanager
    def _init_context(self) -> Generator[None, None, None]:
        if self._init_depth:  # Lightning nests tensor_init_context and module_init_context
            yield
            return
        parents: dict[int, nn.Module] = {}
        children: set[int] = set()

        def record(parent: nn.Module, name: str, child: nn.Module | None) -> None:
            if child is not None:
                parents[id(parent)] = parent
                children.add(id(child))

        handle = register_module_module_registration_hook(record)
        self._init_depth += 1
        try:
            with _DtypeContextManager(self.dtype), deferred_linear_init():
                yield
        finally:
            self._init_depth -= 1
            handle.remove()
        for key, root in parents.items():
            if key not in children and any(True for _ in named_linears(root)):
                self.convert_module(root)

    @override
    def forward_context(self) -> Any:
        return _DtypeContextManager(self.dtype)

    @override
    def backward(self, tensor: Tensor, model: Any, optimizer: Any, *args: Any, **kwargs: Any) -> None:
        # Under the forward's default dtype: activation checkpointing recomputes layers in here. Under another
        # one a compiled block recompiled in the recompute (dynamo guards on it) and saved another number of
        # tensors than its forward had: a CheckpointError with DDP on 2 H200s (1B shapes, transformers 5.17).
        with _DtypeContextManager(self.dtype):
            super().backward(tensor, model, optimizer, *args, **kwargs)

    @override
    def convert_input(self, data: Any) -> Any:
        return apply_to_collection(data, function=_convert_fp_tensor, dtype=Tensor, dst_type=self.dtype)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "quant": None if self.quant is None else self.quant.to_dict(),
            "lora": self.lora.to_dict(),
            "compute_dtype": dtype_name(self.dtype),
        }

    @override
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


def _checkpoint_only_adapters(module: nn.Module) -> None:
    """Makes ``module.state_dict()`` hold the trainable weights only, and loading tolerate the rest.

    A Lightning checkpoint then holds adapters (megabytes), not the 4-bit base (gigabytes), which
    is rebuilt from its source when the run resumes. Missing adapter keys still fail a strict load.
    """

    def keep_trainable(
        mod: nn.Module, state_dict: dict[str, Tensor], prefix: str, local_metadata: Any
    ) -> None:
        trainable = {prefix + name for name, p in mod.named_parameters() if p.requires_grad}
        for key in [k for k in state_dict if k.startswith(prefix)]:
            if key not in trainable and not is_adapter_key(key):
                del state_dict[key]

    loading_adapters = [True]

    def check_adapter_shapes(mod: nn.Module, state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
        loading_adapters[0] = any(is_adapter_key(k) for k in state_dict)
        # One clear message instead of torch's wall of size mismatches, e.g. when resuming with another rank.
        params = dict(mod.named_parameters(prefix=prefix.rstrip(".")))
        for key, value in state_dict.items():
            if is_adapter_key(key) and key in params and params[key].shape != value.shape:
                ckpt_r, model_r = min(value.shape), min(params[key].shape)
                raise ValueError(
                    f"the checkpoint's adapters do not fit this model: {key} is {tuple(value.shape)} in the "
                    f"checkpoint, {tuple(params[key].shape)} here (lora.r: checkpoint {ckpt_r}, plugin {model_r}). "
                    "Build QLoRAPrecision with the checkpoint's LoRA settings to resume it"
                )

    def ignore_missing_base(mod: nn.Module, incompatible: Any) -> None:
        # A state dict with adapters (a resume) must hold all of them; one without (base weights
        # loaded into a model built empty) leaves the fresh adapters as they are.
        tolerated = [k for k in incompatible.missing_keys if not is_adapter_key(k) or not loading_adapters[0]]
        for key in tolerated:
            incompatible.missing_keys.remove(key)

    # Handles kept so a merged export (adapters.merge_adapter) can restore the full state dict.
    module._qlora_hooks = (
        module._register_state_dict_hook(keep_trainable),
        module.register_load_state_dict_post_hook(ignore_missing_base),
        module._register_load_state_dict_pre_hook(check_adapter_shapes, with_module=True),
    )
