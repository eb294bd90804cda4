"""4-bit NormalFloat (and FP4) linear layers over bitsandbytes ``Params4bit``.

The frozen base weight of every targeted ``nn.Linear`` is stored as a bitsandbytes ``Params4bit``
and quantized by bitsandbytes' own kernels (CUDA on a GPU, its CPU backend on a CPU). The forward
dequantizes it and runs one matrix product in the compute dtype; the backward dequantizes again and
returns only the input gradient, so no 16-bit copy of the weight is ever kept alive between the two
passes and nothing but a reference to the packed weight is saved. That matmul, eager and compiled,
is :mod:`.nf4_matmul`'s.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import torch
from lightning.fabric.plugins.precision.utils import _ClassReplacementContextManager, _DtypeContextManager
from torch import Tensor, nn

from .nf4_matmul import (
    EagerMatmul4bit,
    TracedMatmul4bit,
    code_table,
    dequantize,
    dequantize_matmul,
    quant_constants,
    traceable,
)

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "uint8": torch.uint8,
}


def as_dtype(value: str | torch.dtype, setting: str) -> torch.dtype:
    """Turns ``"bfloat16"`` / ``"torch.bfloat16"`` / ``torch.bfloat16`` into a dtype, naming ``setting`` on error."""
    if isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"{setting}={value!r} is not a dtype; use one of {sorted(set(_DTYPES))}")
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class QuantConfig:
    """How the frozen base weights are quantized. Also the Hydra schema of the ``quant`` group.

    Args:
        enabled: ``False`` keeps the base weights in ``compute_dtype``: plain 16-bit LoRA through the
            same plugin (the ``quant=none`` option; ``QLoRAPrecision(quant=None)`` in Python).
        quant_type: ``"nf4"`` (4-bit NormalFloat, the QLoRA format) or ``"fp4"``.
        double_quant: quantize the per-block absmax constants to 8 bits in blocks of 256
            (about 0.37 bits per weight saved at block size 64).
        blocksize: weights per absmax constant; a power of two from 32 to 4096.
        compute_dtype: dtype the weights are dequantized to and matrix products run in; also the
            dtype of every parameter that is not quantized and not an adapter. A name
            (``"bfloat16"``) or a ``torch.dtype``; held as a ``torch.dtype`` once built.
        quant_storage: dtype that holds the packed 4-bit data (the same bytes, viewed). ``uint8`` by
            default; :class:`~lightning_qlora.FSDP2Strategy` views it as the compute dtype before sharding.
        skip_modules: names (or name suffixes) of linear layers kept in 16-bit; the output head by
            default, whose error would hit every logit.
    """

    enabled: bool = True
    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    # Any: a Hydra config holds the name, the built object a torch.dtype (OmegaConf has no dtype type).
    compute_dtype: Any = "bfloat16"
    quant_storage: Any = "uint8"
    skip_modules: list[str] = field(default_factory=lambda: ["lm_head"])

    def __post_init__(self) -> None:
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(
                f"quant.quant_type={self.quant_type!r} is not supported; use one of {QUANT_TYPES}"
            )
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(
                f"quant.blocksize={self.blocksize} is not supported by bitsandbytes; use one of {BLOCKSIZES}"
            )
        self.compute_dtype = as_dtype(self.compute_dtype, "quant.compute_dtype")
        if not self.compute_dtype.is_floating_point:
            raise ValueError(f"quant.compute_dtype={self.compute_dtype} must be a floating-point dtype")
        self.quant_storage = as_dtype(self.quant_storage, "quant.quant_storage")
        if self.quant_storage not in (torch.uint8, torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(
                f"quant.quant_storage={self.quant_storage} is not supported; use uint8 or a floating dtype"
            )
        if isinstance(self.skip_modules, str):
            self.skip_modules = [self.skip_modules]
        self.skip_modules = list(self.skip_modules)

    def to_dict(self) -> dict[str, Any]:
        """Plain, checkpoint-safe form (dtypes as strings); ``QuantConfig(**to_dict())`` rebuilds it."""
        return {
            "enabled": self.enabled,
            "quant_type": self.quant_type,
            "double_quant": self.double_quant,
            "blocksize": self.blocksize,
            "compute_dtype": dtype_name(self.compute_dtype),
            "quant_storage": dtype_name(self.quant_storage),
            "skip_modules": list(self.skip_modules),
        }


class Linear4bit(nn.Module):
    """A frozen linear layer whose weight is a bitsandbytes ``Params4bit``.

    The weight is quantized lazily: bitsandbytes quantizes a ``Params4bit`` when it first moves
    to a device (``module.to(device)``), so a model converted on the host and moved to the GPU
    quantizes layer by layer on the GPU and never holds its whole 16-bit copy there.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        weight: Tensor,
        bias: Tensor | None,
        config: QuantConfig,
    ) -> None:
        super().__init__()
        self.quant_state: bnbF.QuantState | None = None
        self.in_features = in_features
        self.out_features = out_features
        self.quant_type = config.quant_type
        self.blocksize = config.blocksize
        self.double_quant = config.double_quant
        self.compute_dtype = config.compute_dtype
        self.weight = weight if isinstance(weight, bnb.nn.Params4bit) else _params4bit(weight, config)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(config.compute_dtype))
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self._refresh_packed()

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantConfig) -> Linear4bit:
        layer = cls(linear.in_features, linear.out_features, linear.weight, linear.bias, config)
        layer.target_device = getattr(linear, "target_device", linear.weight.device)
        return layer

    def quant_config(self, skip_modules: Sequence[str] = ()) -> QuantConfig:
        """The settings this layer was quantized with."""
        return QuantConfig(
            quant_type=self.quant_type,
            double_quant=self.double_quant,
            blocksize=self.blocksize,
            compute_dtype=self.compute_dtype,
            quant_storage=getattr(self.weight, "quant_storage", self.weight.dtype),  # FSDP2: a plain shard
            skip_modules=list(skip_modules),
        )

    @property
    def quantized(self) -> bool:
        return self.quant_state is not None

    def quantize_(self, device: torch.device | str | None = None) -> Linear4bit:
        """Quantizes the weight now, on ``device`` (default: where it lies)."""
        if not self.quantized:
            device = torch.device(device) if device is not None else self.weight.device
            if device.type == "meta":
                raise RuntimeError("cannot quantize a weight on the meta device: load its values first")
            self.weight = self.weight._quantize(device)
            self._refresh_packed()
        return self

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            out = self.compiled_matmul(x)
        else:
            out = EagerMatmul4bit.apply(x, self.frozen_weight())
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out

    def frozen_weight(self) -> bnb.nn.Params4bit:
        """The quantized weight for the eager matmul functions (quantized here if it never moved)."""
        if not self.quantized:
            # Converted but never moved to a device (a plain module outside a Trainer).
            self.quantize_()
        weight = self.weight
        if isinstance(weight, bnb.nn.Params4bit):
            return weight
        # FSDP2 swapped the Params4bit for a plain tensor (the packed bytes it all-gathered): the same
        # storage, wrapped again with the constants this layer kept.
        return bnb.nn.Params4bit(
            weight.detach(),
            requires_grad=False,
            quant_state=self.quant_state,
            blocksize=self.blocksize,
            compress_statistics=self.double_quant,
            quant_type=self.quant_type,
            quant_storage=weight.dtype,
            bnb_quantized=True,
        )

    def packed(self) -> tuple[tuple, Tensor, tuple[Tensor, ...]]:
        """The weight as :func:`dequantize_traced` takes it: the constants, the code table, and the packed bytes
        with the QuantState's tensors (the bytes read from the module: under FSDP2, the tensor it all-gathered)."""
        if self._packed is None:
            raise RuntimeError("quantize the model (move it to its device) before compiling it")
        spec, constants = self._packed
        return spec, self._code_table, (self.weight, *constants)

    def compiled_matmul(self, x: Tensor) -> Tensor:
        """``x @ W.T`` under torch.compile: traced (:class:`TracedMatmul4bit`, the dequantization fused
        into one kernel) when :func:`traceable`, else the opaque :func:`dequantize_matmul` op.

        torch.compile sees plain tensors (the packed weight and its QuantState's), never the Params4bit.
        """
        spec, table, packed = self.packed()
        if traceable(spec, packed):
            return TracedMatmul4bit.apply(x, spec, table, *packed)
        return dequantize_matmul(x, list(packed), *spec, True)

    def _refresh_packed(self) -> None:
        """Keeps the quantization constants on the module, where FSDP2's swap of ``weight`` cannot drop them.

        A sharded layer keeps its constants whole, on the device it was quantized on (they are 1/16 to 1/64
        of the packed bytes); FSDP2 only shards and gathers the packed bytes.
        """
        weight = self.weight
        if isinstance(weight, bnb.nn.Params4bit):
            self.quant_state = weight.quant_state if weight.bnb_quantized else None
        self._packed = quant_constants(self.quant_state) if self.quantized else None
        # The code table for dequantize_traced, made here: a tensor created while compile traces is a side effect.
        qs = self.quant_state
        self._code_table = code_table(qs.quant_type, qs.absmax.device) if self.quantized else None

    def _apply(self, fn: Any, recurse: bool = True) -> Linear4bit:
        packed = self.weight if self.quantized else None  # the bytes, whatever their storage dtype

        def device_only_for_packed(t: Tensor) -> Tensor:
            out = fn(t)
            if t is packed and out.dtype != t.dtype:
                # Packed 4-bit codes are bytes, not numbers: a dtype cast (model.half(), .float())
                # would scramble them when quant_storage is a float type. Only the move applies.
                out = t if out.device == t.device else t.to(out.device)
            return out

        out = super()._apply(device_only_for_packed, recurse)
        # A device move quantizes (or moves) the weight: the plain-tensor view must follow it.
        self._refresh_packed()
        return out

    def view_storage(self, dtype: torch.dtype) -> None:
        """Holds the packed bytes as ``dtype``: the same bytes viewed, dequantized alike (bitsandbytes'
        ``quant_storage``). FSDP2 in torch < 2.13 can shard floating-point parameters only."""
        weight = self.weight
        if not self.quantized or weight.dtype == dtype:
            return
        data = weight.data.reshape(-1).view(dtype).unsqueeze(1)
        self.weight = bnb.nn.Params4bit(
            data,
            requires_grad=False,
            quant_state=self.quant_state,
            blocksize=self.blocksize,
            compress_statistics=self.double_quant,
            quant_type=self.quant_type,
            quant_storage=dtype,
            bnb_quantized=True,
        )
        self._refresh_packed()

    def load_prequantized(self, tensors: Mapping[str, Tensor], device: torch.device | str) -> None:
        """Takes an already-quantized weight as bitsandbytes serializes it, without re-quantizing.

        Args:
            tensors: the weight's entries of a transformers 4-bit checkpoint, keyed by suffix: ``""``
                (the packed codes), ``"absmax"``, ``"quant_map"``, ``"nested_absmax"``,
                ``"nested_quant_map"`` and ``"quant_state.bitsandbytes__nf4"`` (or ``__fp4``).
            device: where the weight lives from now on.

        Raises:
            ValueError: the serialized weight does not have this layer's shape.
        """
        # The packed bytes are stored in whatever dtype this layer was built with (its quant_storage):
        # FSDP needs them in the compute dtype, files usually hold uint8; only the view changes.
        weight = params4bit_from_serialized(tensors, device, quant_storage=self.weight.quant_storage)
        shape = tuple(weight.quant_state.shape)
        if shape != (self.out_features, self.in_features):
            raise ValueError(
                f"the 4-bit weight has shape {shape}, the layer expects {(self.out_features, self.in_features)}"
            )
        self.weight = weight
        self.quant_type = weight.quant_type
        self.blocksize = weight.blocksize
        self.double_quant = weight.compress_statistics
        self._refresh_packed()

    def serialized_weight(self) -> dict[str, Tensor]:
        """The quantized weight as transformers writes it (see :func:`serialize_params4bit`); quantizes first if needed."""
        return serialize_params4bit(self.frozen_weight())

    def dequantized_weight(self) -> Tensor:
        if not self.quantized:
            return self.weight.data.clone()
        return dequantize(self.weight)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}"
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):  # noqa: D401
        # Quantize-on-load: a 16-bit tensor under this layer's weight key replaces the (possibly meta)
        # placeholder and is quantized where this layer lives, one layer at a time.
        key = prefix + "weight"
        incoming = state_dict.get(key)
        if incoming is not None and incoming.dtype.is_floating_point and incoming.dim() == 2:
            if tuple(incoming.shape) != (self.out_features, self.in_features):
                error_msgs.append(
                    f"size mismatch for {key}: checkpoint {tuple(incoming.shape)}, "
                    f"model {(self.out_features, self.in_features)}"
                )
            else:
                device = self.weight.device
                if device.type == "meta":  # built empty: quantize where the model is meant to live
                    device = getattr(self, "target_device", device)
                self.weight = _params4bit(incoming, self.quant_config())
                self._refresh_packed()  # a new, unquantized weight: the old quantization state is gone
                if device.type != "meta":
                    self.quantize_(device)
            if self.bias is not None and prefix + "bias" in state_dict:
                bias = state_dict[prefix + "bias"].detach().to(self.weight.device, self.compute_dtype)
                self.bias = nn.Parameter(bias, requires_grad=False)
            elif self.bias is not None:
                missing_keys.append(prefix + "bias")
            return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def _params4bit(weight: Tensor, config: QuantConfig) -> bnb.nn.Params4bit:
    """An unquantized ``Params4bit``: bitsandbytes quantizes it when it moves to a device."""
    return bnb.nn.Params4bit(
        weight.detach().to(config.compute_dtype),
        requires_grad=False,
        quant_type=config.quant_type,
        blocksize=config.blocksize,
        compress_statistics=config.double_quant,
        quant_storage=config.quant_storage,
    )


