"""Callbacks for any Lightning Trainer: memory + throughput, adapter gradient norm, run info and summary.

They log through ``pl_module.log`` (so they share the step's logger row and Lightning's
``log_every_n_steps``) or ``logger.log_hyperparams``, hence work with every Lightning logger;
W&B gets the end-of-run summary in ``run.summary`` as well. ``AdapterCheckpoint`` writes the
adapters in PEFT's format whenever the Trainer checkpoints.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

from .adapters import save_adapter
from .atomic import recover_directories
from .host_memory import host_peak_rss, host_rss
from .sharding import gathered_adapters, is_sharded

GIB = 1024**3


def _count_tokens(batch: Any) -> tuple[int, int]:
    """(tokens, samples) of a batch: non-padding tokens from ``attention_mask``, else ``input_ids``."""
    if isinstance(batch, Mapping):
        mask, ids = batch.get("attention_mask"), batch.get("input_ids")
        ref = mask if isinstance(mask, torch.Tensor) else ids
        if isinstance(ref, torch.Tensor):
            tokens = int(mask.sum()) if ref is mask else ref.numel()
            return tokens, int(ref.shape[0]) if ref.dim() > 1 else 1
    if isinstance(batch, torch.Tensor):
        return batch.numel(), int(batch.shape[0]) if batch.dim() > 0 else 1
    if isinstance(batch, Sequence) and batch and isinstance(batch[0], torch.Tensor):
        return _count_tokens(batch[0])
    return 0, 0


def _logged_steps(trainer: L.Trainer) -> int:
    """The step count Lightning's ``log_every_n_steps`` is checked against at ``on_train_batch_end``."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    return int(getattr(loop, "_batches_that_stepped", trainer.global_step)) + 1


class MemoryMonitor(Callback):
    """Logs memory and throughput every ``log_every_n_steps`` training batches.

    Keys: ``mem/gpu_allocated_gib``, ``mem/gpu_reserved_gib``, ``mem/gpu_peak_gib`` (CUDA only),
    ``mem/host_rss_gib``, ``mem/host_peak_rss_gib``, ``perf/tokens_per_s`` (also on the progress bar),
    ``perf/samples_per_s``, ``perf/step_time_s``, and once warm-up is over ``perf/warmup_s`` and
    ``perf/time_to_first_step_s``. Throughput counts the time from batch start to batch end (forward,
    backward, optimizer step), not data loading or validation, and leaves out the first
    ``warmup_steps`` batches (quantization on first use, ``torch.compile``, allocator growth): their
    time is reported on its own as the warm-up, so tokens/s is the steady state.

    Args:
        log_every_n_steps: logging interval in training batches.
        prog_bar: show tokens/s on the progress bar.
        warmup_steps: batches counted as warm-up (at least 1).
    """

    def __init__(self, log_every_n_steps: int = 10, prog_bar: bool = True, warmup_steps: int = 3) -> None:
        self.log_every_n_steps = max(int(log_every_n_steps), 1)
        self.prog_bar = prog_bar
        self.warmup_steps = max(int(warmup_steps), 1)
        self._reset_window()
        self.steady_tokens = self.steady_samples = 0
        self.steady_time = 0.0
        self.all_tokens = 0
        self.all_time = 0.0
        self.warmup_time = 0.0
        self.time_to_first_step: float | None = None
        self.peak_gpu_bytes = 0
        self.peak_rss_bytes = 0
        self._batches = 0
        self._t0: float | None = None
        self._t_fit: float | None = None

    def _reset_window(self) -> None:
        self._w_tokens = self._w_samples = self._w_batches = 0
        self._w_time = 0.0

    @staticmethod
    def _cuda(pl_module: L.LightningModule) -> torch.device | None:
        device = pl_module.device
        return device if device.type == "cuda" and torch.cuda.is_available() else None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t_fit = time.perf_counter()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        cuda = self._cuda(pl_module)
        if cuda is not None:
            torch.cuda.synchronize(cuda)  # the step's kernels are async; time them, not their launch
        now = time.perf_counter()
        elapsed = now - (self._t0 or now)
        tokens, samples = _count_tokens(batch)
        self._batches += 1
        self.all_tokens += tokens
        self.all_time += elapsed
        metrics: dict[str, float] = {}
        if self._batches == 1:
            self.time_to_first_step = now - (self._t_fit or self._t0 or now)
        if self._batches <= self.warmup_steps:
            self.warmup_time += elapsed
            if self._batches == self.warmup_steps:
                metrics["perf/warmup_s"] = self.warmup_time
                metrics["perf/time_to_first_step_s"] = float(self.time_to_first_step or 0.0)
        else:
            self.steady_tokens += tokens
            self.steady_samples += samples
            self.steady_time += elapsed
            self._w_tokens += tokens
            self._w_samples += samples
            self._w_batches += 1
            self._w_time += elapsed
        log_now = not _logged_steps(trainer) % self.log_every_n_steps
        if not log_now and not metrics:
            return
        if log_now:
            metrics.update(self.memory_metrics(cuda))
            if self._w_time > 0:
                metrics["perf/tokens_per_s"] = self._w_tokens / self._w_time
                metrics["perf/samples_per_s"] = self._w_samples / self._w_time
                metrics["perf/step_time_s"] = self._w_time / self._w_batches
            self._reset_window()
        for key, value in metrics.items():
            pl_module.log(
                key,
                float(value),
                on_step=True,
                on_epoch=False,
                prog_bar=self.prog_bar and key == "perf/tokens_per_s",
            )

    def memory_metrics(self, cuda: torch.device | None = None) -> dict[str, float]:
        """Current memory in GiB; GPU keys only where CUDA is in use."""
        rss, peak_rss = host_rss(), host_peak_rss()
        self.peak_rss_bytes = max(self.peak_rss_bytes, rss, peak_rss)
        metrics = {"mem/host_rss_gib": rss / GIB, "mem/host_peak_rss_gib": self.peak_rss_bytes / GIB}
        if cuda is not None:
            peak = torch.cuda.max_memory_allocated(cuda)
            self.peak_gpu_bytes = max(self.peak_gpu_bytes, peak)
            metrics["mem/gpu_allocated_gib"] = torch.cuda.memory_allocated(cuda) / GIB
            metrics["mem/gpu_reserved_gib"] = torch.cuda.memory_reserved(cuda) / GIB
            metrics["mem/gpu_peak_gib"] = peak / GIB
        return metrics

    @property
    def mean_tokens_per_s(self) -> float:
        """Steady-state tokens/s: the batches after warm-up (all batches if the run had no other)."""
        if self.steady_time > 0:
            return self.steady_tokens / self.steady_time
        return self.all_tokens / self.all_time if self.all_time > 0 else 0.0

    @property
    def total_tokens(self) -> int:
        return self.all_tokens


