"""``lightning-qlora-estimate``: will a run fit its GPU? The memory a recipe needs per GPU, before loading anything.

    lightning-qlora-estimate --config-name llama2_7b_alpaca data.batch_size=2 --gpu-gib 24
    lightning-qlora-estimate --config-name llama3_8b_alpaca data.max_length=4096 --devices 4 --strategy fsdp

It composes the recipe and overrides exactly as ``lightning-qlora`` does, reads the model's config.json
(a local directory, the hub cache or the hub; a model built from ``model.from_config``; a 4-bit
checkpoint), builds the model on the meta device and converts it with the run's plugin (no weights,
no memory), and prints :mod:`lightning_qlora.memory`'s estimate of the peak
``torch.cuda.max_memory_allocated`` per GPU, part by part; whether it fits a GPU of ``--gpu-gib``
(what is left after the CUDA context, which torch does not count); and the largest ``data.batch_size``
and ``data.max_length`` that fit. Exit code 0 when it fits, 2 when it does not, with one line saying what
to change.

The pre-flight (or any caller holding a composed config) uses :func:`will_fit` and :func:`fit_table`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from .hf_config import meta_model, read_hf_config
from .memory import (
    ACTIVATIONS,
    ADAPTERS,
    CONSTANTS,
    DENSE,
    FSDP_GATHERED_LAYERS,
    GATHERED,
    GIB,
    LINEAR16,
    PACKED,
    SLACK,
    STRATEGIES,
    TRANSIENT,
    Estimate,
    Shapes,
    Weights,
    candidates,
    choose_checkpointing,
    count_weights,
    estimate,
)
from .messages import EXIT_USAGE, fail, one_line

PROG = "lightning-qlora-estimate"
# What the CUDA context and kernel images take on a GPU outside torch's own count (measured on H100/H200
# with CUDA 12's lazy module loading: 0.4-0.6 GiB); the estimate must fit in what is left.
CUDA_CONTEXT_GIB = 0.5
# The searches for the largest batch and sequence length stop here (a tiny model fits any batch).
MAX_BATCH = 1 << 16
MAX_SEQ = 1 << 20
# fp32 tensors each optimizer keeps per adapter weight (``optimizer.name``); SGD keeps its momentum only
# when it has one. Paged 8-bit AdamW keeps two uint8 states (counted as resident, though pages may move
# to the host).
OPTIMIZER_STATES = {"adamw": 2.0, "adam": 2.0, "sgd": 1.0, "paged_adamw8bit": 0.5}


@dataclass
class Setup:
    """A run's memory-relevant settings, estimated at any batch shape.

    Attributes:
        shapes: the model's shapes (activations).
        weights: its weights as the plugin converts them (:func:`~lightning_qlora.memory.count_weights`).
        batch: ``data.batch_size``.
        seq: ``data.max_length``.
        checkpointing: ``model.activation_checkpointing`` (``auto`` included).
        every_n_layers: ``model.checkpoint_every_n_layers``.
        budget_gib: ``model.max_memory_gib`` (what ``auto`` chooses under).
        devices: GPUs the run trains on (all nodes).
        strategy: ``ddp`` or ``fsdp``.
        options: the rest of :func:`~lightning_qlora.memory.estimate`'s keywords.
        max_seq: the model's ``max_position_embeddings`` (the longest sequence searched), if it has one.
        dtype: the compute dtype's name (that of the weights not quantized).
        describe: lines saying what is estimated (model, plugin, shape, GPUs).
        notes: what the estimate does not model for this run, said under the table.
    """

    shapes: Shapes
    weights: Weights
    batch: int
    seq: int
    checkpointing: str
    every_n_layers: int
    budget_gib: float | None
    devices: int
    strategy: str
    options: dict[str, Any] = field(default_factory=dict)
    max_seq: int | None = None
    dtype: str = "bfloat16"
    describe: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def step(self, batch: int, seq: int, budget_gib: float) -> tuple[Estimate, bool]:
        """The estimate of a step of ``batch x seq`` tokens, and whether it is within ``budget_gib``.

        With ``auto``, the setting ``auto`` picks under ``budget_gib`` (the leanest, not within it, when
        none fits); otherwise the configured setting.
        """
        kwargs = {**self.options, "weights": self.weights, "devices": self.devices, "strategy": self.strategy}
        if self.checkpointing == "auto":
            try:
                return choose_checkpointing(budget_gib, self.shapes, batch, seq, **kwargs), True
            except ValueError:  # not even offloading fits
                return estimate(self.shapes, batch, seq, checkpointing="offload", **kwargs), False
        est = estimate(
            self.shapes,
            batch,
            seq,
            checkpointing=self.checkpointing,
            every_n_layers=self.every_n_layers,
            **kwargs,
        )
        return est, est.total <= budget_gib * GIB

    def search_budget(self, usable_gib: float) -> float:
        """The budget the largest batch and sequence are searched under: the GPU's, and with ``auto`` never
        more than ``model.max_memory_gib`` (a run whose budget cannot be met stops in its pre-flight)."""
        if self.checkpointing == "auto" and self.budget_gib:
            return min(self.budget_gib, usable_gib)
        return usable_gib

    def fits(self, batch: int, seq: int, usable_gib: float) -> bool:
        """True when a step of ``batch x seq`` tokens fits ``usable_gib`` (with ``auto``: some setting does)."""
        return self.step(batch, seq, self.search_budget(usable_gib))[1]

    def with_devices(self, devices: int, strategy: str) -> Setup:
        """The same run on ``devices`` GPUs under ``strategy``."""
        return dataclasses.replace(self, devices=devices, strategy=strategy)


@dataclass
class Fit:
    """The answer to "will it fit?" for one run and GPU size.

    Attributes:
        setup: what was estimated.
        estimate: the configured step's estimate, per GPU.
        gpu_gib: the GPU's size.
        usable_gib: what is left of it for torch (``gpu_gib`` less :data:`CUDA_CONTEXT_GIB`).
        fits: the configured step fits (with ``auto``: ``model.max_memory_gib`` is met, and is within the GPU).
        max_batch: the largest ``data.batch_size`` at ``data.max_length`` that fits (0: none).
        max_seq: the largest ``data.max_length`` at ``data.batch_size`` that fits (0: none).
        advice: when it does not fit, what to change (one line); None when it fits.
        budget_met: with ``auto``, some setting fits ``model.max_memory_gib`` (else the run stops in its
            pre-flight, whatever the GPU).
    """

    setup: Setup
    estimate: Estimate
    gpu_gib: float
    usable_gib: float
    fits: bool
    max_batch: int
    max_seq: int
    advice: str | None = None
    budget_met: bool = True

    def table(self) -> str:
        """The estimate part by part, the verdict, and the largest batch and sequence length."""
        s, est = self.setup, self.estimate
        # A small model in MiB: in GiB its rows would all read 0.00.
        unit, scale = ("GiB", GIB) if est.total >= GIB else ("MiB", 2**20)
        rows = [*s.describe, "", f"  {'GPU memory, per GPU':<52} {unit:>8}"]
        for key, value in est.parts.items():
            rows.append(f"  {_label(key, est, s):<52} {value / scale:8.2f}")
        rows.append(f"  {f'allocator slack (x{SLACK:g})':<52} {est.slack / scale:8.2f}")
        rows.append(f"  {'total':<52} {est.total / scale:8.2f}")
        rows.append("")
        rows.append(
            f"  fits a {self.gpu_gib:g} GiB GPU: {'yes' if self.fits else 'no'} ({est.total / GIB:.2f} GiB of the "
            f"{self.usable_gib:.2f} GiB left after {CUDA_CONTEXT_GIB:g} GiB of CUDA context)"
        )
        if s.checkpointing == "auto" and s.budget_gib:
            budget = f"model.max_memory_gib={s.budget_gib:g}"
            rows.append(
                f"  activation_checkpointing=auto chose {est.mode} under {budget}"
                if self.budget_met
                else f"  activation_checkpointing=auto finds no setting under {budget}: the run would stop"
            )
        rows.append(
            f"  largest data.batch_size at data.max_length={s.seq}: {_count(self.max_batch, MAX_BATCH)}"
        )
        if s.max_seq and self.max_seq >= s.max_seq:
            longest = f"{self.max_seq} (the model's max_position_embeddings)"
        else:
            longest = _count(self.max_seq, MAX_SEQ)
        rows.append(f"  largest data.max_length at data.batch_size={s.batch}: {longest}")
        rows += [f"  note: {n}" for n in s.notes]
        return "\n".join(rows)


def _count(value: int, cap: int) -> str:
    if value <= 0:
        return "none"
    return f"{value} or more (the search stops there)" if value >= cap else str(value)


def _label(key: str, est: Estimate, s: Setup) -> str:
    sharded = s.strategy == "fsdp" and s.devices > 1
    per = f", 1/{s.devices} each" if sharded else ""
    labels = {
        PACKED: f"4-bit weights (packed{per})",
        CONSTANTS: "quantization constants (absmax" + (", whole on every GPU)" if sharded else ")"),
        LINEAR16: f"{s.dtype} linear weights (not quantized{per})",
        DENSE: f"{s.dtype} embeddings and head (+ norms{per})",
        ADAPTERS: "adapters + grads + optimizer state"
        + (f" (1/{s.devices} each)" if sharded else " (+ DDP buckets)" if s.devices > 1 else ""),
        GATHERED: f"gathered by FSDP (embeddings, head, {s.options.get('gathered_layers')} layers)",
        ACTIVATIONS: f"activations (checkpointing: {est.mode}"
        + (", compiled blocks)" if s.options.get("compiled") else ")"),
        TRANSIENT: f"largest transient ({est.transient})" if est.transient else "largest transient",
    }
    return labels.get(key, key)


def largest(fits: Callable[[int], bool], cap: int) -> int:
    """The largest ``n`` in ``[1, cap]`` with ``fits(n)`` (0 if none), for a ``fits`` that holds up to some
    ``n`` and never after: doubling, then bisection."""
    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= cap and fits(high):
        low, high = high, high * 2
    high = min(high, cap + 1)  # fits(low) holds; fits(high) fails or high is past the cap
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


# ------------------------------------------------------------------------------------------ the run


def setup_from_config(
    cfg: DictConfig,
    hf_config: Any = None,
    plugin: Any = None,
    devices: int | None = None,
    strategy: str | None = None,
) -> Setup:
    """The memory-relevant settings of a composed run (nothing is loaded; the model is built on meta).

    Args:
        cfg: the composed config (:func:`~lightning_qlora.builders.compose_recipe`).
        hf_config: the model's transformers config, if already read (a model built from a config must then
            carry the tokenizer's ``vocab_size``, as the pre-flight sets it); read here otherwise.
        plugin: the run's ``QLoRAPrecision``; built from ``cfg`` otherwise.
        devices: GPUs the run trains on; default ``trainer.devices x trainer.num_nodes``.
        strategy: ``ddp`` or ``fsdp``; default from ``trainer.strategy``.

    Raises:
        ValueError: a bad setting, an unreadable model config, or a model the estimate cannot model.
    """
    from .builders import build_plugin, model_config, typed

    model = model_config(cfg)
    data, optimizer, trainer = typed(cfg.data), typed(cfg.optimizer), typed(cfg.trainer)
    plugin = plugin if plugin is not None else build_plugin(cfg)
    notes: list[str] = []
    if hf_config is None:
        hf_config, source = read_hf_config(cfg, notes)
    else:
        source = model.display_name
    try:
        shapes = Shapes.from_hf(hf_config)
    except AttributeError as err:
        raise ValueError(
            f"model {model.display_name!r} ({getattr(hf_config, 'model_type', '?')}): the estimate models "
            f"Llama-style decoder layers and its config has no {_missing(err)}; estimate a model with "
            "hidden_size, intermediate_size, num_attention_heads and num_hidden_layers"
        ) from None
    meta = meta_model(hf_config, plugin, model.trust_remote_code)
    weights = count_weights(meta)
    devices = devices if devices is not None else trainer_devices(trainer, notes)
    strategy = strategy or ("fsdp" if str(trainer.strategy).lower().startswith("fsdp") else "ddp")
    if devices < 1:
        raise ValueError(f"devices={devices} must be >= 1")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not supported; use one of {', '.join(STRATEGIES)}")
    on_gpu = str(trainer.accelerator).lower() != "cpu"
    compiled = model.compile is True or (model.compile == "auto" and on_gpu)
    momentum = optimizer.name != "sgd" or optimizer.betas[0] > 0
    options = {
        "dtype_bytes": plugin.dtype.itemsize,
        "loss_chunk": model.loss_chunk_size,
        "optimizer_states": OPTIMIZER_STATES[optimizer.name] if momentum else 0.0,
        "compiled": compiled,
        "gathered_layers": _gathered_layers(trainer, shapes.layers, strategy, notes),
    }
    if (model.attn_implementation or "sdpa") == "eager":
        notes.append(
            "model.attn_implementation=eager keeps batch x heads x seq^2 attention scores per layer, which this "
            "estimate does not count; use sdpa"
        )
    if optimizer.name == "paged_adamw8bit":
        notes.append("paged_adamw8bit's states are counted as resident; paging may move them to the host")
    dtype = str(plugin.dtype).removeprefix("torch.")
    describe = [
        f"{PROG}: {source} ({getattr(hf_config, 'model_type', '?')}, {shapes.layers} layers, {shapes.hidden} wide, "
        f"vocab {shapes.vocab})",
        f"  {_describe_plugin(plugin, meta, weights, dtype)}; {optimizer.name}",
        f"  {data.batch_size} x {data.max_length} tokens per GPU (data.batch_size x data.max_length); "
        f"{devices} GPU{'s' if devices > 1 else ''} ({strategy})",
    ]
    max_seq = getattr(hf_config, "max_position_embeddings", None)
    return Setup(
        shapes=shapes,
        weights=weights,
        batch=int(data.batch_size),
        seq=int(data.max_length),
        checkpointing=model.activation_checkpointing,
        every_n_layers=model.checkpoint_every_n_layers,
        budget_gib=model.max_memory_gib,
        devices=devices,
        strategy=strategy,
        options=options,
        max_seq=int(max_seq) if max_seq else None,
        dtype=dtype,
        describe=describe,
        notes=notes,
    )


def _gathered_layers(trainer: Any, layers: int, strategy: str, notes: list[str]) -> int:
    """Decoder layers FSDP holds whole at once, from ``trainer.fsdp`` (FSDP2's settings, where the schema has
    them): two (one computing, one prefetched), or all of them when it keeps them from the forward to the
    backward or shards the model as one unit."""
    fsdp = getattr(trainer, "fsdp", None)
    if strategy != "fsdp" or fsdp is None:
        return FSDP_GATHERED_LAYERS
    whole = not getattr(fsdp, "reshard_after_forward", True) or getattr(fsdp, "wrap", "") == "model"
    return layers if whole else FSDP_GATHERED_LAYERS


def _describe_plugin(plugin: Any, meta: Any, weights: Weights, dtype: str) -> str:
    """The quantization and the adapters, as the converted model has them."""
    from .lora import lora_layers
    from .nf4 import Linear4bit

    quant = plugin.quant
    quantized = sum(isinstance(m, Linear4bit) for m in meta.modules())
    scheme = (
        f"{quant.quant_type}{' + double quant' if quant.double_quant else ''} (block {quant.blocksize}) on "
        f"{quantized} linear layers"
        if quant is not None
        else "no quantization (16-bit LoRA)"
    )
    return (
        f"{scheme}, {dtype} compute; LoRA r={plugin.lora.r} on {len(lora_layers(meta))} layers "
        f"({weights.adapters / 1e6:.1f}M parameters)"
    )


def _missing(err: AttributeError) -> str:
    name = getattr(err, "name", None)
    return repr(name) if name else one_line(err)


def trainer_devices(trainer: Any, notes: list[str]) -> int:
    """``trainer.devices x trainer.num_nodes`` as a count (``auto``/-1: the GPUs visible here, else 1)."""
    devices = trainer.devices
    if isinstance(devices, (list, tuple)):
        count = len(devices)
    elif isinstance(devices, str) and devices != "auto":
        count = len([d for d in devices.split(",") if d.strip()])
    elif isinstance(devices, int) and devices >= 1:
        count = devices
    else:
        import torch

        count = torch.cuda.device_count() or 1
        notes.append(
            f"trainer.devices={devices}: counted as {count} GPU{'s' if count > 1 else ''} (those visible here); "
            "--devices N estimates for another machine"
        )
    return count * int(trainer.num_nodes)


# ------------------------------------------------------------------------------------------ the verdict


def gpu_memory_gib() -> float | None:
    """The current CUDA device's total memory in GiB, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB


