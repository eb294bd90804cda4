"""LoRA adapters over frozen (4-bit or 16-bit) linear layers.

``LoRALinear`` keeps PEFT's attribute names (``base_layer``, ``lora_A``, ``lora_B``) so adapter
keys translate one to one into PEFT's format. Adapter weights are kept in float32 (master weights,
so small optimizer updates are not rounded away) and cast to the compute dtype in the forward.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .nf4 import Linear4bit, named_linears, parent_module
from .nf4_matmul import dequantize_traced, traceable, weight_value

# The class itself, taken at import: inside the plugin's init context ``nn.Linear`` names DeferredLinear,
# which stages its weight on the host; adapters belong on their base layer's device.
_Linear = nn.Linear


@dataclass
class LoRAConfig:
    """Which layers get adapters, and their shape. Also the Hydra schema of the ``lora`` group.

    Args:
        r: adapter rank (> 0).
        alpha: scaling numerator; the update is ``B @ A * alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
        dropout: dropout on the adapter's input, in [0, 1).
        target_modules: ``"all-linear"`` (every linear layer but the output head), a list of layer
            names or name suffixes (``["q_proj", "v_proj"]``), or a regular expression matched
            against the full qualified name.
        exclude_modules: names or suffixes never adapted.
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Any = "all-linear"  # Any: a string or a list of names (OmegaConf has no union type)
    exclude_modules: list[str] = field(default_factory=list)
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"lora.r={self.r!r} must be a positive integer (e.g. 8, 16, 64)")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"lora.dropout={self.dropout} must be in [0, 1)")
        if not math.isfinite(float(self.alpha)) or float(self.alpha) <= 0:
            raise ValueError(f"lora.alpha={self.alpha} must be a positive finite number")
        if not isinstance(self.target_modules, str):
            self.target_modules = list(self.target_modules)
            if not self.target_modules:
                raise ValueError(
                    "lora.target_modules is empty; use 'all-linear', a list of names, or a regex"
                )
        if isinstance(self.exclude_modules, str):
            self.exclude_modules = [self.exclude_modules]
        self.exclude_modules = list(self.exclude_modules)

    @property
    def scaling(self) -> float:
        """The factor on ``B @ A``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA. Its one definition."""
        return float(self.alpha) / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_dict(self) -> dict[str, Any]:
        return {
            "r": self.r,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "target_modules": self.target_modules,
            "exclude_modules": list(self.exclude_modules),
            "use_rslora": self.use_rslora,
        }


_FUSED = True  # the one-function path below; False composes base and adapter with plain autograd


