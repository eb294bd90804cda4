"""One data-parallel run of ``CausalLMModule`` + ``QLoRAPrecision``, run as its own program by the tests.

pytest never becomes a DDP rank: the multi-process tests start this script, and Lightning (or torchrun)
starts its other ranks. Each rank writes ``<out>/rank<R>.json`` (its losses, post-all-reduce gradient
norms, the bytes DDP all-reduced per step, its trainable bytes, hashes of its adapters) and
``<out>/rank<R>.pt`` (its final adapters), then waits at a barrier, so once the launching process exits
every rank's files are whole.

    python multi_worker.py CKPT OUT --devices 2 --batch 4                      # 1 node x 2 processes
    python multi_worker.py CKPT OUT --devices 1 --batch 8                      # the 1-device reference
    torchrun --nnodes=2 --node_rank=0 ... multi_worker.py CKPT OUT --devices 1 --num-nodes 2

The data is a fixed list of rows, each carrying its index (``row``, which the module ignores) so the
tests can see which rows each rank trained on. Under DDP Lightning puts its own ``DistributedSampler``
under the loader; for training it always shuffles (``_process_dataloader``), seeded with
``PL_GLOBAL_SEED`` (``seed_everything(0)`` here), and hands rank ``r`` entries ``r, r + W, ...`` of one
permutation. The 1-device reference walks the same permutation (``DistributedSampler(num_replicas=1,
seed=0)``, which Lightning leaves alone), so with ``W`` processes of batch ``B / W`` each step trains on
the same ``B`` rows as the 1-device step with batch ``B``; the rows each rank saw are recorded to prove it.

The bottom of this file holds what the tests share: starting runs (each in its own process group, with
a deadline, all killed on the first failure) and the checks that compare them.
"""

import argparse
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from lightning_qlora import (
    CausalLMModule,
    FSDP2Strategy,
    LoRAConfig,
    QLoRAPrecision,
    QuantConfig,
    save_adapter,
)
from lightning_qlora.bench_common import GradientTraffic
from lightning_qlora.module import ModelConfig
from lightning_qlora.optim import OptimizerConfig
from lightning_qlora.sharding import full_tensor, gathered_adapters, is_sharded

SEQ = 64


class ByteCounter:
    """The state of :func:`counting_allreduce`: bytes handed to all-reduce, and how many buckets."""

    def __init__(self) -> None:
        self.bytes = 0
        self.buckets = 0


# No ``from __future__ import annotations`` in this file: DDP's register_comm_hook compares the hook's
# annotations with dist.GradBucket and Future[Tensor] themselves, and refuses strings.
def counting_allreduce(
    state: ByteCounter, bucket: torch.distributed.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP's own all-reduce (``default_hooks.allreduce_hook``), counting the bytes of every bucket it reduces.

    A bucket's buffer is the flattened gradients DDP sends, so the sum over a step is exactly what
    that step put on the wire (before the collective's own algorithm multiplies it).
    """
    buffer = bucket.buffer()
    state.bytes += buffer.numel() * buffer.element_size()
    state.buckets += 1
    return default_hooks.allreduce_hook(None, bucket)


def token_rows(n: int, vocab: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """``n`` rows that count up from a random start (a pattern the adapters learn within a few steps)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, vocab, (n, 1), generator=g)
    ids = (starts + torch.arange(SEQ)) % vocab
    return [
        {"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row, "row": torch.tensor(i)}
        for i, row in enumerate(ids)
    ]


def adapter_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole adapters (FSDP's shards gathered: a collective, every rank calls it)."""
    return {
        n: full_tensor(p.detach()).float().cpu().clone()
        for n, p in module.named_parameters()
        if p.requires_grad
    }


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().numpy().tobytes())
    return h.hexdigest()


class Recorder(L.Callback):
    """Per step: the local loss, the gradient norm the optimizer sees (after DDP's all-reduce), and the
    bytes the comm hook (DDP) or the reduce-scatter counter (FSDP2) counted during that step's backward."""

    def __init__(self, counter: ByteCounter | GradientTraffic, register_hook: bool) -> None:
        self.counter = counter
        self.register_hook = register_hook
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        self.step_bytes: list[int] = []
        self.rows: list[list[int]] = []
        self.initial_digest = ""
        self.cuda_start_bytes = 0
        self.device = ""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning's DDPStrategy registers ddp_comm_hook on CUDA only (DDPStrategy._register_ddp_hooks);
        # on CPU the same hook goes onto the same DDP wrapper here, before the first backward.
        if self.register_hook and isinstance(
            trainer.strategy.model, torch.nn.parallel.DistributedDataParallel
        ):
            trainer.strategy.model.register_comm_hook(self.counter, counting_allreduce)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.initial_digest = digest(adapter_tensors(pl_module))
        self.device = str(pl_module.device)  # where it trains, read while it does
        if pl_module.device.type == "cuda":  # what the GPU holds before the first step: weights and adapters
            self.cuda_start_bytes = torch.cuda.memory_allocated(pl_module.device)
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, *args: Any
    ) -> None:
        self._bytes_before = self.counter.bytes
        self.rows.append(batch["row"].tolist())

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        grads = [full_tensor(p.grad.detach()).float() for p in pl_module.parameters() if p.grad is not None]
        self.grad_norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any
    ) -> None:
        self.losses.append(outputs["loss"].item())
        self.step_bytes.append(self.counter.bytes - self._bytes_before)