def will_fit(
    cfg: DictConfig,
    gpu_gib: float | None = None,
    *,
    hf_config: Any = None,
    plugin: Any = None,
    devices: int | None = None,
    strategy: str | None = None,
) -> Fit:
    """Whether the run ``cfg`` composes fits a GPU of ``gpu_gib``, and the largest batch and length that do.

    Args:
        cfg: the composed config.
        gpu_gib: the GPU's size in GiB; default the current CUDA device's.
        hf_config, plugin, devices, strategy: as :func:`setup_from_config` takes them.

    Raises:
        ValueError: no ``gpu_gib`` and no CUDA device to read it from, or what :func:`setup_from_config` raises.
    """
    if gpu_gib is None:
        gpu_gib = gpu_memory_gib()
        if gpu_gib is None:
            raise ValueError(
                "no CUDA GPU here to read its size from; give the GPU size in GiB (--gpu-gib 24)"
            )
    if not gpu_gib > CUDA_CONTEXT_GIB:
        raise ValueError(
            f"--gpu-gib={gpu_gib:g} must be more than the {CUDA_CONTEXT_GIB:g} GiB of CUDA context"
        )
    setup = setup_from_config(cfg, hf_config, plugin, devices, strategy)
    usable = gpu_gib - CUDA_CONTEXT_GIB
    met = True
    if setup.checkpointing == "auto" and setup.budget_gib:
        est, met = setup.step(setup.batch, setup.seq, setup.budget_gib)
        fits = met and est.total <= usable * GIB
    else:
        est, fits = setup.step(setup.batch, setup.seq, usable)
    max_batch = largest(lambda b: setup.fits(b, setup.seq, usable), MAX_BATCH)
    max_seq = largest(lambda n: setup.fits(setup.batch, n, usable), setup.max_seq or MAX_SEQ)
    fit = Fit(setup, est, gpu_gib, usable, fits, max_batch, max_seq, budget_met=met)
    if not fits:
        fit.advice = advise(fit)
    return fit


