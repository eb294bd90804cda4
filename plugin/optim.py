"""The optimizer over the adapters and its learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

OPTIMIZERS = ("adamw", "adam", "sgd", "paged_adamw8bit")
SCHEDULERS = ("cosine", "linear", "constant")


@dataclass
class OptimizerConfig:
    """The optimizer and schedule. Also the Hydra schema of the ``optimizer`` group.

    Args:
        name: ``adamw`` | ``adam`` | ``sgd`` (momentum ``betas[0]``) | ``paged_adamw8bit`` (bitsandbytes).
        lr: peak learning rate.
        weight_decay: decoupled for AdamW, L2 otherwise.
        betas: Adam's betas.
        eps: Adam's epsilon.
        scheduler: ``cosine`` | ``linear`` decay after warmup, or ``constant``.
        warmup_steps: linear warmup steps; when 0, ``warmup_ratio`` of the total steps.
        warmup_ratio: warmup as a fraction of the total steps.
        min_lr_ratio: the decay ends at ``min_lr_ratio * lr``.
    """

    name: str = "adamw"
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: str = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        self.name = str(self.name).lower()
        self.scheduler = str(self.scheduler).lower()
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer.name={self.name!r} is not supported; use one of {OPTIMIZERS}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(
                f"optimizer.scheduler={self.scheduler!r} is not supported; use one of {SCHEDULERS}"
            )
        # Each is refused here, before a run starts: lr <= 0 made Lightning fail mid-setup, and a
        # non-finite value trains NaN from the first step.
        if not _finite(self.lr) or self.lr <= 0:
            raise ValueError(f"optimizer.lr={self.lr!r} must be a positive number (QLoRA uses 1e-4 to 2e-4)")
        if not _finite(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"optimizer.weight_decay={self.weight_decay!r} must be >= 0 (0 turns it off)")
        if len(self.betas) != 2 or not all(_finite(b) and 0 <= b < 1 for b in self.betas):
            raise ValueError(
                f"optimizer.betas={list(self.betas)!r} must be two numbers in [0, 1), e.g. [0.9, 0.999]"
            )
        if not _finite(self.eps) or self.eps <= 0:
            raise ValueError(f"optimizer.eps={self.eps!r} must be a small positive number, e.g. 1e-8")
        if isinstance(self.warmup_steps, bool) or self.warmup_steps < 0:
            raise ValueError(f"optimizer.warmup_steps={self.warmup_steps!r} must be >= 0")
        if not _finite(self.warmup_ratio) or not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"optimizer.warmup_ratio={self.warmup_ratio!r} must be in [0, 1)")
        if not _finite(self.min_lr_ratio) or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optimizer.min_lr_ratio={self.min_lr_ratio!r} must be in [0, 1]")
        self.betas = [float(b) for b in self.betas]


def _finite(value: Any) -> bool:
    """A real number (not bool) that is neither NaN nor infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def build_optimizer(params: Iterable[Tensor], config: OptimizerConfig) -> torch.optim.Optimizer:
    """The optimizer ``config.name`` names, over ``params``."""
    c = config
    betas = (c.betas[0], c.betas[1])
    if c.name == "adamw":
        return torch.optim.AdamW(params, lr=c.lr, betas=betas, eps=c.eps, weight_decay=c.weight_decay)
    if c.name == "adam":
        return torch.optim.Adam(params, lr=c.lr, betas=betas, eps=c.eps, weight_decay=c.weight_decay)
    if c.name == "sgd":
        return torch.optim.SGD(params, lr=c.lr, momentum=betas[0], weight_decay=c.weight_decay)
    import bitsandbytes as bnb  # paged_adamw8bit: __post_init__ admits nothing else

    return bnb.optim.PagedAdamW8bit(params, lr=c.lr, betas=betas, eps=c.eps, weight_decay=c.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimizerConfig, total_steps: int) -> Any:
    """Linear warmup, then cosine or linear decay to ``min_lr_ratio * lr`` (or constant); ``None`` if flat."""
    name = config.scheduler
    total = max(int(total_steps), 1) if 0 < total_steps < float("inf") else 1
    warmup = int(config.warmup_steps or 0) or int(float(config.warmup_ratio or 0.0) * total)
    floor = float(config.min_lr_ratio)
    if name == "constant" and warmup == 0:
        return None

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if name == "constant":
            return 1.0
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if name == "cosine" else 1 - progress
        return floor + (1 - floor) * decay

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