def _local_bytes(param: torch.Tensor) -> int:
    local = param.to_local() if hasattr(param, "to_local") else param
    return local.numel() * local.element_size()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--batch", type=int, default=8, help="rows per process per step")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--compute-dtype", default="float32")
    parser.add_argument("--compile", default="false", choices=("auto", "true", "false"))
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--lora-r", type=int, default=4)
    parser.add_argument("--strategy", default="ddp", choices=("ddp", "fsdp2"))
    parser.add_argument("--quant-storage", default="uint8")
    parser.add_argument(
        "--rows", type=int, default=0, help="rows in the data (default: steps x batch x world)"
    )
    parser.add_argument("--save", default=None, help="trainer.save_checkpoint here at the end")
    parser.add_argument("--resume", default=None, help="trainer.fit(ckpt_path=...)")
    parser.add_argument("--adapter-dir", default=None, help="save_adapter here at the end (rank zero writes)")
    args = parser.parse_args(argv)

    world = args.devices * args.num_nodes
    cuda = args.accelerator in ("gpu", "cuda")
    counter: Any = ByteCounter()
    if args.strategy == "fsdp2":
        strategy: Any = FSDP2Strategy()
        # FSDP2 has no comm hook: the bench's counter wraps torch's reduce-scatter, which it calls with each
        # unit's gradients flattened into one input.
        counter = GradientTraffic()
        counter.count_reduce_scatters()
    elif world > 1:
        # On CUDA the hook goes in through Lightning's own strategy argument (what a user would write).
        strategy = DDPStrategy(ddp_comm_state=counter, ddp_comm_hook=counting_allreduce) if cuda else "ddp"
    else:
        strategy = "auto"
    recorder = Recorder(counter, register_hook=world > 1 and not cuda)
    compile_flag = {"auto": "auto", "true": True, "false": False}[args.compile]
    L.seed_everything(0, verbose=False)
    plugin = QLoRAPrecision(
        quant=QuantConfig(compute_dtype=args.compute_dtype, quant_storage=args.quant_storage),
        lora=LoRAConfig(r=args.lora_r, alpha=2 * args.lora_r),
    )
    module = CausalLMModule(
        ModelConfig(name_or_path=args.checkpoint, activation_checkpointing="full", attn_implementation="sdpa",
                    compile=compile_flag),
        optimizer=OptimizerConfig(lr=args.lr, scheduler="constant"),
    )  # fmt: skip
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=strategy,
        plugins=[plugin],
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[recorder],
    )
    vocab = json.loads((Path(args.checkpoint) / "config.json").read_text())["vocab_size"]
    rows = token_rows(args.rows or args.steps * args.batch * world, vocab)
    # Under DDP: a plain loader, under which Lightning puts its DistributedSampler. One process: the
    # permutation that sampler walks (seed 0 = PL_GLOBAL_SEED), as a sampler Lightning does not replace.
    sampler = None if world > 1 else torch.utils.data.DistributedSampler(rows, num_replicas=1, rank=0, seed=0)
    loader = torch.utils.data.DataLoader(rows, batch_size=args.batch, sampler=sampler)
    trainer.fit(module, loader, ckpt_path=args.resume)
    if args.save:
        trainer.save_checkpoint(args.save)
    if args.adapter_dir:
        with gathered_adapters(module):
            if trainer.is_global_zero:
                save_adapter(module, args.adapter_dir, precision=plugin)

    adapters = adapter_tensors(module)
    rank = trainer.global_rank
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(adapters, out / f"rank{rank}.pt")
    record = {
        "global_rank": rank,
        "node_rank": trainer.node_rank,
        "local_rank": trainer.local_rank,
        "world_size": trainer.world_size,
        "environment": type(getattr(trainer.strategy, "cluster_environment", None)).__name__,
        "device": recorder.device,
        "compiled": bool(getattr(module.model, "_blocks_compiled", False)),
        "losses": recorder.losses,
        "grad_norms": recorder.grad_norms,
        "step_bytes": recorder.step_bytes,
        "rows": recorder.rows,
        "buckets": getattr(counter, "buckets", 0),
        "strategy": type(trainer.strategy).__name__,
        "sharded": is_sharded(module),
        "trainable_bytes": sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad),
        "trainable_dtypes": sorted({str(p.dtype) for p in module.parameters() if p.requires_grad}),
        "frozen_bytes": sum(p.numel() * p.element_size() for p in module.parameters() if not p.requires_grad),
        # What this rank holds: under FSDP its shards (a DTensor's local part), else the whole parameter.
        "local_frozen_bytes": sum(_local_bytes(p) for p in module.parameters() if not p.requires_grad),
        "local_trainable_bytes": sum(_local_bytes(p) for p in module.parameters() if p.requires_grad),
        "cuda_start_bytes": recorder.cuda_start_bytes,
        "cuda_peak_bytes": torch.cuda.max_memory_allocated() if cuda else 0,  # this rank's device
        "initial_digest": recorder.initial_digest,
        "digest": digest(adapters),
    }
    tmp = out / f".rank{rank}.json.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, out / f"rank{rank}.json")
    trainer.strategy.barrier()  # rank 0 (the process the test waits for) exits after every rank wrote
    sys.stdout.flush()


