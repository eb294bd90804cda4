"""Side-by-side speed and memory: our plugin in a real Trainer against the PEFT + bitsandbytes stack.

    python -m lightning_qlora.bench                      # 7B and 1B Llama architectures, every mode (GPU)
    python -m lightning_qlora.bench --models 1b --modes ours,peft
    python -m lightning_qlora.bench --cpu                # a tiny configuration; checks the harness only
    python -m lightning_qlora.bench --models 1b --modes ours,peft --devices 2 --strategy ddp   # 1 and 2 GPUs

Every (model, mode) runs in a fresh process on the same saved random-initialised checkpoint, with
the same LoRA (r=16, alpha=32, all linear layers, no dropout), sequence length, batch, gradient
checkpointing and optimizer (AdamW, lr 1e-4). Reported: median tokens/s over the timed steps after
warm-up, peak ``torch.cuda.max_memory_allocated`` while training, and time and peak memory to load
and quantize the model.

Modes:
    ours      QLoRAPrecision (NF4 + double quant, bf16 compute) through ``L.Trainer``
    ours16    the same plugin with ``quant=None`` (16-bit LoRA)
              (both with each decoder block compiled on CUDA, as ``CausalLMModule(compile="auto")``
              does; ``QLORA_BENCH_COMPILE=0|1`` overrides, and the table says which ran compiled)
    peft      transformers ``BitsAndBytesConfig`` + ``prepare_model_for_kbit_training`` + PEFT LoRA,
              run under bf16 autocast as the HF Trainer does with ``bf16=True`` (the reference)
    peft_noac the same without autocast
    peft16    PEFT LoRA on the bf16 model under autocast (16-bit LoRA, the reference's ceiling)

More than one GPU (``--devices N --strategy ddp``): every mode also runs data-parallel on N GPUs, with
the same batch per GPU. Ours through Lightning's own ``Trainer(devices=N, strategy="ddp")`` (its
launcher starts the other ranks); the reference under plain ``torch.nn.parallel.DistributedDataParallel``
launched with ``torchrun --standalone --nproc_per_node=N`` (``python -m torch.distributed.run``), as
PEFT's users run a training script of their own. The row of N GPUs reports tokens/s summed over the
ranks, the peak of the GPU that peaked highest, the slowest rank's step time, and the scaling
efficiency: its tokens/s over N times the 1-GPU row of the same call. ``--cpu --devices 2`` runs the
same on CPU processes (gloo) to check the harness. A job runs in a process group of its own, killed with
every rank it started after ``--job-timeout`` seconds (its row then says so).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

MODELS: dict[str, dict[str, Any]] = {
    "7b": dict(
        label="Llama-2-7B (4096 d, 32 layers, 32k vocab)",
        config=dict(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
        ),
        batch=2,
        seq=2048,
    ),
    "1b": dict(
        label="Llama-3.2-1B (2048 d, 16 layers, 128k vocab)",
        config=dict(
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            max_position_embeddings=8192,
            rope_theta=500000.0,
            tie_word_embeddings=True,
        ),
        batch=4,
        seq=2048,
    ),
    "tiny": dict(
        label="tiny Llama (64 d, 2 layers, 256 vocab; CPU harness check)",
        config=dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
        ),
        batch=2,
        seq=64,
    ),
}
MODES = ("ours", "ours16", "peft", "peft_noac", "peft16")
LORA = dict(r=16, alpha=32)
LR = 1e-4


@dataclass
class Result:
    model: str
    mode: str
    tokens_per_step: int
    tokens_per_s: float
    step_s: float
    peak_gib: float
    load_s: float
    load_peak_gib: float
    loss_first: float
    loss_last: float
    error: str = ""
    compiled: bool = False
    batch: int = 0
    budget_gib: float = 0.0  # 0: no budget
    checkpointing: str = ""
    devices: int = 1  # data-parallel ranks: tokens/s summed over them, peaks and step time the worst one's


def _gib(n: float) -> float:
    return n / 2**30


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else 0


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def prepare_checkpoint(model: str, directory: Path, device: torch.device) -> None:
    """A random-initialised model saved with ``save_pretrained``: every mode loads this same file."""
    import transformers

    if (directory / "config.json").exists():
        return
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**MODELS[model]["config"])
    with torch.device(device):
        lm = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    lm.save_pretrained(directory)


def _batches(model: str, n: int, device: torch.device, batch: int = 0, seed: int = 0) -> list[torch.Tensor]:
    spec = MODELS[model]
    g = torch.Generator().manual_seed(seed)
    vocab = spec["config"]["vocab_size"]
    shape = (batch or spec["batch"], spec["seq"])
    return [torch.randint(0, vocab, shape, generator=g).to(device) for _ in range(n)]


def app_overrides(directory: Path, quant: bool, device: torch.device, extra: list[str] = ()) -> list[str]:
    """The Hydra overrides that make ``lightning-qlora`` train this checkpoint as the bench measures it."""
    return [
        "model=local",
        f"model.name_or_path={directory}",
        "model.tokenizer=byte",  # the random checkpoints ship none; only its pad id is used
        "model.activation_checkpointing=full",
        "model.attn_implementation=sdpa",
        "quant=nf4_dq" if quant else "quant=none",
        f"quant.compute_dtype={'bfloat16' if device.type == 'cuda' else 'float32'}",
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
) -> Result | None:
    """The shipped path: ``CausalLMModule`` + ``QLoRAPrecision`` built by the Hydra app's own builders.

    With ``devices > 1``, through Lightning's DDP (it relaunches this command for the other ranks);
    returns the combined row on rank 0 and None on the others.
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
    profile = bool(os.environ.get("QLORA_BENCH_PROFILE"))

    class StepTimer(L.Callback):
        def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
            _reset_peak(device)
            load["t0"] = time.perf_counter()

        def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            _sync(device)
            load["s"] = time.perf_counter() - load["t0"]
            load["peak"] = _peak(device)
            _reset_peak(device)

        def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
            if profile and trainer.global_step == warmup:
                self.profiler = torch.profiler.profile(activities=_profiler_activities(device)).__enter__()
            _sync(device)
            self.t0 = time.perf_counter()

        def on_train_batch_end(
            self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, *args
        ) -> None:
            _sync(device)
            times.append(time.perf_counter() - self.t0)
            losses.append(outputs["loss"].detach())
            if profile and trainer.global_step == warmup + 1:
                self.profiler.__exit__(None, None, None)
                _print_profile(self.profiler, device)

    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        plugins=[plugin],
        max_steps=warmup + steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[StepTimer()],
    )
    # Batches as the app's packed data gives them: ids, an all-ones mask, labels. Under DDP Lightning's
    # DistributedSampler deals them out: each rank gets warmup + steps of them.
    data = [
        {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        for ids in _batches(model, (warmup + steps) * devices, torch.device("cpu"), batch)
    ]
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    backend = os.environ.get("QLORA_BENCH_SDPA")  # an experiment knob: which SDPA kernel attention uses
    if backend:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([getattr(SDPBackend, backend.upper())]):
            trainer.fit(module, loader)
    else:
        trainer.fit(module, loader)
    result = _result(
        model, "ours" if quant else "ours16", times[warmup:], [float(x) for x in losses], load, device, batch
    )
    result.compiled = bool(getattr(module.model, "_blocks_compiled", False))
    est = module.checkpointing_estimate
    result.checkpointing = (
        f"{est.checkpointing}/{est.every_n_layers} (est. {est.total / 2**30:.2f} GiB)"
        if est is not None
        else cfg.model.activation_checkpointing
    )
    result.budget_gib = budget_gib
    return _combine_ranks(result, devices)


def _combine_ranks(result: Result, devices: int) -> Result | None:
    """One row for a data-parallel run: on rank 0 the ranks' rows combined, None on the others.

    tokens/s and tokens per step are summed over the ranks; the step time, the peaks and the load time
    are the worst rank's (the step waits for the slowest, the largest peak is what must fit a GPU); the
    losses are the ranks' mean.
    """
    if devices == 1:
        return result
    import torch.distributed as dist

    world = dist.get_world_size()
    if world != devices:
        raise RuntimeError(f"{devices} devices asked for, but the process group has {world} ranks")
    rows: list[Any] = [None] * world
    dist.all_gather_object(rows, asdict(result))
    dist.barrier()  # every rank has its rows before any rank moves on (see worker: no teardown follows)
    if dist.get_rank() != 0:
        return None
    ranks = [Result(**row) for row in rows]
    return replace(
        result,
        tokens_per_step=sum(r.tokens_per_step for r in ranks),
        tokens_per_s=sum(r.tokens_per_s for r in ranks),
        step_s=max(r.step_s for r in ranks),
        peak_gib=max(r.peak_gib for r in ranks),
        load_s=max(r.load_s for r in ranks),
        load_peak_gib=max(r.load_peak_gib for r in ranks),
        loss_first=statistics.fmean(r.loss_first for r in ranks),
        loss_last=statistics.fmean(r.loss_last for r in ranks),
        devices=world,
    )


def _profiler_activities(device: torch.device) -> list:
    acts = [torch.profiler.ProfilerActivity.CPU]
    return acts + [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else acts


def _print_profile(prof: Any, device: torch.device) -> None:
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70), flush=True)