class LoRALinear(nn.Module):
    """``base_layer(x) + dropout(x) @ A.T @ B.T * scaling`` with ``base_layer`` frozen.

    A is initialised Kaiming-uniform and B to zero, so before the first step the layer reproduces
    its base exactly. The layer keeps its :class:`LoRAConfig` (as PEFT and torchtune layers do), so
    alpha and rsLoRA are read back from it, never inferred from ``scaling``.

    Args:
        base_layer: the frozen linear layer (``nn.Linear`` or :class:`~lightning_qlora.Linear4bit`).
        config: rank, alpha, dropout and rsLoRA; built from ``settings`` (``r=16, alpha=32``) if not given.
    """

    def __init__(self, base_layer: nn.Module, config: LoRAConfig | None = None, **settings: Any):
        super().__init__()
        self.config = config if config is not None else LoRAConfig(**settings)
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        r = self.config.r
        device = _device_of(base_layer)
        # Adapters start on the base's device; a meta base gets meta adapters, materialised later.
        self.lora_A = _Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = _Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        dropout = self.config.dropout
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora_parameters()
        self._register_load_state_dict_pre_hook(_route_base_keys)

    @property
    def r(self) -> int:
        return self.config.r

    @property
    def scaling(self) -> float:
        return self.config.scaling

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        if self.lora_A.weight.device.type == "meta":
            return
        # kaiming_uniform_(a=sqrt(5)) and zeros_, spelled out: the plugin converts models inside
        # Lightning's init_module(empty_init=True), whose mode turns torch.nn.init.* into no-ops and
        # would leave the adapters as uninitialised memory (B not zero).
        gain = nn.init.calculate_gain("leaky_relu", math.sqrt(5))
        bound = math.sqrt(3.0) * (gain / math.sqrt(self.in_features))
        self.lora_A.weight.uniform_(-bound, bound)
        self.lora_B.weight.zero_()

    def forward(self, x: Tensor) -> Tensor:
        base = self.base_layer
        if self.merged:
            return base(x)
        dropout = self.training and not isinstance(self.lora_dropout, nn.Identity)
        # None: the adapter reads the input itself. Never the same tensor twice: dynamo cannot trace an
        # autograd function given one tensor as two inputs (it breaks the compiled graph there).
        xd = self.lora_dropout(x) if dropout else None
        if isinstance(base, Linear4bit) and _FUSED and torch.compiler.is_compiling():
            spec, table, packed = base.packed()
            # Base and adapter in one function, traced (see _PackedLinearWithLoRA).
            if traceable(spec, packed):
                out = _PackedLinearWithLoRA.apply(
                    x, xd, self.lora_A.weight, self.lora_B.weight, self.scaling, spec, table, *packed
                )
                return out if base.bias is None else out + base.bias.to(out.dtype)
        if isinstance(base, Linear4bit) and _FUSED and not torch.compiler.is_compiling():
            weight = base.frozen_weight()
        elif type(base) is nn.Linear and not base.weight.requires_grad and _FUSED:
            weight = base.weight
        else:
            # Any other frozen layer (and, under torch.compile, a 4-bit one dequantize_traced cannot take).
            out = base(x)
            lora = (x if xd is None else xd).to(out.dtype) @ self.lora_A.weight.to(out.dtype).t()
            return out + (lora @ self.lora_B.weight.to(out.dtype).t()) * self.scaling
        return _FrozenLinearWithLoRA.apply(
            x, xd, base.bias, self.lora_A.weight, self.lora_B.weight, self.scaling, weight
        )

    def delta_weight(self) -> Tensor:
        """``B @ A * scaling`` in float32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}"


class _FrozenLinearWithLoRA(torch.autograd.Function):
    """``x @ W.T + b + (xd @ A.T) @ B.T * s`` for a frozen (4-bit or 16-bit) ``W`` in one function.

    The 4-bit weight is dequantized once in the forward and once in the backward and never saved;
    what is saved is the adapter input and the rank-``r`` projection (both small next to ``W``).
    The scale and the sum fold into one ``addmm``; the base and adapter input gradients into another.
    Under torch.compile a 4-bit base runs as :class:`_PackedLinearWithLoRA`, and a 16-bit one here with
    the sums of :data:`low_rank_plus_matmul`.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        xd: Tensor | None,
        bias: Tensor | None,
        a: Tensor,
        b: Tensor,
        s: float,
        weight: Tensor,
    ):
        dtype = x.dtype
        x2, xd2, a16, b16, xa = _adapter_inputs(x, xd, a, b)
        w = weight_value(weight).to(dtype)
        if torch.compiler.is_compiling():  # a 16-bit base, traced: see low_rank_plus_matmul
            out = low_rank_plus_matmul(xa, (b16 * s).t(), x2, w.t())
            out = out if bias is None else out + bias.to(dtype)
        else:
            out = x2 @ w.t() if bias is None else torch.addmm(bias.to(dtype), x2, w.t())
            out.addmm_(xa, b16.t(), alpha=s)
        ctx.scaling, ctx.same_input, ctx.weight = s, xd is None, weight  # the weight referenced, never copied
        ctx.x_shape, ctx.xd_shape = x.shape, None if xd is None else xd.shape
        ctx.save_for_backward(xd2, xa, a16, b16)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor):
        xd2, xa, a16, b16 = ctx.saved_tensors
        s = ctx.scaling
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_xa = g2 @ (b16 * s)
        grad_a = (grad_xa.t() @ xd2).float() if ctx.needs_input_grad[3] else None
        grad_b = (g2.t() @ (xa * s)).float() if ctx.needs_input_grad[4] else None
        grad_x = grad_xd = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            w = weight_value(ctx.weight).to(g2.dtype)
            grad_x, grad_xd = _input_grads(
                g2, w, grad_xa, a16, ctx.same_input, ctx.x_shape, ctx.xd_shape, torch.compiler.is_compiling()
            )
        return grad_x, grad_xd, None, grad_a, grad_b, None, None