def quantize_tensor(weight: Tensor, config: QuantConfig, device: torch.device | str) -> bnb.nn.Params4bit:
    """``weight`` quantized on ``device`` to exactly the bytes a :class:`Linear4bit` built with ``config`` holds.

    The weight moves to ``device`` before it is cast to the compute dtype: quantizing on a GPU, the
    host never holds the cast copy. The cast is exact rounding either way, so the bytes do not
    depend on where it happens.
    """
    device = torch.device(device)
    return _params4bit(weight.detach().to(device), config)._quantize(device)


# The suffixes (after "<layer>.weight") of a bitsandbytes 4-bit weight in a transformers checkpoint.
SERIALIZED_PARTS = (
    "",
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
    ".quant_state.bitsandbytes__nf4",
    ".quant_state.bitsandbytes__fp4",
)


def serialize_params4bit(weight: bnb.nn.Params4bit) -> dict[str, Tensor]:
    """A quantized weight as host tensors keyed by suffix (``""``, ``".absmax"``, ...): transformers' format.

    Every tensor is a fresh host copy: bitsandbytes shares its code tables between layers, and
    safetensors refuses to write one storage under two names.
    """
    if not getattr(weight, "bnb_quantized", False):
        raise ValueError("the weight is not quantized yet; move its layer to a device first")
    parts = {"": weight.data, **{"." + k: v for k, v in weight.quant_state.as_dict(packed=True).items()}}
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in parts.items()}


