"""The benchmark's ``ours`` and ``ours16`` modes: the shipped ``CausalLMModule`` + ``QLoRAPrecision`` in a Trainer.

The module and the plugin are built by the Hydra app's own builders from the overrides
:func:`app_overrides` gives (so the bench measures what ``lightning-qlora`` runs), the Trainer is
Lightning's, with ``strategy="ddp"`` or :class:`~lightning_qlora.FSDP2Strategy` on more than one device.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .bench_common import (
    LORA,
    LR,
    MODELS,
    GradientTraffic,
    Result,
    batches,
    combine_ranks,
    job_start,
    make_result,
    peak_allocated,
    reset_peak,
    set_grad_bytes,
    sync,
    trainable_bytes,
)
from .host_memory import HostMemorySampler


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU; float32 on a CPU, where bf16 matrix products are slow and the figures mean nothing."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def app_overrides(directory: Path, quant: bool, device: torch.device, extra: list[str] = ()) -> list[str]:
    """The Hydra overrides that make ``lightning-qlora`` train this checkpoint as the bench measures it.

    ``directory`` may hold a 16-bit or a bitsandbytes 4-bit checkpoint (the 70b's): the app's loader
    tells them apart (``load_pretrained``).
    """
    return [
        "model=local",
        f"model.name_or_path={directory}",
        "model.tokenizer=byte",  # the random checkpoints ship none; only its pad id is used
        "model.activation_checkpointing=full",
        "model.attn_implementation=sdpa",
        "quant=nf4_dq" if quant else "quant=none",
        f"quant.compute_dtype={str(compute_dtype(device)).removeprefix('torch.')}",
        f"lora.r={LORA['r']}",
        f"lora.alpha={LORA['alpha']}",
        "lora.dropout=0.0",
        f"optimizer.lr={LR}",
        "optimizer.scheduler=constant",
        "optimizer.warmup_ratio=0.0",
        f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}",
        "trainer.gradient_clip_val=null",
        "trainer.accumulate_grad_batches=1",
        "output_dir=" + str(directory / "app-run"),
        *extra,
    ]


def run_ours(
    model: str,
    directory: Path,
    device: torch.device,
    steps: int,
    warmup: int,
    quant: bool,
    batch: int = 0,
    budget_gib: float = 0.0,
    devices: int = 1,
    strategy: str = "ddp",
) -> Result | None:
    """The shipped path: ``CausalLMModule`` + ``QLoRAPrecision`` built by the Hydra app's own builders.

    With ``devices > 1``, through Lightning's DDP (``strategy="ddp"``) or :class:`~lightning_qlora.FSDP2Strategy`
    (``"fsdp"``); Lightning relaunches this command for the other ranks. The gradient bytes of a step are
    measured at the collective (:class:`~lightning_qlora.bench_common.GradientTraffic`).

    Returns:
        The row (on rank 0: the ranks combined), None on the other ranks.
    """
    import lightning as L

    from lightning_qlora.builders import build_module, build_plugin, build_tokenizer, compose_recipe

    extra = (
        ["model.activation_checkpointing=auto", f"model.max_memory_gib={budget_gib}"] if budget_gib else []
    )
    cfg = compose_recipe("default", app_overrides(directory, quant, device, extra))
    if os.environ.get("QLORA_BENCH_COMPILE") in ("0", "1"):
        cfg.model.compile = os.environ["QLORA_BENCH_COMPILE"] == "1"
    plugin = build_plugin(cfg)
    module = build_module(cfg, build_tokenizer(cfg))
    times: list[float] = []
    losses: list[Tensor] = []
    load: dict[str, float] = {}
    first: dict[str, float] = {}
    profile = bool(os.environ.get("QLORA_BENCH_PROFILE"))
    traffic = GradientTraffic()
    fsdp = devices > 1 and strategy == "fsdp"
    if fsdp:
        traffic.count_reduce_scatters()
    host = HostMemorySampler()

    class StepTimer(L.Callback):
        def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
            reset_peak(device)
            load["t0"] = time.perf_counter()
            host.reset()  # the peaks from here: loading, then training

        def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            sync(device)
            load["s"] = time.perf_counter() - load["t0"]
            load["peak"] = peak_allocated(device)
            load["host_growth"] = host.peak["total"] - host.start["total"]
            reset_peak(device)

        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            # Lightning's DDPStrategy registers a ddp_comm_hook on CUDA only; this one counts on CPUs too.
            if devices > 1 and strategy == "ddp":
                trainer.strategy.model.register_comm_hook(traffic, GradientTraffic.hook)

        def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
            if profile and trainer.global_step == warmup:
                self.profiler = torch.profiler.profile(activities=profiler_activities(device)).__enter__()
            sync(device)
            traffic.bytes = 0
            self.t0 = time.perf_counter()

        def on_train_batch_end(
            self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, *args
        ) -> None:
            sync(device)
            times.append(time.perf_counter() - self.t0)
            traffic.step_done()
            if len(times) == 1:
                first["s"] = time.time() - job_start()
            losses.append(outputs["loss"].detach())
            if profile and trainer.global_step == warmup + 1:
                self.profiler.__exit__(None, None, None)
                print_profile(self.profiler, device)

    if devices == 1:
        trainer_strategy: Any = "auto"
    elif fsdp:
        from lightning_qlora import FSDP2Strategy

        trainer_strategy = FSDP2Strategy()
    else:
        trainer_strategy = "ddp"
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=devices,
        strategy=trainer_strategy,
        plugins=[plugin],
        max_steps=warmup + steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[StepTimer()],
    )
    # Batches as the app's packed data gives them: ids, an all-ones mask, labels. With several devices
    # Lightning's DistributedSampler deals them out: each rank gets warmup + steps of them.
    data = [
        {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        for ids in batches(model, (warmup + steps) * devices, torch.device("cpu"), batch)
    ]
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    backend = os.environ.get("QLORA_BENCH_SDPA")  # an experiment knob: which SDPA kernel attention uses
    with host:
        if backend:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([getattr(SDPBackend, backend.upper())]):
                trainer.fit(module, loader)
        else:
            trainer.fit(module, loader)
    mode = "ours" if quant else "ours16"
    result = make_result(
        model, mode, times[warmup:], [float(x) for x in losses], load, device, batch, first.get("s")
    )
    result.compiled = bool(getattr(module.model, "_blocks_compiled", False))
    if host.available:
        result.host_anon_gib, result.host_file_gib = host.peak["anon"] / 2**30, host.peak["file"] / 2**30
        result.load_host_gib = load["host_growth"] / 2**30
    est = module.checkpointing_estimate
    result.checkpointing = (
        f"{est.checkpointing}/{est.every_n_layers} (est. {est.total / 2**30:.2f} GiB)"
        if est is not None
        else cfg.model.activation_checkpointing
    )
    result.est_gib = (
        est.total / 2**30
        if est is not None
        else estimate_gib(
            module.model.config,
            plugin,
            result.batch,
            MODELS[model]["seq"],
            checkpointing=cfg.model.activation_checkpointing,
            dtype_bytes=torch.empty((), dtype=compute_dtype(device)).element_size(),
            loss_chunk=cfg.model.loss_chunk_size,
            compiled=result.compiled,
            devices=devices,
            strategy=strategy,
        )
    )
    result.budget_gib = budget_gib
    if devices > 1:
        result.strategy = strategy
        set_grad_bytes(result, traffic, trainable_bytes(module))
    return combine_ranks(result, devices)


def estimate_gib(
    hf_config: Any,
    plugin: Any,
    batch: int,
    seq: int,
    checkpointing: str = "full",
    every_n_layers: int = 1,
    dtype_bytes: int = 2,
    loss_chunk: int = 2048,
    compiled: bool = False,
    devices: int = 1,
    strategy: str = "ddp",
) -> float | None:
    """:mod:`lightning_qlora.memory`'s estimate of this run's ``torch.cuda.max_memory_allocated`` (GiB), or
    None where it has none.

    Calls only ``Shapes.from_hf`` and ``estimate`` with the arguments they take, and guards the call: the
    memory model is developed on its own, and a change of its signature must show as "n/a" in the table,
    not fail the benchmark. With several devices it asks for the per-GPU estimate (``devices``,
    ``strategy``); a memory model without those gives the plain one-GPU estimate for DDP (every GPU holds
    the whole model) and none for FSDP.
    """
    quant, lora = getattr(plugin, "quant", None), getattr(plugin, "lora", None)
    try:
        from .memory import Shapes, estimate

        shapes = Shapes.from_hf(hf_config)
        kwargs: dict[str, Any] = dict(
            checkpointing=checkpointing,
            every_n_layers=every_n_layers,
            lora_r=lora.r if lora is not None else LORA["r"],
            quantized=quant is not None,
            blocksize=quant.blocksize if quant is not None else 64,
            double_quant=quant.double_quant if quant is not None else True,
            dtype_bytes=dtype_bytes,
            loss_chunk=loss_chunk,
            compiled=compiled,
        )
        if devices > 1:
            try:
                return (
                    estimate(shapes, batch, seq, devices=devices, strategy=strategy, **kwargs).total / 2**30
                )
            except TypeError:
                if strategy != "ddp":
                    return None
        return estimate(shapes, batch, seq, **kwargs).total / 2**30
    except Exception:  # noqa: BLE001 - any failure of the estimate is "n/a", never a failed benchmark row
        return None


def profiler_activities(device: torch.device) -> list:
    acts = [torch.profiler.ProfilerActivity.CPU]
    return acts + [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else acts


def print_profile(prof: Any, device: torch.device) -> None:
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70), flush=True)