class GradNormMonitor(Callback):
    """Logs ``train/grad_norm`` (L2 norm over trainable parameters, i.e. the adapters) and ``train/lr`` each step.

    The norm is taken before gradient clipping, so it shows what clipping acts on.
    """

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        grads = [p.grad.detach() for p in pl_module.parameters() if p.requires_grad and p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            pl_module.log("train/grad_norm", norm, on_step=True, on_epoch=False)
        pl_module.log("train/lr", float(optimizer.param_groups[0]["lr"]), on_step=True, on_epoch=False)


def parameter_counts(module: torch.nn.Module) -> dict[str, int]:
    """Parameters by kind: ``total`` (4-bit weights counted as the weights they encode), ``trainable``, ``4bit``."""
    from .nf4 import Linear4bit

    # By layer, not by parameter type: under FSDP2 a 4-bit weight is a sharded tensor, not a Params4bit.
    packed = {
        id(m.weight): m.out_features * m.in_features for m in module.modules() if isinstance(m, Linear4bit)
    }
    total = trainable = four_bit = 0
    seen: set[int] = set()
    for param in module.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        n = packed.get(id(param), param.numel())
        four_bit += n if id(param) in packed else 0
        total += n
        trainable += n if param.requires_grad else 0
    return {"total": total, "trainable": trainable, "4bit": four_bit}


class RunSummary(Callback):
    """Logs run info once at the start and a summary at the end.

    At train start: ``config`` (e.g. the resolved Hydra config), the QLoRA plugin's settings, the
    model's name, parameter counts and bytes of weights by storage dtype, through
    ``logger.log_hyperparams``. At the end: final train/val loss, peak GPU memory, peak host RSS,
    steady-state tokens/s and the warm-up's time (and the time to the first step) in :attr:`summary`,
    written to W&B's ``run.summary`` when the logger is W&B. With an
    :class:`~lightning_qlora.data.InstructDataModule` the summary also holds what ``data.max_length``
    cost: ``data/dropped_rows``, ``data/truncated_rows``, ``data/lost_tokens``.

    Args:
        config: extra hyperparameters to log (nested dicts allowed).
        model_name: the model's name; ``pl_module.model_name`` if it has one.
    """

    def __init__(self, config: Mapping[str, Any] | None = None, model_name: str | None = None) -> None:
        self.config = dict(config or {})
        self.model_name = model_name
        self.run_info: dict[str, Any] = {}
        self.summary: dict[str, Any] = {}
        self.val_losses: list[float] = []  # the sanity check's (if it ran the whole split) first
        self._t_start = time.perf_counter()

    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Only a full pass (num_sanity_val_steps=-1) gives a comparable loss before training.
        if trainer.num_sanity_val_steps in (-1, float("inf")) and "val/loss" in trainer.callback_metrics:
            self.val_losses.append(float(trainer.callback_metrics["val/loss"]))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and "val/loss" in trainer.callback_metrics:
            self.val_losses.append(float(trainer.callback_metrics["val/loss"]))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from .nf4 import weight_bytes_by_dtype

        self._t_start = time.perf_counter()
        plugin = trainer.precision_plugin
        counts = parameter_counts(pl_module)
        self.run_info = {
            "model_name": self.model_name or getattr(pl_module, "model_name", type(pl_module).__name__),
            "params": counts,
            "weight_bytes": weight_bytes_by_dtype(pl_module),
            "precision_plugin": plugin.state_dict()
            if hasattr(plugin, "lora")
            else str(type(plugin).__name__),
        }
        params = {**self.config, "run_info": self.run_info}
        for logger in trainer.loggers:
            try:
                logger.log_hyperparams(params)
            except Exception as err:  # tracking must never stop training
                _warn_once(f"could not log the run config to {type(logger).__name__}: {err}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        monitor = next((c for c in trainer.callbacks if isinstance(c, MemoryMonitor)), None)
        summary: dict[str, Any] = {"global_step": trainer.global_step}
        for key in ("train/loss", "val/loss"):
            if key in metrics:
                summary[f"final_{key.replace('/', '_')}"] = float(metrics[key])
        if self.val_losses:
            summary["first_val_loss"] = self.val_losses[0]
        summary["train_time_s"] = time.perf_counter() - self._t_start
        if monitor is not None:
            cuda = monitor._cuda(pl_module)
            monitor.memory_metrics(cuda)
            summary["mean_tokens_per_s"] = monitor.mean_tokens_per_s  # steady state, after warm-up
            summary["warmup_s"] = monitor.warmup_time
            summary["warmup_steps"] = min(monitor.warmup_steps, monitor._batches)
            summary["time_to_first_step_s"] = monitor.time_to_first_step
            summary["total_tokens"] = monitor.total_tokens
            summary["peak_host_rss_gib"] = monitor.peak_rss_bytes / GIB
            if cuda is not None:
                summary["peak_gpu_mem_gib"] = monitor.peak_gpu_bytes / GIB
        else:
            summary["peak_host_rss_gib"] = host_peak_rss() / GIB
            if pl_module.device.type == "cuda":
                summary["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / GIB
        if self.run_info:
            summary["params_trainable"] = self.run_info["params"]["trainable"]
            summary["params_total"] = self.run_info["params"]["total"]
        # What data.max_length / data.on_overlong cost (InstructDataModule.stats), so it is on record
        stats = getattr(getattr(trainer, "datamodule", None), "stats", None)
        if isinstance(stats, Mapping) and "lost_tokens" in stats:
            summary["data/dropped_rows"] = int(stats.get("dropped", 0))
            summary["data/truncated_rows"] = int(stats.get("truncated", 0))
            summary["data/lost_tokens"] = int(stats["lost_tokens"])
        self.summary = summary
        update_wandb_summary(trainer, summary)


def update_wandb_summary(trainer: L.Trainer, values: Mapping[str, Any]) -> None:
    """Writes ``values`` into the W&B run's summary, if a W&B logger is attached; never raises."""
    from lightning.pytorch.loggers import WandbLogger

    if not trainer.is_global_zero:  # only rank 0 has the W&B run
        return
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            try:
                logger.experiment.summary.update(dict(values))
            except Exception as err:
                _warn_once(f"could not write the W&B summary: {err}")


class SampleGeneration(Callback):
    """Generates greedy samples for a few prompts before and after training (kept in ``before``/``after``).

    Args:
        tokenizer: the model's tokenizer.
        prompts: full prompt strings (already formatted for the model).
        max_new_tokens: tokens generated per prompt.
    """

    def __init__(self, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 32) -> None:
        self.tokenizer = tokenizer
        self.prompts = list(prompts)
        self.max_new_tokens = max_new_tokens
        self.before: list[str] = []
        self.after: list[str] = []

    def _generate(self, pl_module: L.LightningModule) -> list[str]:
        from .generate import generate

        model = getattr(pl_module, "model", None) or pl_module
        was_training = model.training
        try:
            return generate(
                model, self.tokenizer, self.prompts, max_new_tokens=self.max_new_tokens, greedy=True
            )
        except Exception as err:  # a sample is a nicety; never lose a run to it
            _warn_once(f"sample generation failed: {err}")
            return []
        finally:
            model.train(was_training)

    def _runs_here(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        # Under FSDP every forward gathers weights from all ranks: every rank generates, in step with the
        # others until all are done (generate turns synced_gpus on); rank zero's samples are reported.
        return bool(self.prompts) and (trainer.is_global_zero or is_sharded(pl_module))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._runs_here(trainer, pl_module):
            self.before = self._generate(pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._runs_here(trainer, pl_module):
            self.after = self._generate(pl_module)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        print(f"lightning-qlora: warning: {message}", file=sys.stderr)


class AdapterCheckpoint(Callback):
    """Writes the adapter in PEFT's format at each checkpoint and at the end.

    ``<dirpath>/step-<N>`` is written whenever the Trainer saves a checkpoint, and ``<dirpath>/final``
    when fitting ends; each loads with ``peft.PeftModel.from_pretrained`` and
    :func:`~lightning_qlora.adapters.load_adapter`. Rank zero writes; under FSDP every rank
    first gathers its adapter shards (:func:`~lightning_qlora.sharding.gathered_adapters`).

    Each directory is written whole or not at all (:func:`~lightning_qlora.adapters.save_adapter`): a
    kill mid-save leaves only a hidden ``.<name>.tmp-*`` sibling, which the next fit removes at its start
    (restoring a previous copy of the directory if the kill came while it was being replaced). So every
    visible ``step-<N>``/``final`` directory is complete.

    Args:
        dirpath: where the adapters go; default ``<trainer.log_dir or default_root_dir>/adapters``.
        base_model_name_or_path: recorded in ``adapter_config.json`` (default: the model's own).
    """

    def __init__(self, dirpath: str | os.PathLike | None = None, base_model_name_or_path: str | None = None):
        self.dirpath = dirpath
        self.base_model_name_or_path = base_model_name_or_path

    def _root(self, trainer: L.Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir) / "adapters"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.is_global_zero:
            recover_directories(self._root(trainer))

    def _save(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str) -> None:
        plugin = trainer.precision_plugin
        with gathered_adapters(pl_module):  # every rank gathers FSDP's shards; rank zero writes
            if trainer.is_global_zero:
                save_adapter(
                    pl_module,
                    self._root(trainer) / name,
                    self.base_model_name_or_path,
                    plugin if hasattr(plugin, "lora") else None,
                )

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._save(trainer, pl_module, f"step-{trainer.global_step}")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer, pl_module, "final")


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm progress bar, counting optimizer steps over the whole run when it is step-bounded.

    With ``max_steps`` set, the training bar reads ``step 40/400`` for the whole run, starting at the
    step a resumed run starts from, with the epoch in its postfix. (Lightning's own bars count batches
    of the current epoch against a total that shrinks near ``max_steps``, so a resumed run read
    ``40/20``, and the rich bar labels an unbounded run ``Epoch 4/-2``.) Without ``max_steps`` it is
    Lightning's per-epoch bar, labelled ``epoch 3/10`` (1-based; no total when ``max_epochs`` is -1).
    Validation bars are Lightning's.

    Args:
        refresh_rate: update the bar every this many batches (Lightning's ``TQDMProgressBar``).
        process_position: the bar's line, for several bars at once.
    """

    STEP_FORMAT = "step {n_fmt}/{total_fmt} {bar} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"

    def __init__(self, refresh_rate: int = 1, process_position: int = 0) -> None:
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=False)

    @staticmethod
    def _step_bounded(trainer: L.Trainer) -> bool:
        return trainer.max_steps is not None and trainer.max_steps > 0

    def _show_step(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        bar = self.train_progress_bar
        if bar.disable:
            return
        bar.n = min(trainer.global_step, trainer.max_steps)
        bar.set_postfix(
            {**self.get_metrics(trainer, pl_module), "epoch": trainer.current_epoch}, refresh=False
        )
        bar.refresh()

    def init_train_tqdm(self) -> Tqdm:
        trainer = self.trainer
        if not self._step_bounded(trainer):
            return super().init_train_tqdm()
        return Tqdm(
            total=trainer.max_steps,
            initial=trainer.global_step,  # a resumed run starts there, and its rate counts its own steps
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            bar_format=self.STEP_FORMAT,
        )

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self._step_bounded(trainer):
            return  # one bar over the whole run
        epochs = trainer.max_epochs
        label = f"epoch {trainer.current_epoch + 1}" + (
            f"/{epochs}" if epochs is not None and epochs > 0 else ""
        )
        bar = self.train_progress_bar
        bar.set_description(label, refresh=False)
        total = self.total_train_batches
        bar.reset(total=None if total == float("inf") else total)
        bar.initial = 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._step_bounded(trainer):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        elif self._should_update(trainer.global_step, trainer.max_steps):
            self._show_step(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._step_bounded(trainer):
            super().on_train_epoch_end(trainer, pl_module)
        else:
            self._show_step(trainer, pl_module)