if __name__ == "__main__":
    main()


# ----------------------------------------------------------------------------------- used by the tests
WORKER = Path(__file__).resolve()
# What an outer launcher (SLURM, torchrun, a previous test) may have left in the environment; each run
# here starts from none of it, so Lightning picks the cluster environment the run itself sets up.
_LAUNCH_VARS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK",
                "LOCAL_WORLD_SIZE", "PL_GLOBAL_SEED", "PL_SEED_WORKERS")  # fmt: skip


# A launcher's rank variables only: an image's own MPI settings (OMPI_MCA_*, e.g. what lets mpi4py, which
# Lightning's MPIEnvironment imports to detect MPI, initialise as a singleton) stay.
_LAUNCHER_PREFIXES = ("SLURM_", "TORCHELASTIC_", "PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_")


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS and not k.startswith(_LAUNCHER_PREFIXES)
    }
    # One thread per process: the 2-process and 2-node runs then do the same arithmetic in the same
    # order (Lightning would give 1 thread to each of 2 local processes, and all cores to 1).
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Starts ``cmd`` in a new process group (it and every rank it launches), output to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        return subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, env=env or clean_env(), start_new_session=True
        )


def worker_cmd(checkpoint: Path, out: Path, *args: str) -> list[str]:
    return [sys.executable, str(WORKER), str(checkpoint), str(out), *args]


def torchrun_cmd(node_rank: int, nnodes: int, port: int, *worker_args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--node_rank={node_rank}",
            "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
            str(WORKER), *worker_args]  # fmt: skip


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group this process leads: it and the ranks it started
    except ProcessLookupError:
        pass


def wait_all(procs: dict[str, tuple[subprocess.Popen, Path]], timeout: float) -> None:
    """Waits for every run; on the first failure or at the deadline kills them all and fails with the logs.

    The ranks a run launched are in its process group; they wrote their files before the final barrier,
    so once the run's own process exited they are done, and the group is reaped (killed if it lingers).
    """
    deadline = time.monotonic() + timeout
    pending = dict(procs)
    failed: list[str] = []
    while pending and not failed and time.monotonic() < deadline:
        for name, (proc, _) in list(pending.items()):
            if proc.poll() is not None:
                del pending[name]
                if proc.returncode != 0:
                    failed.append(f"{name} exited with {proc.returncode}")
        time.sleep(0.2)
    if pending and not failed:
        failed.append(f"{', '.join(pending)} still running after {timeout:.0f} s")
    for proc, _ in procs.values():
        for _ in range(50):  # a rank that is exiting gets a few seconds, then the group is killed
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            if failed:
                break
            time.sleep(0.1)
        _kill(proc)
        proc.wait()
    if failed:
        tails = "\n".join(f"--- {n} ({log}):\n" + "\n".join(log.read_text().splitlines()[-25:])
                          for n, (_, log) in procs.items())  # fmt: skip
        raise AssertionError("; ".join(failed) + "\n" + tails)