def fit_table(cfg: DictConfig, gpu_gib: float | None = None, **kwargs: Any) -> str:
    """:func:`will_fit`'s table: what the pre-flight prints before a run (same arguments)."""
    return will_fit(cfg, gpu_gib, **kwargs).table()


def advise(fit: Fit) -> str:
    """One line for a run that does not fit: what it needs, and the settings that would make it fit."""
    s, est, usable = fit.setup, fit.estimate, fit.usable_gib
    need = f"about {est.total / GIB:.1f} GiB per GPU is needed, {usable:.1f} GiB is usable"
    if not fit.budget_met:
        need = (
            f"model.max_memory_gib={s.budget_gib:g} cannot be met: about {est.total / GIB:.1f} GiB per GPU is "
            "needed even with activation checkpointing offloaded"
        )
    changes: list[str] = []
    if s.checkpointing == "auto":
        # auto chooses under model.max_memory_gib: above what the GPU leaves it picks too little
        # checkpointing, below it may find nothing to pick. The GPU's own size is the budget that fits.
        budget = math.floor(usable * 10) / 10
        if s.budget_gib != budget and dataclasses.replace(s, budget_gib=budget).fits(s.batch, s.seq, usable):
            changes.append(f"set model.max_memory_gib={budget:g} (what this GPU leaves to torch)")
    else:
        leaner = _leaner_setting(s, usable)
        if leaner:
            changes.append(leaner)
    if fit.max_batch and fit.max_batch < s.batch:
        changes.append(f"lower data.batch_size to {fit.max_batch}")
    if fit.max_seq and fit.max_seq < s.seq:
        changes.append(f"lower data.max_length to {fit.max_seq}")
    if not changes:
        shards = _fsdp_devices(s, usable)
        changes.append(
            f"shard the model over {shards} GPUs with FSDP (trainer=fsdp trainer.devices={shards})"
            if shards
            else "use a larger GPU"
        )
    return f"{need}; " + ", or ".join(changes)


