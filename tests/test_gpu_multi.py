"""DDP and FSDP2 on 2 (and 4) CUDA GPUs through Lightning: the same training as one GPU, adapters only on the wire.

Each case runs ``multi_worker.py`` twice, at once: 1 GPU with batch 8, and ``devices=2,
strategy=DDPStrategy(ddp_comm_hook=...)`` with batch 4 per GPU, over the same global batches (Lightning's
own DistributedSampler; the 1-GPU run walks the same permutation). pytest itself never becomes a rank.

Tolerances (relative), from where the two runs may legitimately differ: the 2-GPU step sums its
gradient in two halves and an all-reduce instead of one GEMM, and cuBLAS may pick other kernels for
4 rows than for 8.

- ``eager-fp32`` (fp32 compute, eager): losses 1e-4, gradient norms 1e-3 on every step. fp32 rounding
  is ~1e-7 per operation; on CPU (gloo) the same comparison agrees to 1e-7 over 8 AdamW steps.
- ``compiled-bf16`` (bf16 compute, blocks compiled: the shipped default on CUDA): losses 5e-3,
  the first step's gradient norm 1e-2. A bf16 rounding flip is 4e-3 of one activation; the mean over
  512 tokens moves far less (2e-4 over 8 steps on CPU), while the later gradient norms of a bf16
  trajectory drift by a few percent (2.3 % on CPU), so only the first is compared.

What the tolerances leave to other checks: the rows each rank trained (recorded, compared exactly),
identical adapters on both ranks (sha256), and the bytes all-reduced per step (equal to the adapters'
fp32 gradients, counted by the comm hook).

FSDP2 (``FSDP2Strategy``) is held to the same tolerances, and each GPU must hold 1/N of the 4-bit weights
and adapters (its shards, counted exactly) at N = 2 and 4; the CUDA memory allocated before the first
step is printed beside it.

Run: ``pytest -m gpu tests/test_gpu_multi.py -s`` on a machine with 2+ GPUs (skipped otherwise).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from multi_worker import (
    adapter_bytes,
    check_only_adapters_reduced,
    check_same_training,
    read_ranks,
    start,
    wait_all,
    worker_cmd,
)
from tiny import save_tiny_llama

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]

R = 4
STEPS = 8
VARIANTS = {
    # compile, compute dtype, loss rtol, gradient-norm rtol, steps whose gradient norm is compared
    "eager-fp32": ("false", "float32", 1e-4, 1e-3, STEPS),
    "compiled-bf16": ("auto", "bfloat16", 5e-3, 1e-2, 1),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_llama(path)
    return path


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_gpus_train_like_one_and_all_reduce_only_the_adapters(
    checkpoint: Path, tmp_path: Path, variant: str, strategy: str
):
    compile_flag, dtype, loss_rtol, grad_rtol, grad_steps = VARIANTS[variant]
    common = ["--accelerator", "gpu", "--steps", str(STEPS), "--lora-r", str(R), "--compute-dtype", dtype,
              "--compile", compile_flag]  # fmt: skip
    runs = {
        "1 GPU": (tmp_path / "one", ["--devices", "1", "--batch", "8"]),
        "2 GPUs": (tmp_path / "two", ["--devices", "2", "--batch", "4", "--strategy", strategy]),
    }
    procs = {
        name: (start(worker_cmd(checkpoint, out, *args, *common), out / "log.txt"), out / "log.txt")
        for name, (out, args) in runs.items()
    }
    wait_all(procs, timeout=900)
    (one,) = read_ranks(tmp_path / "one", 1)
    ranks = read_ranks(tmp_path / "two", 2)
    assert [r["device"] for r in ranks] == ["cuda:0", "cuda:1"], [r["device"] for r in ranks]
    if compile_flag == "auto":  # compile="auto" compiles on CUDA: both runs must have run compiled
        assert one["compiled"] and all(r["compiled"] for r in ranks)

    lines = check_same_training(one, ranks, loss_rtol, grad_rtol, grad_steps)
    config = json.loads((checkpoint / "config.json").read_text())
    if strategy == "ddp":
        lines.append(check_only_adapters_reduced(ranks, config, R))
    else:
        sent, adapters = ranks[0]["step_bytes"], adapter_bytes(config, R)
        assert all(adapters <= b <= 1.01 * adapters for b in sent), (
            f"reduce-scattered {sent}, adapters {adapters}"
        )
        lines.append(f"reduce-scattered {sent[0]:,} bytes/step (adapters' fp32 gradients {adapters:,})")
    for line in lines:
        print(f"[2 GPUs, {strategy}, {variant}] {line}")


@pytest.mark.parametrize("devices", [2, 4])
def test_fsdp_gives_each_gpu_a_1_over_n_share_of_the_weights(checkpoint: Path, tmp_path: Path, devices: int):
    if torch.cuda.device_count() < devices:
        pytest.skip(f"needs {devices} CUDA GPUs")
    common = ["--accelerator", "gpu", "--steps", "2", "--lora-r", str(R), "--compute-dtype", "bfloat16",
              "--batch", "2", "--strategy", "fsdp2"]  # fmt: skip
    runs = {"1": ["--devices", "1"], str(devices): ["--devices", str(devices)]}
    procs = {
        n: (start(worker_cmd(checkpoint, tmp_path / n, *args, *common), tmp_path / n / "log.txt"),
            tmp_path / n / "log.txt")
        for n, args in runs.items()
    }  # fmt: skip
    wait_all(procs, timeout=900)
    (one,) = read_ranks(tmp_path / "1", 1)
    ranks = read_ranks(tmp_path / str(devices), devices)
    for rank in ranks:
        for key in ("local_frozen_bytes", "local_trainable_bytes"):
            share = rank[key] / one[key]
            assert abs(share - 1 / devices) <= 0.02, f"rank {rank['global_rank']}: {key} share {share:.3f}"
    print(
        f"[FSDP2, {devices} GPUs] per GPU: {ranks[0]['local_frozen_bytes']:,} frozen bytes "
        f"(1 GPU: {one['local_frozen_bytes']:,}); CUDA allocated before step 1: "
        f"{[r['cuda_start_bytes'] for r in ranks]} (1 GPU: {one['cuda_start_bytes']:,}); "
        f"peaks {[r['cuda_peak_bytes'] for r in ranks]} (1 GPU: {one['cuda_peak_bytes']:,})"
    )