def params4bit_from_serialized(
    tensors: Mapping[str, Tensor], device: torch.device | str, quant_storage: torch.dtype | None = None
) -> bnb.nn.Params4bit:
    """The inverse of :func:`serialize_params4bit` (keys with or without their leading dot), on ``device``.

    Args:
        tensors: the packed codes under ``""`` and the quant-state entries.
        device: where the weight is placed.
        quant_storage: reinterpret the packed bytes as this dtype (default: as stored).
    """
    parts = {k.lstrip("."): v for k, v in tensors.items()}
    data = parts.pop("")
    if quant_storage is not None and data.dtype != quant_storage:
        # bitsandbytes stores packed codes of another storage dtype as the same bytes, viewed: (n, 1).
        data = data.reshape(-1).view(quant_storage).unsqueeze(1)
    # from_dict consumes its argument (the caller's mapping stays intact), and builds the double-quant
    # offset with torch.tensor(float): under an init context's bf16 default dtype it would be rounded.
    with _DtypeContextManager(torch.float32):
        return bnb.nn.Params4bit.from_prequantized(
            data=data, quantized_stats=dict(parts), requires_grad=False, device=torch.device(device)
        )


def name_matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def quantize_linears(
    module: nn.Module, config: QuantConfig, targets: Iterable[str] | None = None
) -> list[str]:
    """Replaces the ``nn.Linear`` layers of ``module`` with :class:`Linear4bit`, in place.

    Args:
        module: the model to convert.
        config: the quantization settings.
        targets: qualified names of the linear layers to quantize; every linear layer not in
            ``config.skip_modules`` when ``None``.

    Returns:
        The qualified names of the layers that were quantized.

    Raises:
        ValueError: a layer's input width is smaller than the block size (bitsandbytes 0.50.2
            silently returns wrong values for such layers on CPU).
    """
    wanted = None if targets is None else set(targets)
    chosen = []
    for name, child in named_linears(module):
        if isinstance(child, Linear4bit) or name_matches(name, config.skip_modules):
            continue
        if wanted is not None and name not in wanted:
            continue
        if child.in_features < config.blocksize:
            raise ValueError(
                f"quant.blocksize={config.blocksize} is larger than the input width ({child.in_features}) of "
                f"layer '{name}'; bitsandbytes would quantize it wrongly. Use quant.blocksize <= "
                f"{largest_blocksize(child.in_features)} or add '{name}' to quant.skip_modules"
            )
        chosen.append(name)
    for name in chosen:
        parent, attr = parent_module(module, name)
        setattr(parent, attr, Linear4bit.from_linear(getattr(parent, attr), config))
    return chosen