def _leaner_setting(s: Setup, usable: float) -> str | None:
    """The fastest activation checkpointing setting that fits, as overrides, when the configured one does not."""
    for mode, n in candidates(s.shapes.layers):
        kwargs = {**s.options, "weights": s.weights, "devices": s.devices, "strategy": s.strategy}
        est = estimate(s.shapes, s.batch, s.seq, checkpointing=mode, every_n_layers=n, **kwargs)
        if est.total <= usable * GIB:
            extra = f" model.checkpoint_every_n_layers={n}" if mode == "every_n_layers" else ""
            return f"set model.activation_checkpointing={mode}{extra} (about {est.total / GIB:.1f} GiB)"
    return None


def _fsdp_devices(s: Setup, usable: float) -> int | None:
    """The fewest GPUs (a power of two up to 64) over which FSDP makes the configured step fit."""
    for n in (2, 4, 8, 16, 32, 64):
        if n > s.devices and s.with_devices(n, "fsdp").fits(s.batch, s.seq, usable):
            return n
    return None


# ------------------------------------------------------------------------------------------ CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="The GPU memory a lightning-qlora run needs per GPU, estimated from the model's config "
        "before anything loads; whether it fits a GPU; the largest batch and sequence length that do. Exit "
        "code 0: it fits; 2: it does not (or a bad setting).",
    )
    p.add_argument("--config-name", "-cn", default="default", help="the recipe, as for lightning-qlora")
    p.add_argument(
        "overrides", nargs="*", help="Hydra overrides, as for lightning-qlora (data.batch_size=2 ...)"
    )
    p.add_argument(
        "--gpu-gib",
        type=float,
        default=None,
        help="the GPU's memory in GiB (default: the current CUDA device's; required without one)",
    )
    p.add_argument(
        "--devices",
        type=int,
        default=None,
        help="GPUs to train on (default: trainer.devices x trainer.num_nodes)",
    )
    p.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default=None,
        help="ddp: every GPU holds the whole model; fsdp: weights, adapters and optimizer state are sharded "
        "(default: from trainer.strategy)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``lightning-qlora-estimate``: prints the table; 0 when the run fits, exits with 2 when it does not."""
    from .builders import compose_recipe

    args = _parser().parse_intermixed_args(argv)
    if args.gpu_gib is None and gpu_memory_gib() is None:
        fail("--gpu-gib is required here: there is no CUDA GPU to read its size from; e.g. --gpu-gib 24")
    if args.devices is not None and args.devices < 1:
        fail(f"--devices={args.devices} must be >= 1 (the number of GPUs)")
    try:
        cfg = compose_recipe(args.config_name, args.overrides)
        fit = will_fit(cfg, args.gpu_gib, devices=args.devices, strategy=args.strategy)
    except (ValueError, OSError) as err:
        fail(one_line(err))
    print(fit.table(), flush=True)
    if not fit.fits:
        fail(f"does not fit a {fit.gpu_gib:g} GiB GPU: {fit.advice}", code=EXIT_USAGE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
