"""Side-by-side speed and memory: our plugin in a real Trainer against the PEFT + bitsandbytes stack.

    python -m lightning_qlora.bench                      # 7B and 1B Llama architectures, every mode (GPU)
    python -m lightning_qlora.bench --models 1b --modes ours,peft
    python -m lightning_qlora.bench --models 70b --prepare-only --cache /data/bc   # 70b's checkpoint, once
    python -m lightning_qlora.bench --models 70b --modes ours,peft --cache /data/bc   # Llama-2-70B, one GPU
    python -m lightning_qlora.bench --cpu                # a tiny configuration; checks the harness only
    python -m lightning_qlora.bench --models 1b --modes ours,peft --devices 2 --strategy ddp,fsdp

Every (model, mode) runs in a fresh process on the same saved random-initialised checkpoint, with
the same LoRA (r=16, alpha=32, all linear layers, no dropout), sequence length, batch, gradient
checkpointing and optimizer (AdamW, lr 1e-4). Reported per row: median tokens/s over the timed steps
after warm-up; its share of the card's bf16 matmul peak (measured at the start of the same call:
8192^3 products; FLOPs per token as ``bench_flops.flop_terms`` counts them); the peak of
``torch.cuda.max_memory_allocated`` and ``max_memory_reserved`` while training; the job process's peak
host memory (VmHWM; and, sampled from training's setup on, the peaks of its allocated and its mapped-file
memory apart, and what loading added); the time from the job's start to the end of its first optimizer step (imports,
loading, quantizing and compiling included); and time and peak memory to load and quantize the model.
``--estimate`` adds ``lightning_qlora.memory``'s estimate of our peak.

Modes:
    ours      QLoRAPrecision (NF4 + double quant, bf16 compute) through ``L.Trainer``
    ours16    the same plugin with ``quant=None`` (16-bit LoRA)
              (both with each decoder block compiled on CUDA, as ``CausalLMModule(compile="auto")``
              does; ``QLORA_BENCH_COMPILE=0|1`` overrides, and the table says which ran compiled)
    peft      transformers ``BitsAndBytesConfig`` + ``prepare_model_for_kbit_training`` + PEFT LoRA,
              run under bf16 autocast as the HF Trainer does with ``bf16=True`` (the reference)
    peft_noac the same without autocast
    peft16    PEFT LoRA on the bf16 model under autocast (16-bit LoRA, the reference's ceiling)

70b (Llama-2-70B: 8192 d, 80 layers, 64 heads / 8 KV heads, FFN 28672, 32k vocab, untied; batch 1 x 2048):
its 16-bit weights (138 GB) never exist. Its checkpoint is written at random directly in 4-bit
(``checkpoint4bit_write.write_random_4bit_checkpoint``: each weight initialised on the GPU, quantized and
written in turn; ~37 GB on disk under ``--cache``), and both stacks train from that one directory as
from a hub ``...-bnb-4bit`` checkpoint: ours through the app's path (``model.name_or_path=<dir>``; the
loader places the packed weights as they are), the reference through transformers' ``from_pretrained``.
So 70b runs ``ours``, ``peft`` and ``peft_noac``; the 16-bit modes are listed as not run. ``tiny-4bit``
is the same path at the tiny size, for ``--cpu``.

More than one GPU (``--devices N``, ``--strategy ddp|fsdp|ddp,fsdp``): every mode also runs on N GPUs
with the same batch per GPU.
    ddp   ours through Lightning's ``Trainer(devices=N, strategy="ddp")`` (its launcher starts the other
          ranks); the reference under plain ``torch.nn.parallel.DistributedDataParallel``.
    fsdp  ours through ``Trainer(strategy=lightning_qlora.FSDP2Strategy())`` (FSDP2: each decoder layer
          ``fully_shard``-ed, the 4-bit weights sharded as uint8); the reference under torch FSDP1 as HF
          documents FSDP-QLoRA (``bnb_4bit_quant_storage=torch.bfloat16``, PEFT's
          ``fsdp_auto_wrap_policy``, bf16 ``MixedPrecision``, ``use_orig_params=False``: see
          ``bench_reference``). The reference cannot shard 70b's uint8-stored checkpoint: not run.
The reference's ranks are launched with ``torchrun --standalone --nproc_per_node=N``
(``python -m torch.distributed.run``), as PEFT's users run a training script of their own. A row of N
GPUs reports tokens/s summed over the ranks, the peaks of the GPU (and host process) that peaked
highest, the slowest rank's step time, the scaling efficiency (its tokens/s over N times the 1-GPU row
of the same call) and the gradient bytes a rank communicated per step: under DDP measured by a comm hook
wrapping DDP's all-reduce (each bucket's bytes), under FSDP measured at ``torch.distributed``'s
reduce-scatter (each unit's flattened, padded gradients), a count of the trainable bytes (marked ``*``)
where no collective was seen. ``--cpu --devices 2`` runs the same on CPU processes (gloo) to check the
harness. A job runs in a process group of its own, killed with every rank it started after
``--job-timeout`` seconds (its row then says so).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .bench_common import MODELS, MODES, SIXTEEN_BIT_MODES, T0_ENV, Result
from .bench_flops import layer_linears, matmul_peak
from .bench_ours import app_overrides, compute_dtype, run_ours
from .bench_reference import run_peft
from .bench_report import NOT_RUN, annotate, failed, scaling_efficiency, table

__all__ = [
    "MODELS",
    "MODES",
    "Result",
    "app_overrides",
    "job_command",
    "main",
    "prepare_checkpoint",
    "run_ours",
    "run_peft",
    "scaling_efficiency",
    "table",
]
STRATEGIES = ("ddp", "fsdp")


def prepare_checkpoint(model: str, directory: Path, device: torch.device) -> None:
    """The random-initialised checkpoint every mode of ``model`` loads, saved once in ``directory``.

    A 16-bit model is built on ``device`` and saved with ``save_pretrained``. A ``four_bit`` one (70b) is
    written by ``write_random_4bit_checkpoint`` one weight at a time, quantized on ``device`` with the
    app's default quantization (``quant=nf4_dq``) and the bench's compute dtype, so it never exists in
    16-bit anywhere.

    Raises:
        SystemExit: the disk under ``directory`` cannot hold the 4-bit checkpoint.
    """
    import transformers

    if (directory / "config.json").exists():
        return
    spec = MODELS[model]
    config = transformers.LlamaConfig(**spec["config"])
    if spec.get("four_bit"):
        from .checkpoint4bit_write import write_random_4bit_checkpoint
        from .nf4 import QuantConfig

        check_disk(model, directory)
        write_random_4bit_checkpoint(
            config,
            directory,
            device=device,
            quant=QuantConfig(compute_dtype=compute_dtype(device)),
            seed=0,
            max_shard_size="5GB",
            progress=device.type == "cuda",  # minutes for 70b: show the bar (stderr)
        )
        return
    torch.manual_seed(0)
    with torch.device(device):
        lm = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    lm.save_pretrained(directory)


def checkpoint_bytes(model: str) -> int:
    """About what ``model``'s 4-bit checkpoint takes on disk: NF4 + double quant at 4.127 bits per linear
    weight, embeddings, head and norms in 16-bit."""
    c = MODELS[model]["config"]
    linear = c["num_hidden_layers"] * sum(a * b for a, b in layer_linears(c))
    dense = c["vocab_size"] * c["hidden_size"] * (1 if c.get("tie_word_embeddings") else 2)
    dense += (2 * c["num_hidden_layers"] + 1) * c["hidden_size"]
    return int(linear * 4.127 / 8 + 2 * dense)


def check_disk(model: str, directory: Path) -> None:
    """Stops before writing a checkpoint the disk cannot hold (a full disk half-way through 70b costs minutes)."""
    need = checkpoint_bytes(model)
    parent = next(p for p in [directory, *directory.parents] if p.exists())
    free = shutil.disk_usage(parent).free
    if free < 1.05 * need:
        raise SystemExit(
            f"--cache: {model}'s 4-bit checkpoint needs about {need / 2**30:.1f} GiB, but {parent} has "
            f"{free / 2**30:.1f} GiB free; point --cache at a disk with room, or free some"
        )


def worker(args: argparse.Namespace) -> None:
    """One job's process (or one rank of it): runs its mode and prints its row as ``RESULT {json}``."""
    device = torch.device("cuda", 0) if not args.cpu else torch.device("cpu")
    directory = Path(args.checkpoint)
    devices = int(args.devices)
    if args.mode in ("ours", "ours16"):
        result = run_ours(
            args.models, directory, device, args.steps, args.warmup, args.mode == "ours", args.batch,
            args.max_memory_gib or 0.0, devices, args.strategy,
        )  # fmt: skip
    else:
        result = run_peft(
            args.models,
            directory,
            device,
            args.steps,
            args.warmup,
            args.mode,
            args.batch,
            devices,
            args.strategy,
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


def job_command(
    args: argparse.Namespace,
    name: str,
    mode: str,
    directory: Path,
    batch: int = 0,
    budget: float = 0.0,
    devices: int = 1,
    strategy: str = "ddp",
) -> list[str]:
    """The command of one job: this module in worker mode; for the reference on several devices, under
    ``torchrun --standalone --nproc_per_node=N`` (ours starts as one process: Lightning launches the rest)."""
    cmd = [sys.executable, "-m", "lightning_qlora.bench", "--mode", mode, "--models", name,
           "--checkpoint", str(directory), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--batch", str(batch)]  # fmt: skip
    if budget and mode in ("ours", "ours16"):
        cmd += ["--max-memory-gib", str(budget)]
    if args.cpu:
        cmd.append("--cpu")
    if devices > 1:
        cmd += ["--devices", str(devices), "--strategy", strategy]
        if mode.startswith("peft"):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={devices}",
                   *cmd[1:]]  # fmt: skip
    return cmd


def _run_job(args: argparse.Namespace, name: str, mode: str, directory: Path, batch: int = 0,
             budget: float = 0.0, devices: int = 1, strategy: str = "ddp") -> Result:  # fmt: skip
    """One (model, mode[, batch][, budget][, devices, strategy]) in a fresh process; a failure becomes a row,
    not a crash."""
    cmd = job_command(args, name, mode, directory, batch, budget, devices, strategy)
    on = f" on {devices} devices ({strategy})" if devices > 1 else ""
    started = time.perf_counter()
    stdout, stderr, timed_out = _run(cmd, args.job_timeout, {T0_ENV: repr(time.time())})
    line = next((ln for ln in stdout.splitlines() if ln.startswith("RESULT ")), None)
    if os.environ.get("QLORA_BENCH_PROFILE"):  # the worker's profile table is on its stdout
        print("\n".join(ln for ln in stdout.splitlines() if not ln.startswith("RESULT ")), flush=True)
    if line is None:
        tail = (stderr or stdout).strip().splitlines()[-3:]
        if timed_out:
            tail.append(f"timed out after {args.job_timeout:g} s (--job-timeout)")
        log = _failure_log(directory, mode, batch, devices, strategy, stdout, stderr)
        print(f"[bench] {name}/{mode}{on} batch {batch or 'default'} FAILED (whole output: {log}):\n"
              + "\n".join(tail), flush=True)  # fmt: skip
        oom = "OutOfMemoryError" in (stderr or "")
        return Result(name, mode, 0, 0, 0, 0, 0, 0, 0, 0, error="out of memory" if oom else " ".join(tail)[-200:],
                      batch=batch, budget_gib=budget, devices=devices,
                      strategy=strategy if devices > 1 else "")  # fmt: skip
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


def _failure_log(
    directory: Path, mode: str, batch: int, devices: int, strategy: str, stdout: str, stderr: str
) -> Path:
    """A failed job's whole stdout and stderr, next to its model's checkpoint: the table keeps only the last lines."""
    where = directory.parent if os.access(directory.parent, os.W_OK) else Path(tempfile.gettempdir())
    parts = [
        directory.name,
        mode,
        f"b{batch}" if batch else "",
        f"{devices}x{strategy}" if devices > 1 else "",
    ]
    path = where / ("failed-" + "-".join(p for p in parts if p) + ".log")
    path.write_text(f"$ stdout\n{stdout}\n$ stderr\n{stderr}")
    return path


def _not_run(name: str, mode: str, why: str, devices: int = 1, strategy: str = "") -> Result:
    print(
        f"[bench] {name}/{mode}{f' on {devices} devices ({strategy})' if devices > 1 else ''}: not run, {why}"
    )
    return Result(name, mode, 0, 0, 0, 0, 0, 0, 0, 0, error=NOT_RUN + why, devices=devices, strategy=strategy)


def skip_reason(name: str, mode: str, devices: int = 1, strategy: str = "") -> str | None:
    """Why ``mode`` does not run on ``name`` (with this many devices and strategy), or None when it does."""
    if MODELS[name].get("four_bit") and mode in SIXTEEN_BIT_MODES:
        return f"{name} exists only as a 4-bit checkpoint (its 16-bit weights are never written)"
    if MODELS[name].get("four_bit") and devices > 1 and strategy == "fsdp" and mode.startswith("peft"):
        return (
            "FSDP1 needs the 4-bit weights stored in bf16 (bnb_4bit_quant_storage), this checkpoint has uint8"
        )
    return None


def _run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> tuple[str, str, bool]:
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
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
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


def _ours_under(args, name: str, mode: str, directory: Path, budget: float) -> list[Result]:
    """Ours under a budget, at the model's batch and at twice it (the reference may raise its batch too):
    ``activation_checkpointing=auto`` picks the checkpointing for each; a batch it cannot fit says so."""
    b0 = MODELS[name]["batch"]
    return _over_budget([_run_job(args, name, mode, directory, b, budget) for b in (b0, 2 * b0)], budget)


def _over_budget(rows: list[Result], budget: float) -> list[Result]:
    """``rows``, each that peaked above ``budget`` marked as an error (not a result under the budget)."""
    for r in rows:
        if not r.error and r.peak_gib > budget:
            r.error = f"over budget: peak {r.peak_gib:.2f} GiB"
    return rows


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
    return _over_budget(rows, budget)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_qlora.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--models", default=None, help=f"comma-separated of {sorted(MODELS)} (default 7b,1b; with --cpu tiny)"
    )
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated of {MODES}")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--max-memory-gib",
        type=float,
        default=None,
        help="GPU memory budget: ours runs activation_checkpointing=auto under it at the model's batch and "
        "twice it; the reference runs the largest batch that fits it (it can only raise its batch)",
    )
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="tiny models on CPU (tiny, tiny-4bit): checks the harness, numbers mean nothing",
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
        help="with --devices > 1: ddp, fsdp, or ddp,fsdp for both (ours: Lightning's DDP / FSDP2Strategy; the "
        "reference: torch DDP / FSDP1 as HF's FSDP-QLoRA, under torchrun)",
    )
    parser.add_argument(
        "--prepare-only",
        action="store_true",
        help="write the models' checkpoints under --cache and stop (70b's takes minutes: a step of its own)",
    )
    parser.add_argument(
        "--estimate",
        action="store_true",
        help="add a column with lightning_qlora.memory's estimate of our rows' peak (n/a where it has none)",
    )
    parser.add_argument(
        "--job-timeout",
        type=float,
        default=3600.0,
        help="seconds one (model, mode) job may take; then it and its ranks are killed and its row says so",
    )
    parser.add_argument(
        "--skip-one-device",
        action="store_true",
        help="with --devices N: measure the N-device rows only (no scaling efficiency: its base is missing)",
    )
    parser.add_argument("--report", default=None, help="append the table to this markdown file")
    parser.add_argument("--json", default=None, help="write the results as JSON here")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=0, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.mode:
        return worker(args)
    if not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or pass --cpu for the harness check")
    models = (args.models or ("tiny" if args.cpu else "7b,1b")).split(",")
    modes = args.modes.split(",")
    for name in models:
        if name not in MODELS:
            parser.error(f"unknown model {name!r}; choose from {sorted(MODELS)}")
        if args.cpu and not MODELS[name].get("cpu"):
            cpu_models = sorted(n for n, s in MODELS.items() if s.get("cpu"))
            parser.error(f"--models {name} is a GPU model; with --cpu use {' or '.join(cpu_models)}")
    for mode in modes:
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r}; choose from {MODES}")
    if args.max_memory_gib is not None and not args.max_memory_gib > 0:
        parser.error(f"--max-memory-gib={args.max_memory_gib} must be positive")
    if not args.job_timeout > 0:
        parser.error(f"--job-timeout={args.job_timeout} must be a positive number of seconds")
    counts = _device_counts(parser, args)
    strategies = _strategies(parser, args, counts)

    cache = Path(args.cache) if args.cache else Path(tempfile.mkdtemp(prefix="qlora-bench-"))
    device = torch.device("cpu") if args.cpu else torch.device("cuda", 0)
    budget = args.max_memory_gib or 0.0
    if args.prepare_only:
        for name in models:
            _prepare(name, cache, device)
        return
    # The card's matmul rate, measured now, on an idle GPU, by this call: the "% matmul peak" of every row.
    peak_flops, peak_label = matmul_peak(device)
    print(f"[bench] matrix products ({peak_label}): {flop_rate(peak_flops)}", flush=True)
    results: list[Result] = []
    for name in models:
        directory = _prepare(name, cache, device)
        for mode in modes:
            why = skip_reason(name, mode)
            if why:
                results.append(_not_run(name, mode, why))
                continue
            if budget and mode.startswith("peft"):
                results += _best_reference_under(args, name, mode, directory, budget)
            elif budget:
                results += _ours_under(args, name, mode, directory, budget)
            elif not args.skip_one_device:
                results.append(_run_job(args, name, mode, directory, budget=budget))
            for n in counts[1:]:
                for strategy in strategies:
                    why = skip_reason(name, mode, n, strategy)
                    if why:
                        results.append(_not_run(name, mode, why, n, strategy))
                    else:
                        results.append(_run_job(args, name, mode, directory, devices=n, strategy=strategy))
    annotate(results, peak_flops)

    card = torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "CPU"
    header = (
        f"card: {card}; {_versions()}; python {platform.python_version()}\n"
        f"command: python -m lightning_qlora.bench {' '.join(argv if argv is not None else sys.argv[1:])}\n"
        f"matrix products ({peak_label}), measured by this call: {flop_rate(peak_flops)}; FLOPs per "
        "token: bench_flops.flop_terms (6N + 4Vh + 8A + 16Lsq, full checkpointing)\n"
    )
    notes = ""
    if any(r.grad_bytes is not None and not r.grad_bytes_measured for r in results):
        notes = "\n\\* trainable bytes counted: no collective was seen to measure\n"
    text = header + "\n" + table(results, estimate=args.estimate) + "\n" + notes
    print("\n" + text)
    if args.report:
        with open(args.report, "a") as fh:
            fh.write(f"\n### {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n{text}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2))
    if any(failed(r) and not r.budget_gib for r in results):
        sys.exit(1)


def _prepare(name: str, cache: Path, device: torch.device) -> Path:
    directory = cache / name
    started = time.perf_counter()
    prepare_checkpoint(name, directory, device)
    print(
        f"[bench] {name}: checkpoint ready in {time.perf_counter() - started:.0f}s at {directory}", flush=True
    )
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return directory


def flop_rate(flops: float) -> str:
    return f"{flops / 1e12:,.1f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:,.1f} GFLOP/s"


def _device_counts(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[int]:
    """``--devices``: the device counts to measure, 1 always first (the base of the scaling efficiency)."""
    try:
        asked = [int(x) for x in str(args.devices).split(",") if x.strip()]
    except ValueError:
        asked = []
    if not asked or min(asked) < 1:
        parser.error(f"--devices={args.devices!r} must be a number of GPUs (>= 1) or a list like 2,4")
    counts = sorted({1, *asked})
    if len(counts) > 1 and args.max_memory_gib is not None:
        parser.error("--max-memory-gib measures one GPU; leave it out with --devices > 1")
    have = torch.cuda.device_count()
    if not args.cpu and counts[-1] > have:
        parser.error(f"--devices {counts[-1]} but this machine has {have} CUDA GPU(s); use --devices {have}")
    return counts


def _strategies(parser: argparse.ArgumentParser, args: argparse.Namespace, counts: list[int]) -> list[str]:
    """``--strategy``: the multi-device strategies to measure, in the order given."""
    asked = [s.strip().lower() for s in str(args.strategy).split(",") if s.strip()]
    bad = [s for s in asked if s not in STRATEGIES]
    if not asked or bad:
        parser.error(
            f"--strategy {args.strategy!r}: {', '.join(map(repr, bad)) or 'nothing'} is not a strategy; use "
            "ddp, fsdp or ddp,fsdp"
        )
    if len(counts) == 1 and asked != ["ddp"]:
        parser.error(f"--strategy {args.strategy} splits work over several devices; add --devices N (N > 1)")
    return list(dict.fromkeys(asked))


if __name__ == "__main__":
    main()