def read_ranks(out: Path, world: int) -> list[dict[str, Any]]:
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    assert [r["global_rank"] for r in ranks] == list(range(world))
    assert {r["world_size"] for r in ranks} == {world}, [r["world_size"] for r in ranks]
    return ranks


def adapter_bytes(config: dict[str, Any], r: int) -> int:
    """fp32 bytes of the LoRA weights on every linear layer of a Llama's decoder, from its config alone:
    ``r * (in + out)`` per layer (q, k, v, o, gate, up, down), 4 bytes each."""
    h, inter = config["hidden_size"], config["intermediate_size"]
    head = config.get("head_dim") or h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head, config["num_key_value_heads"] * head
    shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)]
    return 4 * r * sum(i + o for i, o in shapes) * config["num_hidden_layers"]


def check_same_training(
    one: dict[str, Any], ranks: list[dict[str, Any]], loss_rtol: float, grad_rtol: float, grad_steps: int
) -> list[str]:
    """The data-parallel ranks trained exactly the 1-process run's global batches, from the same start,
    to its losses and gradient norms, and ended with identical adapters. Returns what was measured."""
    world = len(ranks)
    assert all(r["initial_digest"] == one["initial_digest"] for r in ranks), (
        "the runs start from other adapters"
    )
    for step, rows in enumerate(one["rows"]):
        got = sorted(x for r in ranks for x in r["rows"][step])
        assert got == sorted(rows), (
            f"step {step}: the ranks trained rows {got}, the 1-process run {sorted(rows)}"
        )
    # Equal rows per rank and equal tokens per row: the global mean loss is the mean of the ranks' means.
    losses = [sum(r["losses"][s] for r in ranks) / world for s in range(len(one["losses"]))]
    loss_diff = max(abs(a / b - 1) for a, b in zip(losses, one["losses"], strict=True))
    assert loss_diff <= loss_rtol, f"losses {losses} vs {one['losses']} (1 process): rel diff {loss_diff:.2e}"
    # After DDP's all-reduce every rank holds the averaged gradient: the 1-process run's, not W times it.
    assert all(r["grad_norms"] == ranks[0]["grad_norms"] for r in ranks), "ranks saw different gradients"
    pairs = list(zip(ranks[0]["grad_norms"], one["grad_norms"], strict=True))[:grad_steps]
    grad_diff = max(abs(a / b - 1) for a, b in pairs)
    assert grad_diff <= grad_rtol, (
        f"gradient norms {ranks[0]['grad_norms']} vs {one['grad_norms']}: {grad_diff:.2e}"
    )
    digests = {r["digest"] for r in ranks}
    assert len(digests) == 1, f"the ranks ended with different adapters: {[r['digest'][:12] for r in ranks]}"
    return [
        f"losses, {world} processes vs 1 at the same global batch: max rel diff {loss_diff:.1e} "
        f"(tolerance {loss_rtol:.0e}) over {len(losses)} steps, {one['losses'][0]:.4f} -> {one['losses'][-1]:.4f}",
        f"gradient norms after all-reduce: max rel diff {grad_diff:.1e} over the first {len(pairs)} step(s) "
        f"(tolerance {grad_rtol:.0e})",
        f"adapters identical on all {world} ranks (sha256 {ranks[0]['digest'][:16]})",
    ]


def check_only_adapters_reduced(ranks: list[dict[str, Any]], config: dict[str, Any], r: int) -> str:
    """Each step every rank all-reduced exactly the adapters' fp32 gradient bytes: no frozen weight."""
    expected = adapter_bytes(config, r)
    for rank in ranks:
        assert rank["trainable_dtypes"] == ["torch.float32"], rank["trainable_dtypes"]
        assert rank["trainable_bytes"] == expected, (rank["trainable_bytes"], expected)
        assert rank["step_bytes"] == [expected] * len(rank["losses"]), (
            f"rank {rank['global_rank']} all-reduced {rank['step_bytes']} bytes per step; the adapters are "
            f"{expected} (frozen weights: {rank['frozen_bytes']})"
        )
    return (
        f"all-reduced per step: {ranks[0]['step_bytes'][0]:,} bytes in {ranks[0]['buckets'] // len(ranks[0]['losses'])} "
        f"bucket(s) = the fp32 adapters (r={r}); frozen weights ({ranks[0]['frozen_bytes']:,} bytes) never sent"
    )