def _adapter_inputs(x: Tensor, xd: Tensor | None, a: Tensor, b: Tensor) -> tuple[Tensor, ...]:
    """The layer's input and the adapter's (``xd``; None: the same) as rows, A and B in the input's dtype, and
    the adapter's rank-r projection ``xd @ A.T``."""
    x2 = x.reshape(-1, x.shape[-1])
    xd2 = x2 if xd is None else xd.reshape(-1, xd.shape[-1])
    a16, b16 = a.to(x.dtype), b.to(x.dtype)
    return x2, xd2, a16, b16, xd2 @ a16.t()


def _input_grads(
    g2: Tensor,
    w: Tensor,
    grad_xa: Tensor,
    a16: Tensor,
    same_input: bool,
    x_shape: torch.Size,
    xd_shape: Any,
    traced: bool,
) -> tuple[Tensor, Tensor | None]:
    """The layer's input gradient (``g2 @ w``, the frozen weight's part, plus the adapter's when the adapter
    reads the same input: one in-place sum, through :data:`low_rank_plus_matmul` when ``traced``) and, when
    dropout gave the adapter an input of its own, that input's."""
    if same_input:
        total = low_rank_plus_matmul(grad_xa, a16, g2, w) if traced else (g2 @ w).addmm_(grad_xa, a16)
        return total.view(x_shape), None
    return (g2 @ w).view(x_shape), (grad_xa @ a16).view(xd_shape)


# Compiled, an in-place sum of two products is functionalized: ``addmm_`` becomes an out-of-place addmm, which
# copies its whole input before adding. On an H200, 7B at 4 x 2048, that copy and a rank-r product rewriting
# each output took 78 ms of a 677 ms step. An opaque op keeps the sum in place, in cuBLAS's epilogue: 7B
# +6.6%. Declared without torch.library.custom_op's Python layers, its call costs the host ~4 us over the
# direct one (custom_op: ~21 us, which cost the host-bound 1B step 4.9%); declared so, every sum through it
# made 1B 7% faster than only the large ones (H200, same call), so every traced sum takes it.
torch.library.define(
    "lightning_qlora::low_rank_plus_matmul", "(Tensor low, Tensor up, Tensor x, Tensor w) -> Tensor"
)


@torch.library.impl("lightning_qlora::low_rank_plus_matmul", "CompositeExplicitAutograd")
def _low_rank_plus_matmul(low: Tensor, up: Tensor, x: Tensor, w: Tensor) -> Tensor:
    """``low @ up + x @ w``: the rank-r product written first, the full one added to it in place. Called inside
    this module's autograd functions, under no_grad: it has no gradient formula of its own."""
    return (low @ up).addmm_(x, w)


@torch.library.register_fake("lightning_qlora::low_rank_plus_matmul")
def _(low, up, x, w):
    torch._check(low.shape[1] == up.shape[0] and x.shape[1] == w.shape[0])
    torch._check(low.shape[0] == x.shape[0] and up.shape[1] == w.shape[1])
    return low.new_empty(low.shape[0], up.shape[1])


low_rank_plus_matmul = torch.ops.lightning_qlora.low_rank_plus_matmul.default