def largest_blocksize(width: int) -> int:
    fitting = [b for b in BLOCKSIZES if b <= width]
    return fitting[-1] if fitting else BLOCKSIZES[0]


def named_linears(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``nn.Linear`` and :class:`Linear4bit` layers with their qualified names.

    An adapted layer (any wrapper with a ``base_layer``: ours or PEFT's) contributes its base only:
    the adapters inside it are never quantized, targeted or merged as if they were base layers.
    """
    for name, child in module.named_children():
        if isinstance(child, (nn.Linear, Linear4bit)):
            yield name, child
        elif isinstance(getattr(child, "base_layer", None), nn.Module):
            base = child.base_layer
            if isinstance(base, (nn.Linear, Linear4bit)):
                yield f"{name}.base_layer", base
            else:
                yield from ((f"{name}.base_layer.{n}", m) for n, m in named_linears(base))
        else:
            yield from ((f"{name}.{n}", m) for n, m in named_linears(child))


def parent_module(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), attr


def weight_bytes_by_dtype(module: nn.Module) -> dict[str, int]:
    """Bytes held by parameters and buffers, keyed by storage kind ("nf4", "bfloat16", ...).

    4-bit weights count their packed data plus their block constants (absmax, nested absmax).
    """
    totals: dict[str, int] = {}
    seen: set[int] = set()
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        if isinstance(tensor, bnb.nn.Params4bit) and tensor.bnb_quantized:
            key = tensor.quant_type
            size = tensor.data.numel() * tensor.data.element_size() + quant_state_bytes(tensor.quant_state)
        else:
            key = dtype_name(tensor.dtype)
            size = tensor.numel() * tensor.element_size()
        totals[key] = totals.get(key, 0) + size
    return totals


def quant_state_bytes(state: bnbF.QuantState) -> int:
    """Bytes of a QuantState's block constants (absmax, and the nested state for double quant)."""
    size = state.absmax.numel() * state.absmax.element_size()
    if state.nested:
        size += state.state2.absmax.numel() * state.state2.absmax.element_size()
        size += state.offset.numel() * state.offset.element_size()
    return size


def _empty_init_active() -> bool:
    """True inside Lightning's ``init_module(empty_init=True)``, whose values will be loaded, not used."""
    from lightning.fabric.utilities.init import _EmptyInit
    from torch.overrides import _get_current_function_mode_stack

    return any(isinstance(m, _EmptyInit) and m.enabled for m in _get_current_function_mode_stack())


class DeferredLinear(nn.Linear):
    """The ``nn.Linear`` built inside :func:`deferred_linear_init`.

    Its weight never lands on the accelerator in 16-bit: it is allocated on the meta device under
    ``empty_init`` (nothing allocated until ``load_state_dict``) and on the host otherwise. The plugin
    converts these layers to :class:`Linear4bit` when its init context exits, which quantizes them
    as they load or move; layers kept in 16-bit (``skip_modules``, ``quant=None``) load here.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, device: Any = None, dtype: Any = None
    ):
        target = torch.device(device) if device is not None else torch.get_default_device()
        # Someone else's meta context (transformers' from_pretrained) will fill the weight itself.
        staging = "meta" if _empty_init_active() or target.type == "meta" else "cpu"
        self.target_device = target
        super().__init__(in_features, out_features, bias=bias, device=staging, dtype=dtype)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        key = prefix + "weight"
        if self.weight.device.type != "meta" or key not in state_dict:
            return super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
        # Built empty: copying into a meta tensor would silently do nothing, so assign on the target device.
        incoming = state_dict[key]
        if tuple(incoming.shape) != (self.out_features, self.in_features):
            error_msgs.append(
                f"size mismatch for {key}: checkpoint {tuple(incoming.shape)}, model {tuple(self.weight.shape)}"
            )
            return
        dtype = self.weight.dtype
        self.weight = nn.Parameter(incoming.detach().to(self.target_device, dtype), requires_grad=False)
        bias_key = prefix + "bias"
        if self.bias is not None and bias_key in state_dict:
            self.bias = nn.Parameter(state_dict[bias_key].detach().to(self.target_device, dtype))
        elif self.bias is not None:
            missing_keys.append(bias_key)


def deferred_linear_init() -> _ClassReplacementContextManager:
    """Makes ``torch.nn.Linear`` build :class:`DeferredLinear` layers while active (Lightning's class swap).

    Like every class swap, it cannot reach code that did ``from torch.nn import Linear`` before the
    context was entered; such layers are still converted later, only staged where they were built.
    """
    return _ClassReplacementContextManager(
        {"torch.nn.Linear": DeferredLinear, "torch.nn.modules.linear.Linear": DeferredLinear}
    )
