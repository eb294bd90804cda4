"""What every runner of the benchmark shares: the models, the row a job reports, and how a job measures itself.

A job (one model, mode, device count and strategy) runs in a process of its own (:mod:`lightning_qlora.bench`
starts it); the runners (:mod:`.bench_ours`, :mod:`.bench_reference`) fill a :class:`Result` with what that
process measured, and :func:`combine_ranks` folds the ranks of a multi-GPU job into one row.
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor

from .host_memory import host_peak_rss

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
    # Written as a random 4-bit checkpoint only (``four_bit``): in 16-bit it would be 138 GB, more than the
    # GPU machine's disk, so the 16-bit modes do not run on it.
    "70b": dict(
        label="Llama-2-70B (8192 d, 80 layers, 64/8 heads, 32k vocab; 4-bit checkpoint)",
        config=dict(
            vocab_size=32000,
            hidden_size=8192,
            intermediate_size=28672,
            num_hidden_layers=80,
            num_attention_heads=64,
            num_key_value_heads=8,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        ),
        batch=1,
        seq=2048,
        four_bit=True,
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
        cpu=True,
    ),
}
# The 70b path at the tiny size: the same writer makes its 4-bit checkpoint, the same loaders train from it.
MODELS["tiny-4bit"] = dict(
    MODELS["tiny"], label="tiny Llama as a random 4-bit checkpoint (the 70b path on CPU)", four_bit=True
)
MODES = ("ours", "ours16", "peft", "peft_noac", "peft16")
SIXTEEN_BIT_MODES = ("ours16", "peft16")
LORA = dict(r=16, alpha=32)
LR = 1e-4
# The parent's wall-clock time when it started a job, passed down to every process of the job: the start
# of "time to first step".
T0_ENV = "QLORA_BENCH_T0"


@dataclass
class Result:
    """One row of the benchmark: a (model, mode, batch, budget, devices, strategy) job.

    Fields left ``None`` were not measured by the job (the table leaves their column out when no row has
    them). With ``devices > 1`` tokens are summed over the ranks; peaks, step and load times are the worst
    rank's (:func:`combine_ranks`).
    """

    model: str
    mode: str
    tokens_per_step: int
    tokens_per_s: float
    step_s: float
    peak_gib: float  # torch.cuda.max_memory_allocated while training
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
    strategy: str = ""  # with devices > 1: "ddp" or "fsdp"
    peak_reserved_gib: float | None = None  # torch.cuda.max_memory_reserved while training
    host_rss_gib: float | None = None  # the job process's peak resident memory (a rank's, the largest)
    host_anon_gib: float | None = None  # its peak allocated (anonymous) resident memory, sampled
    host_file_gib: float | None = None  # its peak resident pages of mapped files (a checkpoint read), sampled
    load_host_gib: float | None = None  # resident memory gained while loading (peak minus at the start)
    first_step_s: float | None = None  # from the job's start to the end of its first optimizer step
    est_gib: float | None = None  # lightning_qlora.memory's estimate of peak_gib (ours only)
    grad_bytes: int | None = None  # gradient bytes a rank hands to its collectives per step
    grad_bytes_measured: bool = False  # True: counted at the collective; False: trainable bytes, counted
    flops_per_token: float | None = None  # bench_flops.flops_per_token of the model (set by the parent)
    peak_share: float | None = None  # per-GPU FLOP/s over the measured bf16 matmul peak (set by the parent)


def gib(n: float) -> float:
    return n / 2**30


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_allocated(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else 0


def peak_reserved(device: torch.device) -> int:
    return torch.cuda.max_memory_reserved() if device.type == "cuda" else 0


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def job_start() -> float:
    """When this job started (``time.time()``): the parent's launch time, else this process's own start."""
    if os.environ.get(T0_ENV):
        return float(os.environ[T0_ENV])
    import psutil

    return psutil.Process().create_time()


def batches(model: str, n: int, device: torch.device, batch: int = 0, seed: int = 0) -> list[Tensor]:
    """``n`` batches of random token ids of the model's shape (``batch`` rows, default the model's)."""
    spec = MODELS[model]
    g = torch.Generator().manual_seed(seed)
    vocab = spec["config"]["vocab_size"]
    shape = (batch or spec["batch"], spec["seq"])
    return [torch.randint(0, vocab, shape, generator=g).to(device) for _ in range(n)]


def make_result(
    model: str,
    mode: str,
    times: list[float],
    losses: list[float],
    load: dict[str, float],
    device: torch.device,
    batch: int = 0,
    first_step_s: float | None = None,
) -> Result:
    """The row of one process from its timed steps (median), losses and the memory peaks since the last reset.

    Raises:
        FloatingPointError: a non-finite loss: a fast but wrong run is no result.
    """
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
        peak_gib=gib(peak_allocated(device)),
        load_s=load.get("s", float("nan")),
        load_peak_gib=gib(load.get("peak", 0)),
        loss_first=losses[0],
        loss_last=losses[-1],
        batch=batch,
        peak_reserved_gib=gib(peak_reserved(device)),
        host_rss_gib=gib(host_peak_rss()),
        first_step_s=first_step_s,
    )


def combine_ranks(result: Result, devices: int) -> Result | None:
    """One row for a data-parallel run: on rank 0 the ranks' rows combined, None on the others.

    tokens/s and tokens per step are summed over the ranks; the step time, the peaks (GPU and host), the
    load time and the time to the first step are the worst rank's (the step waits for the slowest, the
    largest peak is what must fit a GPU); the losses are the ranks' mean; the gradient bytes a rank's.
    """
    if devices == 1:
        return result
    import torch.distributed as dist

    world = dist.get_world_size()
    if world != devices:
        raise RuntimeError(f"{devices} devices asked for, but the process group has {world} ranks")
    rows: list[Any] = [None] * world
    dist.all_gather_object(rows, asdict(result))
    dist.barrier()  # every rank has its rows before any rank moves on (see the worker: no teardown follows)
    if dist.get_rank() != 0:
        return None
    ranks = [Result(**row) for row in rows]

    def worst(field: str) -> float | None:
        values = [getattr(r, field) for r in ranks if getattr(r, field) is not None]
        return max(values) if values else None

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
        peak_reserved_gib=worst("peak_reserved_gib"),
        host_rss_gib=worst("host_rss_gib"),
        host_anon_gib=worst("host_anon_gib"),
        host_file_gib=worst("host_file_gib"),
        load_host_gib=worst("load_host_gib"),
        first_step_s=worst("first_step_s"),
        grad_bytes=worst("grad_bytes"),
    )


# --------------------------------------------------------------------------------- gradient traffic


class GradientTraffic:
    """Bytes of gradients this rank hands to its collectives in a step, counted at the collective.

    * DDP: :meth:`hook` is a DDP comm hook (``register_comm_hook(traffic, GradientTraffic.hook)``) that
      counts each bucket's flattened gradients and then runs DDP's own all-reduce.
    * FSDP (FSDP1 and FSDP2): :meth:`count_reduce_scatters` wraps ``torch.distributed``'s reduce-scatter,
      which both call with each unit's gradients flattened (padded to a multiple of the ranks) into one
      input; for the rest of the process (a job's process, which ends with its run).

    A collective's payload is counted once; what its algorithm puts on the wire (a ring all-reduce sends
    about twice its payload) is not modelled.
    """

    def __init__(self) -> None:
        self.bytes = 0
        self.per_step: list[int] = []

    def step_done(self) -> None:
        self.per_step.append(self.bytes)
        self.bytes = 0

    def last_step(self) -> int | None:
        return self.per_step[-1] if self.per_step else None

    # Unannotated on purpose: DDP's register_comm_hook compares a hook's annotations with dist.GradBucket
    # and Future[Tensor] and refuses the strings that ``from __future__ import annotations`` makes.
    @staticmethod
    def hook(state, bucket):
        """DDP's default all-reduce (``default_hooks.allreduce_hook``), counting the bucket's bytes in ``state``."""
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        buffer = bucket.buffer()
        state.bytes += buffer.numel() * buffer.element_size()
        return default_hooks.allreduce_hook(None, bucket)

    def count_reduce_scatters(self) -> None:
        """Counts every reduce-scatter input from now on (torch >= 2.13 names it ``reduce_scatter_single``,
        older ones ``reduce_scatter_tensor``; each name is wrapped once, so a call is counted once)."""
        import torch.distributed as dist

        for name in ("reduce_scatter_single", "reduce_scatter_tensor"):
            real = getattr(dist, name, None)
            if real is None or getattr(real, "_bench_counted", False):
                continue
            setattr(dist, name, self._counting(real))

    def _counting(self, real: Any) -> Any:
        def reduce_scatter(output: Tensor, input: Tensor, *args: Any, **kwargs: Any) -> Any:
            self.bytes += input.numel() * input.element_size()
            return real(output, input, *args, **kwargs)

        reduce_scatter._bench_counted = True
        return reduce_scatter


def trainable_bytes(module: torch.nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of the trainable parameters (whole: a sharded DTensor counts its global size), in their own
    dtype or in ``dtype`` (the dtype FSDP reduces in)."""
    size = torch.empty((), dtype=dtype).element_size() if dtype is not None else None
    return sum(p.numel() * (size or p.element_size()) for p in module.parameters() if p.requires_grad)


def set_grad_bytes(result: Result, traffic: GradientTraffic, fallback: int) -> None:
    """The measured bytes of the last step when the collective was seen, else ``fallback`` (counted)."""
    measured = traffic.last_step()
    result.grad_bytes = measured if measured else fallback
    result.grad_bytes_measured = bool(measured)