class _PackedLinearWithLoRA(torch.autograd.Function):
    """:class:`_FrozenLinearWithLoRA` for torch.compile, which traces it: the 4-bit weight comes as its packed
    tensors and is dequantized by :func:`~lightning_qlora.nf4_matmul.dequantize_traced` (plain torch ops, fused by
    compile into one kernel), in the forward and again in the backward; of the weight, only the packed bytes are
    saved (with the adapter's input, its rank-r projection and A, B).

    The same sums as the eager function, added in place by :data:`low_rank_plus_matmul`; the adapter's scale
    is folded into ``B`` in the compute dtype (exact for a power-of-two scale, as the default ``alpha / r = 2``).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        xd: Tensor | None,
        a: Tensor,
        b: Tensor,
        s: float,
        spec: tuple,
        table: Tensor,
        *packed: Tensor,
    ):
        x2, _, _, b16, xa = _adapter_inputs(x, xd, a, b)
        w = dequantize_traced(spec, table, packed).to(x.dtype)
        out = low_rank_plus_matmul(xa, (b16 * s).t(), x2, w.t())
        # The inputs themselves, not views of them made here: compile traces this function.
        ctx.save_for_backward(x if xd is None else xd, xa, a, b, table, *packed)
        ctx.scaling, ctx.spec, ctx.same_input = s, spec, xd is None
        ctx.x_shape, ctx.xd_shape = x.shape, None if xd is None else xd.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor):
        xd, xa, a, b, table, *packed = ctx.saved_tensors
        s = ctx.scaling
        g2 = grad.reshape(-1, grad.shape[-1])
        xd2 = xd.reshape(-1, xd.shape[-1])
        a16 = a.to(g2.dtype)
        grad_xa = g2 @ (b.to(g2.dtype) * s)
        grad_a = (grad_xa.t() @ xd2).to(a.dtype)
        grad_b = (g2.t() @ (xa * s)).to(b.dtype)
        w = dequantize_traced(ctx.spec, table, packed, backward=True).to(g2.dtype)
        grad_x, grad_xd = _input_grads(
            g2, w, grad_xa, a16, ctx.same_input, ctx.x_shape, ctx.xd_shape, traced=True
        )
        return grad_x, grad_xd, grad_a, grad_b, None, None, None, *([None] * len(packed))


def _route_base_keys(state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
    """Lets a plain checkpoint (``q_proj.weight``) load into an adapted layer (``q_proj.base_layer.weight``)."""
    for name in ("weight", "bias"):
        if prefix + name in state_dict and prefix + "base_layer." + name not in state_dict:
            state_dict[prefix + "base_layer." + name] = state_dict.pop(prefix + name)


def _device_of(module: nn.Module) -> torch.device:
    device = next((t.device for t in module.parameters()), torch.device("cpu"))
    if device.type == "meta":  # a base waiting for quantize-on-load: adapters go where it will live
        device = getattr(module, "target_device", device)
    return device


def _is_excluded(name: str, exclude: Sequence[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in exclude)


def find_targets(model: nn.Module, config: LoRAConfig, head_names: Sequence[str] = ("lm_head",)) -> list[str]:
    """Qualified names of the linear layers that ``config.target_modules`` selects.

    Raises:
        ValueError: the model has no linear layers, or the selection matches none of them.
    """
    linears = [name for name, _ in named_linears(model)]
    if not linears:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear layers: QLoRA adapts linear layers, so there is nothing to "
            "quantize or adapt"
        )
    target = config.target_modules
    if target == "all-linear":
        chosen = [n for n in linears if not _is_excluded(n, head_names)]
    elif isinstance(target, str):
        try:
            pattern = re.compile(target)
        except re.error as err:
            raise ValueError(
                f"lora.target_modules={target!r} is not a valid regular expression: {err}"
            ) from None
        chosen = [n for n in linears if pattern.fullmatch(n)]
    else:
        chosen = [n for n in linears if _is_excluded(n, target)]
    chosen = [n for n in chosen if not _is_excluded(n, config.exclude_modules)]
    if not chosen:
        sample = sorted({n.rsplit(".", 1)[-1] for n in linears})[:12]
        raise ValueError(
            f"lora.target_modules={target!r} matches no linear layer of {type(model).__name__}. "
            f"Its linear layers are named like {sample}; use 'all-linear', some of those names, or a regex "
            "over full names"
        )
    return chosen


def inject_lora(model: nn.Module, config: LoRAConfig, targets: Sequence[str]) -> None:
    """Wraps each named linear layer of ``model`` in a :class:`LoRALinear`, in place."""
    for name in targets:
        parent, attr = parent_module(model, name)
        setattr(parent, attr, LoRALinear(getattr(parent, attr), config))


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


ADAPTER_PARTS = ("lora_A", "lora_B")


def is_adapter_key(name: str) -> bool:
    """True for a parameter or state-dict key of an adapter (``...q_proj.lora_A.weight``)."""
    return any(f".{part}." in f".{name}" for part in ADAPTER_PARTS)
