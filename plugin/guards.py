"""``NonFiniteGuard``: a NaN or inf in the loss, the gradients or the adapters stops the run (or skips a batch).

Without it a diverged run trains on: Lightning logs ``nan``, checkpoints the NaN adapters and saves
them as the final adapter, and the process exits 0. The guard checks every optimizer step, keeps a
copy of the last adapter weights that gave a finite loss, and on a non-finite value either

- ``stop`` (default): puts that copy back into the model and raises :class:`NonFiniteError`, whose
  message names the step, the batch and the likely cause; the caller saves the restored adapter as the
  final one (the application does, and exits with code 3); or
- ``skip``: drops that step's update (its gradients) and goes on, until ``max_skipped`` updates were
  dropped, then stops as above.

It also warns once when the adapters' gradient is exactly zero for ``zero_grad_warn_steps`` steps in a
row: a run that learns nothing (e.g. a learning rate so high that the outputs saturate) looks healthy
otherwise.

Cost: one copy of the trainable weights (the adapters: megabytes) on their device, refreshed each
optimizer step, and one host sync per step. Every decision is taken on all-reduced gradients (and,
under DDP, on a reduced flag for the local losses), so all ranks stop together.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.distributed.tensor import DTensor

from .messages import say
from .sharding import is_sharded

HIGH_LR = 1e-2  # above this an adapter learning rate is the likely cause of a divergence (QLoRA: 1e-4..2e-4)


class NonFiniteError(RuntimeError):
    """Training stopped on a non-finite loss, gradient or adapter weight.

    Attributes:
        step: the optimizer step (``trainer.global_step``) where it was found.
        good_step: how many updates the restored (last good) adapter has had.
    """

    def __init__(self, message: str, step: int, good_step: int) -> None:
        super().__init__(message)
        self.step = step
        self.good_step = good_step


class NonFiniteGuard(Callback):
    """Stops (or skips) on a non-finite loss, gradient or adapter weight; keeps the last good adapter.

    Args:
        policy: ``"stop"`` or ``"skip"``.
        max_skipped: with ``skip``: updates that may be dropped in a run before it stops.
        zero_grad_warn_steps: warn once after this many consecutive steps with an all-zero adapter
            gradient (0: never).
    """

    def __init__(self, policy: str = "stop", max_skipped: int = 10, zero_grad_warn_steps: int = 10) -> None:
        if policy not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite={policy!r} is not a policy; use 'stop' or 'skip'")
        self.policy = policy
        self.max_skipped = int(max_skipped)
        self.zero_grad_warn_steps = int(zero_grad_warn_steps)
        self.skipped: list[int] = []  # the steps whose update was dropped
        self.warned_zero_grad = False
        self._params: list[Tensor] = []
        self._good: list[Tensor] | None = None
        self._good_step = 0
        self._zero_steps = 0
        self._bad_loss: tuple[float, int, int] | None = None  # (loss, batch_idx, epoch) of the first bad one
        self._batch = (0, 0)  # (batch_idx, epoch) of the batch in flight
        self._stepped = False

    # ------------------------------------------------------------------------------------- hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._params = [p for p in pl_module.parameters() if p.requires_grad]
        self._good_step = trainer.global_step  # a resumed run's weights are the checkpoint's: good so far

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch = (batch_idx, trainer.current_epoch)

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        # Only recorded here: under DDP each rank sees its own loss, and stopping on one rank alone
        # would hang the others. The decision waits for the step, where it is reduced.
        if self._bad_loss is None and not bool(torch.isfinite(loss.detach()).all()):
            self._bad_loss = (float(loss.detach().float().mean()), *self._batch)

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        grads = [p.grad for p in self._params if p.grad is not None]
        grad_max = _abs_max(grads)  # NaN if any gradient is NaN; inf if any is inf
        bad = self._bad_loss is not None or not math.isfinite(grad_max)
        if trainer.world_size > 1:  # gradients are all-reduced already; the local losses are not
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        step = trainer.global_step
        if bad:
            what = self._describe(grad_max, trainer)
            self._bad_loss = None
            if self.policy == "skip" and len(self.skipped) < self.max_skipped:
                self.skipped.append(step)
                for p in self._params:  # no gradient: the optimizer leaves the weights (and its state) alone
                    p.grad = None
                say(
                    f"warning: skipped the update of step {step}: {what} ({len(self.skipped)} of "
                    f"callbacks.max_skipped_batches={self.max_skipped} skipped)"
                )
                return
            self._stop(step, what)
        self._check_zero_grad(grad_max, step)
        self._remember_good(step)
        self._stepped = True

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # After the update: a finite gradient times a huge learning rate can still overflow a weight.
        # This runs before ModelCheckpoint's hook (Lightning runs checkpoint callbacks last), so such
        # weights never reach a checkpoint.
        if not self._stepped:
            return
        self._stepped = False
        weight_max = _abs_max(self._params)
        bad = not math.isfinite(weight_max)
        if is_sharded(pl_module):  # each rank sees its shard of the weights: the ranks decide together
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            step = trainer.global_step - 1
            what = f"the update of step {step} made the adapter weights non-finite ({weight_max})"
            self._stop(step, what + self._cause(trainer, before_update=False))

    # ----------------------------------------------------------------------------------- helpers
    def _remember_good(self, step: int) -> None:
        """Copies the weights that just gave a finite loss and gradient (before this step's update)."""
        with torch.no_grad():
            if self._good is None:
                self._good = [p.detach().clone() for p in _local(self._params)]
            else:
                torch._foreach_copy_(self._good, [p.detach() for p in _local(self._params)])
        self._good_step = step

    def _restore_good(self) -> None:
        if self._good is not None:
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in _local(self._params)], self._good)

    def _stop(self, step: int, what: str) -> None:
        """Puts the last good weights back (if this run has any yet) and raises :class:`NonFiniteError`."""
        self._restore_good()
        good = self._good_step if self._good is not None else step
        skipped = f"; {len(self.skipped)} updates were skipped before it" if self.skipped else ""
        raise NonFiniteError(
            f"training stopped at step {step}: {what}{skipped}. The adapter kept as the final one is the last "
            f"good one (after {good} updates)",
            step=step,
            good_step=good,
        )

    def _describe(self, grad_max: float, trainer: L.Trainer) -> str:
        step = trainer.global_step
        if self._bad_loss is not None:
            loss, batch_idx, epoch = self._bad_loss
            what = f"the loss is {loss} on batch {batch_idx} of epoch {epoch}"
        else:
            batch_idx, epoch = self._batch
            what = f"the adapter gradient is non-finite ({grad_max}) on batch {batch_idx} of epoch {epoch}"
        return what + self._cause(trainer, before_update=step == 0)

    @staticmethod
    def _cause(trainer: L.Trainer, before_update: bool) -> str:
        """The likely cause, from what the run knows: the compute dtype, the learning rate, the step."""
        dtype = getattr(trainer.precision_plugin, "dtype", None)
        lr = _current_lr(trainer)
        lr_text = f"optimizer.lr is {lr:g} at this step" if lr is not None else "the learning rate"
        if dtype == torch.float16:
            return (
                "; likely an fp16 overflow (compute dtype float16): set quant.compute_dtype=bfloat16 or "
                f"float32, or lower the learning rate ({lr_text})"
            )
        if before_update:  # the initial weights: the adapters add nothing yet, the base is as loaded
            return (
                "; before any update, so not the learning rate: likely the data (that batch) or the base "
                "model's weights"
            )
        if lr is not None and lr >= HIGH_LR:
            return f"; likely the learning rate ({lr_text}): lower it (QLoRA uses 1e-4 to 2e-4)"
        return (
            f"; likely the data (that batch) or the learning rate ({lr_text}): check the batch, lower the "
            "learning rate or set trainer.gradient_clip_val; callbacks.on_nonfinite=skip skips such batches"
        )

    def _check_zero_grad(self, grad_max: float, step: int) -> None:
        if self.zero_grad_warn_steps <= 0 or self.warned_zero_grad:
            return
        self._zero_steps = self._zero_steps + 1 if grad_max == 0.0 else 0
        if self._zero_steps >= self.zero_grad_warn_steps:
            self.warned_zero_grad = True
            first = step - self._zero_steps + 1
            say(
                f"warning: the adapter gradient has been exactly zero for {self._zero_steps} steps (since step "
                f"{first}): the run learns nothing; a learning rate far too high (saturated outputs) or "
                "targets that are all masked are the usual causes"
            )


def _abs_max(tensors: list[Tensor]) -> float:
    """The largest absolute value over ``tensors`` in one host sync: NaN if any is NaN, 0.0 if none."""
    if not tensors:
        return 0.0
    with torch.no_grad():
        # The inf-norm is the largest |value|, fused over all tensors; it propagates NaN, and so does amax.
        maxima = torch._foreach_norm([t.detach() for t in _local(tensors)], float("inf"))
        return float(torch.stack([m.float() for m in maxima]).amax())


def _local(tensors: list[Tensor]) -> list[Tensor]:
    """This rank's part of each tensor: a sharded (FSDP2) DTensor's local shard, which shares its storage."""
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def _current_lr(trainer: L.Trainer) -> float | None:
    try:
        return float(trainer.optimizers[0].param_groups[0]["lr"])
    except (IndexError, KeyError, AttributeError, TypeError):
        return None