def run_peft(
    model: str,
    directory: Path,
    device: torch.device,
    steps: int,
    warmup: int,
    mode: str,
    batch: int = 0,
    devices: int = 1,
) -> Result | None:
    """The reference. With ``devices > 1`` this process is one rank that ``torchrun`` started: the PEFT
    model is wrapped in plain torch DDP (``find_unused_parameters=False``, as the HF Trainer does with
    gradient checkpointing); returns the combined row on rank 0 and None on the others."""
    import transformers
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    rank, local = 0, 0
    if devices > 1:
        import torch.distributed as dist

        local = int(os.environ["LOCAL_RANK"])
        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank = dist.get_rank()
    _reset_peak(device)
    t0 = time.perf_counter()
    kwargs: dict[str, Any] = dict(
        dtype=torch.bfloat16, attn_implementation="sdpa", device_map={"": device.index or 0}
    )
    if device.type != "cuda":
        kwargs["device_map"] = "cpu"
    if mode in ("peft", "peft_noac"):
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    lm = transformers.AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    if mode in ("peft", "peft_noac"):
        lm = prepare_model_for_kbit_training(lm, use_gradient_checkpointing=True)
    else:
        lm.gradient_checkpointing_enable()
        lm.enable_input_require_grads()
    lm.config.use_cache = False
    lm = get_peft_model(
        lm,
        LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    lm.train()
    step_model: Any = lm
    if devices > 1:
        device_ids = [local] if device.type == "cuda" else None
        step_model = torch.nn.parallel.DistributedDataParallel(
            lm, device_ids=device_ids, find_unused_parameters=False
        )
    _sync(device)
    load = {"s": time.perf_counter() - t0, "peak": _peak(device)}
    _reset_peak(device)
    optimizer = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=LR)
    autocast = mode in ("peft", "peft16")
    times, losses = [], []
    for ids in _batches(model, warmup + steps, device, batch, seed=rank):
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = step_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    result = _result(model, mode, times[warmup:], losses, load, device, batch)
    result.checkpointing = "full"
    return _combine_ranks(result, devices)


def _result(model, mode, times, losses, load, device, batch: int = 0) -> Result:
    if not all(math.isfinite(x) for x in losses):
        raise FloatingPointError(
            f"{model}/{mode}: non-finite loss {losses}: a fast but wrong run is no result"
        )
    spec = MODELS[model]
    batch = batch or spec["batch"]
    tokens = batch * spec["seq"]
    step = statistics.median(times)
    return Result(
        model=model,
        mode=mode,
        tokens_per_step=tokens,
        tokens_per_s=tokens / step,
        step_s=step,
        peak_gib=_gib(_peak(device)),
        load_s=load.get("s", float("nan")),
        load_peak_gib=_gib(load.get("peak", 0)),
        loss_first=losses[0],
        loss_last=losses[-1],
        batch=batch,
    )


def worker(args: argparse.Namespace) -> None:
    device = torch.device("cuda", 0) if not args.cpu else torch.device("cpu")
    directory = Path(args.checkpoint)
    devices = int(args.devices)
    if args.mode in ("ours", "ours16"):
        result = run_ours(
            args.models, directory, device, args.steps, args.warmup, args.mode == "ours", args.batch,
            args.max_memory_gib or 0.0, devices,
        )  # fmt: skip
    else:
        result = run_peft(
            args.models, directory, device, args.steps, args.warmup, args.mode, args.batch, devices
        )
    if result is not None:  # rank 0 (or the only process) reports
        print("RESULT " + json.dumps(asdict(result)), flush=True)
    if devices > 1:
        # A rank ends here, with no interpreter teardown: tearing down gloo's process group deadlocked
        # (seen on CPU, torch 2.13: its destructor joins its worker threads while holding the GIL, and
        # a worker thread freeing the finished all-gather's Python tensors waits for the GIL).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _versions() -> str:
    import importlib.metadata as md

    names = ["torch", "lightning", "transformers", "peft", "bitsandbytes"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            found.append(f"{name} -")
    return ", ".join(found)


def table(results: list[Result]) -> str:
    """Markdown rows; ratios against the best reference (``peft``) row of the same model, budget and
    device count. With data-parallel rows, two more columns: ``devices`` and ``scaling`` (tokens/s over
    ``devices`` times the 1-device row of the same model, mode and batch); the peak is then per GPU."""
    multi = any(r.devices > 1 for r in results)
    rows = [
        f"| model | mode |{' devices |' if multi else ''} batch | checkpointing | tokens/s | vs peft |"
        f"{' scaling |' if multi else ''} step s | peak GiB{'/device' if multi else ''} | vs peft | load s | "
        "load peak GiB | loss first→last |",
        "|---|---|" + "---|" * (12 if multi else 10),
    ]
    for r in results:
        refs = [x for x in results if x.model == r.model and x.mode == "peft" and not x.error
                and x.budget_gib == r.budget_gib and x.devices == r.devices]  # fmt: skip
        ref = max(refs, key=lambda x: x.tokens_per_s, default=None)
        budget = f" (≤{r.budget_gib:g} GiB)" if r.budget_gib else ""
        devices = f" {r.devices} |" if multi else ""
        if r.error:
            rows.append(
                f"| {r.model} | {r.mode}{budget} |{devices} {r.batch or ''} | | failed: {r.error}"
                + " |" * (9 if multi else 8)
            )
            continue
        speed = f"{r.tokens_per_s / ref.tokens_per_s:.2f}x" if ref else ""
        mem = f"{r.peak_gib / ref.peak_gib:.2f}x" if ref and ref.peak_gib else ""
        mode = (f"{r.mode} (compiled)" if r.compiled else r.mode) + budget
        scaling = f" {_scaling(r, results)} |" if multi else ""
        rows.append(
            f"| {r.model} | {mode} |{devices} {r.batch} | {r.checkpointing} | {r.tokens_per_s:,.0f} | {speed} |"
            f"{scaling} {r.step_s:.3f} | {r.peak_gib:.2f} | {mem} | {r.load_s:.1f} | {r.load_peak_gib:.2f} | "
            f"{r.loss_first:.3f}→{r.loss_last:.3f} |"
        )
    return "\n".join(rows)


def scaling_efficiency(row: Result, results: list[Result]) -> float | None:
    """``row``'s tokens/s over ``row.devices`` times the 1-device row of the same model, mode, batch and
    budget (1.0: perfect data-parallel scaling); None without such a row."""
    base = next((x for x in results if x.devices == 1 and not x.error and x.model == row.model
                 and x.mode == row.mode and x.batch == row.batch and x.budget_gib == row.budget_gib),
                None)  # fmt: skip
    if base is None or row.error or not base.tokens_per_s:
        return None
    return row.tokens_per_s / (row.devices * base.tokens_per_s)


def _scaling(row: Result, results: list[Result]) -> str:
    eff = scaling_efficiency(row, results)
    return "" if row.devices == 1 or eff is None else f"{eff:.0%}"


def _run_job(args: argparse.Namespace, name: str, mode: str, directory: Path, batch: int = 0,
             budget: float = 0.0, devices: int = 1) -> Result:  # fmt: skip
    """One (model, mode[, batch][, budget][, devices]) in a fresh process; a failure becomes a row, not a crash.

    With ``devices > 1`` ours starts as one process and Lightning launches the other ranks; the
    reference is started by ``torchrun`` (``python -m torch.distributed.run``), one process per device.
    """
    cmd = [sys.executable, "-m", "lightning_qlora.bench", "--mode", mode, "--models", name,
           "--checkpoint", str(directory), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--batch", str(batch)]  # fmt: skip
    if budget and mode in ("ours", "ours16"):
        cmd += ["--max-memory-gib", str(budget)]
    if args.cpu:
        cmd.append("--cpu")
    if devices > 1:
        cmd += ["--devices", str(devices), "--strategy", args.strategy]
        if mode.startswith("peft"):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={devices}",
                   *cmd[1:]]  # fmt: skip
    on = f" on {devices} devices" if devices > 1 else ""
    started = time.perf_counter()
    stdout, stderr, timed_out = _run(cmd, args.job_timeout)
    line = next((ln for ln in stdout.splitlines() if ln.startswith("RESULT ")), None)
    if os.environ.get("QLORA_BENCH_PROFILE"):  # the worker's profile table is on its stdout
        print("\n".join(ln for ln in stdout.splitlines() if not ln.startswith("RESULT ")), flush=True)
    if line is None:
        tail = (stderr or stdout).strip().splitlines()[-3:]
        if timed_out:
            tail.append(f"timed out after {args.job_timeout:g} s (--job-timeout)")
        print(f"[bench] {name}/{mode}{on} batch {batch or 'default'} FAILED:\n" + "\n".join(tail), flush=True)
        oom = "OutOfMemoryError" in (stderr or "")
        return Result(name, mode, 0, 0, 0, 0, 0, 0, 0, 0, error="out of memory" if oom else " ".join(tail)[-200:],
                      batch=batch, budget_gib=budget, devices=devices)  # fmt: skip
    result = Result(**json.loads(line[len("RESULT ") :]))
    result.budget_gib = budget
    total = " (all ranks)" if devices > 1 else ""
    print(
        f"[bench] {name}/{mode}{on} batch {result.batch}: {result.tokens_per_s:,.0f} tokens/s{total}, peak "
        f"{result.peak_gib:.2f} GiB, load {result.load_s:.0f}s / {result.load_peak_gib:.2f} GiB "
        f"({time.perf_counter() - started:.0f}s)",
        flush=True,
    )
    return result


def _run(cmd: list[str], timeout: float) -> tuple[str, str, bool]:
    """Runs ``cmd`` in a process group of its own (it and every rank it launches) and kills the whole
    group at the deadline, on Ctrl-C, and once it is done (no rank outlives its job).

    Returns:
        stdout, stderr, and whether the deadline killed it.
    """
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        return stdout, stderr, False
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        stdout, stderr = proc.communicate()
        return stdout, stderr, True
    finally:
        _kill_group(proc)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _best_reference_under(args, name: str, mode: str, directory: Path, budget: float) -> list[Result]:
    """The reference can only raise its batch: measure two batches, extrapolate the peak linearly, run the
    largest batch predicted to fit, and keep the rows that stayed within the budget."""
    b0 = MODELS[name]["batch"]
    rows = [
        _run_job(args, name, mode, directory, b0, budget),
        _run_job(args, name, mode, directory, 2 * b0, budget),
    ]
    ok = [r for r in rows if not r.error]
    if len(ok) == 2 and ok[1].peak_gib > ok[0].peak_gib:
        per_seq = (ok[1].peak_gib - ok[0].peak_gib) / b0
        fit = int(b0 + (budget - ok[0].peak_gib) / per_seq)
        if fit > 2 * b0:
            rows.append(_run_job(args, name, mode, directory, fit, budget))
    for r in rows:
        if not r.error and r.peak_gib > budget:
            r.error = f"over budget: peak {r.peak_gib:.2f} GiB"
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="7b,1b", help="comma-separated: 7b, 1b, tiny")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated of {MODES}")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--max-memory-gib",
        type=float,
        default=None,
        help="GPU memory budget: ours runs activation_checkpointing=auto under it; the reference runs the "
        "largest batch that fits it (it can only raise its batch)",
    )
    parser.add_argument(
        "--cpu", action="store_true", help="tiny model on CPU: checks the harness, numbers mean nothing"
    )
    parser.add_argument(
        "--cache", default=None, help="where the random checkpoints are saved (default: a temp dir)"
    )
    parser.add_argument(
        "--devices",
        default="1",
        help="data-parallel GPUs: N runs every mode on 1 and on N GPUs (a list, e.g. 2,4, on 1 and each), "
        "with the same batch per GPU; the table adds tokens/s summed over ranks and the scaling efficiency",
    )
    parser.add_argument(
        "--strategy",
        default="ddp",
        help="with --devices > 1: ddp (ours: Lightning's DDP; the reference: torch DDP under torchrun)",
    )
    parser.add_argument(
        "--job-timeout",
        type=float,
        default=3600.0,
        help="seconds one (model, mode) job may take; then it and its ranks are killed and its row says so",
    )
    parser.add_argument("--report", default=None, help="append the table to this markdown file")
    parser.add_argument("--json", default=None, help="write the results as JSON here")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mode:
        return worker(args)
    if args.cpu:
        args.models = "tiny"
        if args.modes == ",".join(MODES):
            args.modes = "ours,ours16,peft16"  # bitsandbytes' PEFT path needs CUDA in transformers
    elif not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or pass --cpu for the harness check")
    models = args.models.split(",")
    modes = args.modes.split(",")
    for name in models:
        if name not in MODELS:
            parser.error(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    for mode in modes:
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r}; choose from {MODES}")
    if args.max_memory_gib is not None and not args.max_memory_gib > 0:
        parser.error(f"--max-memory-gib={args.max_memory_gib} must be positive")
    if not args.job_timeout > 0:
        parser.error(f"--job-timeout={args.job_timeout} must be a positive number of seconds")
    counts = _device_counts(parser, args)

    cache = Path(args.cache) if args.cache else Path(tempfile.mkdtemp(prefix="qlora-bench-"))
    device = torch.device("cpu") if args.cpu else torch.device("cuda", 0)
    budget = args.max_memory_gib or 0.0
    results: list[Result] = []
    for name in models:
        directory = cache / name
        started = time.perf_counter()
        prepare_checkpoint(name, directory, device)
        print(
            f"[bench] {name}: checkpoint ready in {time.perf_counter() - started:.0f}s at {directory}",
            flush=True,
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
        for mode in modes:
            if budget and mode.startswith("peft"):
                results += _best_reference_under(args, name, mode, directory, budget)
            else:
                results.append(_run_job(args, name, mode, directory, budget=budget))
            for n in counts[1:]:
                results.append(_run_job(args, name, mode, directory, devices=n))

    card = torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "CPU"
    header = (
        f"card: {card}; {_versions()}; python {platform.python_version()}\n"
        f"command: python -m lightning_qlora.bench {' '.join(argv if argv is not None else sys.argv[1:])}\n"
    )
    text = header + "\n" + table(results) + "\n"
    print("\n" + text)
    if args.report:
        with open(args.report, "a") as fh:
            fh.write(f"\n### {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n{text}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2))
    if any(r.error and not r.budget_gib for r in results):
        sys.exit(1)


def _device_counts(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[int]:
    """``--devices``: the device counts to measure, 1 always first (the base of the scaling efficiency)."""
    try:
        asked = [int(x) for x in str(args.devices).split(",") if x.strip()]
    except ValueError:
        asked = []
    if not asked or min(asked) < 1:
        parser.error(f"--devices={args.devices!r} must be a number of GPUs (>= 1) or a list like 2,4")
    if args.strategy != "ddp":
        if "fsdp" in str(args.strategy).lower():
            parser.error("--strategy fsdp: FSDP with QLoRA is not supported yet; use --strategy ddp")
        parser.error(f"--strategy {args.strategy!r} is not supported; use --strategy ddp")
    counts = sorted({1, *asked})
    if len(counts) > 1 and args.max_memory_gib is not None:
        parser.error("--max-memory-gib measures one GPU; leave it out with --devices > 1")
    have = torch.cuda.device_count()
    if not args.cpu and counts[-1] > have:
        parser.error(f"--devices {counts[-1]} but this machine has {have} CUDA GPU(s); use --devices {have}")
    return counts


if __name__ == "__main__":
    main()
