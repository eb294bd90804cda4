"""FSDP2 (``FSDP2Strategy``, Lightning's ModelParallelStrategy + ``fully_shard``) on this host: CPU, gloo.

- 2 sharded processes train like 1 process at the same global batch (losses, gradient norms, adapters),
  reduce only the adapters' gradients, and each holds half of the 4-bit weights; so do 2 with compiled,
  checkpointed blocks.
- The adapter written from the sharded run (``save_adapter`` after gathering) is the 1-process file.
- A sharded checkpoint holds adapters and optimizer state only, and resumes with another number of
  processes (2 -> 1 and 1 -> 2) to the same adapters as a 1-process run resumed from its own checkpoint.
- ``lightning-qlora trainer=fsdp trainer.devices=2 trainer.accelerator=cpu`` trains end to end.

The GPU twin (NCCL, per-GPU memory at N = 1, 2, 4) is ``test_gpu_multi.py``.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import micro_overrides
from multi_worker import adapter_bytes, check_same_training, read_ranks, start, wait_all, worker_cmd
from safetensors.torch import load_file
from tiny import save_tiny_llama

R = 4
STEPS = 4
ROWS = 64  # every run walks the same permutation of the same rows, resumed runs included


def _run_all(root: Path, checkpoint: Path, runs: dict[str, list[str]]) -> None:
    common = ["--accelerator", "cpu", "--lora-r", str(R), "--rows", str(ROWS)]
    procs = {}
    for name, args in runs.items():
        out = root / name
        procs[name] = (start(worker_cmd(checkpoint, out, *common, *args), out / "log.txt"), out / "log.txt")
    wait_all(procs, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("fsdp")
    checkpoint = root / "tiny-llama"
    save_tiny_llama(checkpoint)
    one = ["--devices", "1", "--batch", "8"]
    two = ["--devices", "2", "--batch", "4"]
    first = ["--steps", str(STEPS)]
    _run_all(root, checkpoint, {
        "one": [*one, *first, "--save", str(root / "one.ckpt"), "--adapter-dir", str(root / "one-adapter")],
        "fsdp2": [*two, *first, "--strategy", "fsdp2", "--save", str(root / "fsdp2.ckpt"),
                  "--adapter-dir", str(root / "fsdp2-adapter")],
        "fsdp1": [*one, *first, "--strategy", "fsdp2", "--save", str(root / "fsdp1.ckpt")],
        "fsdp2-compiled": [*two, *first, "--strategy", "fsdp2", "--compile", "true"],
    })  # fmt: skip
    resumed = ["--steps", str(2 * STEPS)]
    _run_all(root, checkpoint, {
        "one-resumed": [*one, *resumed, "--resume", str(root / "one.ckpt")],
        "2to1": [*one, *resumed, "--strategy", "fsdp2", "--resume", str(root / "fsdp2.ckpt")],
        "1to2": [*two, *resumed, "--strategy", "fsdp2", "--resume", str(root / "fsdp1.ckpt")],
    })  # fmt: skip
    return {
        "root": root,
        "config": json.loads((checkpoint / "config.json").read_text()),
        **{name: read_ranks(root / name, 2 if name in ("fsdp2", "1to2", "fsdp2-compiled") else 1)
           for name in ("one", "fsdp2", "fsdp1", "one-resumed", "2to1", "1to2", "fsdp2-compiled")},
    }  # fmt: skip


@pytest.mark.slow
def test_two_sharded_processes_train_like_one_at_the_same_global_batch(runs):
    assert all(r["sharded"] and r["strategy"] == "FSDP2Strategy" for r in runs["fsdp2"])
    # fp32 on CPU; the same bound as DDP's (test_multinode): a rank that trained other rows, or a sum in
    # place of a mean, is 1e-3 off.
    for line in check_same_training(
        runs["one"][0], runs["fsdp2"], loss_rtol=1e-5, grad_rtol=1e-5, grad_steps=STEPS
    ):
        print(f"[FSDP2, 2 processes, CPU] {line}")


@pytest.mark.slow
def test_compiled_checkpointed_blocks_under_fsdp2_train_like_one_eager_process(runs):
    """Each block compiled with its checkpoint inside, FSDP2's gathers outside (module hooks): two sharded
    processes reach the eager one-process losses (compiled float32 on CPU differs from eager by ~1e-7)."""
    assert all(r["compiled"] and r["sharded"] for r in runs["fsdp2-compiled"])
    for line in check_same_training(
        runs["one"][0], runs["fsdp2-compiled"], loss_rtol=1e-4, grad_rtol=1e-3, grad_steps=STEPS
    ):
        print(f"[FSDP2 compiled, 2 processes, CPU] {line}")


@pytest.mark.slow
def test_each_rank_holds_half_the_weights_and_reduces_only_adapter_gradients(runs):
    one, ranks = runs["one"][0], runs["fsdp2"]
    for rank in ranks:
        # fully_shard splits dim 0 in 2 (padding the last shard): each rank holds half, to a row.
        assert (
            abs(rank["local_frozen_bytes"] - one["local_frozen_bytes"] / 2)
            <= 0.01 * one["local_frozen_bytes"]
        )
        assert (
            abs(rank["local_trainable_bytes"] - one["local_trainable_bytes"] / 2)
            <= 0.01 * one["local_trainable_bytes"]
        )
    adapters = adapter_bytes(runs["config"], R)
    assert one["trainable_bytes"] == adapters
    for step, sent in enumerate(ranks[0]["step_bytes"]):
        # Every trainable gradient, whole (fp32), once per step (+ padding to a multiple of 2 rows); the
        # frozen 4-bit and 16-bit weights get no gradient and send none.
        assert adapters <= sent <= adapters * 1.01, (
            f"step {step}: {sent} bytes reduce-scattered, adapters {adapters}"
        )
    print(
        f"[FSDP2, 2 processes, CPU] per rank: {ranks[0]['local_frozen_bytes']:,} frozen bytes of "
        f"{one['local_frozen_bytes']:,}; reduce-scattered {ranks[0]['step_bytes'][0]:,} bytes/step "
        f"(adapters {adapters:,})"
    )


@pytest.mark.slow
def test_the_adapter_saved_from_a_sharded_run_is_the_one_process_file(runs):
    root = runs["root"]
    one, sharded = root / "one-adapter", root / "fsdp2-adapter"
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in sharded.iterdir())
    for name in ("adapter_config.json", "qlora_config.json"):
        assert json.loads((one / name).read_text()) == json.loads((sharded / name).read_text())
    a, b = load_file(one / "adapter_model.safetensors"), load_file(sharded / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff < 1e-5, f"adapters differ by {diff:.2e}"  # whole tensors, not one rank's shard


@pytest.mark.slow
def test_a_sharded_checkpoint_holds_adapters_only_and_resumes_on_another_process_count(runs):
    import torch.distributed.checkpoint as dcp

    from lightning_qlora.lora import is_adapter_key

    root = runs["root"]
    assert (root / "fsdp2.ckpt").is_dir() and len(list((root / "fsdp2.ckpt").glob("*.distcp"))) == 2
    keys = list(dcp.FileSystemReader(str(root / "fsdp2.ckpt")).read_metadata().state_dict_metadata)
    model_keys = [k.removeprefix("state_dict.") for k in keys if k.startswith("state_dict.")]
    assert model_keys and all(is_adapter_key(k) for k in model_keys), [
        k for k in model_keys if not is_adapter_key(k)
    ]
    reference = torch.load(root / "one-resumed" / "rank0.pt")
    for name in ("2to1", "1to2"):
        assert all(r["losses"] for r in runs[name])
        got = torch.load(root / name / "rank0.pt")
        assert got.keys() == reference.keys()
        diff = max((got[k] - reference[k]).abs().max().item() for k in got)
        # Resumed at step 4 from the same adapters and AdamW state: only the reduction order differs.
        assert diff < 1e-5, f"{name}: adapters differ from the 1-process resume by {diff:.2e}"
    assert runs["2to1"][0]["digest"] != runs["fsdp2"][0]["digest"], "the resumed run trained further"


@pytest.mark.slow
def test_the_app_trains_with_trainer_fsdp_on_two_cpu_processes(run_cli, tmp_path, monkeypatch):
    proc = run_cli("trainer=fsdp", *micro_overrides(), "trainer.devices=2", timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert out.count("lightning-qlora: finished 3 steps") == 1, "rank 0 alone prints the summary"
    run_dir = next(p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir())
    weights = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert weights and all(t.dim() == 2 and min(t.shape) == 16 for t in weights.values())  # whole, r=16
    last = run_dir / "checkpoints" / "last.ckpt"
    assert (last / "meta.pt").is_file(), "a sharded checkpoint folder (trainer.fsdp.state_dict_type=sharded)"

    # The folder resumes through the app's pre-flight with the same processes (another count resumes through
    # Lightning: test above; the app's own data position is per process)...
    proc = run_cli(
        "trainer=fsdp", *micro_overrides(), "trainer.devices=2", "trainer.max_steps=5", f"ckpt_path={last}",
        timeout=600,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "lightning-qlora: finished 5 steps" in out, out[-3000:]
    # ...another process count stops in the pre-flight (the app's data position is per process)... These
    # two stop before any process starts: the console script's entry point in this process says the same.
    monkeypatch.chdir(tmp_path)
    written = sorted((tmp_path / "outputs").rglob("*"))
    code, err = _main_refused(
        "trainer=fsdp", *micro_overrides(), "trainer.devices=1", "trainer.max_steps=5", f"ckpt_path={last}"
    )
    assert code == 2 and "the number of processes (devices) differs" in err, err[-2000:]
    assert "Traceback" not in err
    # ...and a run that does not shard is told how to resume it, in one line, before anything is written.
    code, err = _main_refused(*micro_overrides(), "trainer.max_steps=5", f"ckpt_path={last}")
    assert code == 2 and "is a sharded checkpoint folder (written under trainer=fsdp)" in err, err[-2000:]
    assert sorted((tmp_path / "outputs").rglob("*")) == written, "the refused runs wrote nothing"


def _main_refused(*args: str) -> tuple[int, str]:
    """``lightning-qlora ARGS`` in this process, for a run refused before it starts: (exit code, stderr)."""
    from lightning_qlora import train

    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
        train.main(list(args))
    return exit_info.value.code, err.getvalue()


@pytest.mark.parametrize("tied", [False, True])
def test_the_sharded_loss_takes_the_chunked_path_and_equals_the_unsharded_loss(tmp_path, tied):
    """One process (gloo): ``shard_model`` makes the head a unit of its own (a tied one gets its own copy of
    the weight), so ``causal_lm_loss`` takes the chunked path (the head gathered once for all chunks, no
    full-vocabulary logits), and it computes the unsharded model's loss and adapter gradients."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    from lightning_qlora import LoRAConfig, QLoRAPrecision, QuantConfig
    from lightning_qlora.loss import _sharded_frozen_head, causal_lm_loss, split_head
    from lightning_qlora.sharding import FSDPConfig, full_tensor, shard_model

    save_tiny_llama(tmp_path / "m", tie_word_embeddings=tied)
    import transformers

    def build():
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
        plugin = QLoRAPrecision(quant=QuantConfig(compute_dtype="float32"), lora=LoRAConfig(r=4))
        torch.manual_seed(1)  # the same adapters (A's init draws from it) in both builds
        model = plugin.convert_module(model)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
        return model

    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    reference = build()
    ref_loss, n = causal_lm_loss(reference, ids, None, ids, chunk_size=16)
    ref_loss.backward()
    ref_grads = {k: p.grad for k, p in reference.named_parameters() if p.grad is not None}

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = build()
        shard_model(model, init_device_mesh("cpu", (1,)), torch.device("cpu"), FSDPConfig())
        _, head = split_head(model)
        assert _sharded_frozen_head(head, model)
        embedding = model.get_input_embeddings()
        assert (reference.get_input_embeddings().weight is reference.lm_head.weight) == tied
        assert embedding.weight is not head.weight and isinstance(embedding, FSDPModule)
        assert not head.weight.requires_grad and not embedding.weight.requires_grad
        loss, m = causal_lm_loss(model, ids, None, ids, chunk_size=16)
        loss.backward()
        grads = {k: full_tensor(p.grad) for k, p in model.named_parameters() if p.grad is not None}
    finally:
        dist.destroy_process_group()
    assert m == n and abs(loss.item() - ref_loss.item()) < 1e-5
    assert grads.keys() == ref_grads.keys()
    assert max((grads[k] - ref_grads[k]).abs().max().item() for k in grads) < 1e-5


def _sharded_rank(rank: int, root: str, body: Any) -> None:
    """One of 2 gloo ranks: the tiny model saved at ``root/m``, converted and sharded, handed to ``body``."""
    import torch.distributed as dist
    import transformers
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_qlora import LoRAConfig, QLoRAPrecision, QuantConfig
    from lightning_qlora.sharding import FSDPConfig, shard_model

    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=2)
    try:
        torch.manual_seed(1)
        model = transformers.AutoModelForCausalLM.from_pretrained(f"{root}/m")
        model = QLoRAPrecision(
            quant=QuantConfig(compute_dtype="float32"), lora=LoRAConfig(r=4)
        ).convert_module(model)
        shard_model(model, init_device_mesh("cpu", (2,)), torch.device("cpu"), FSDPConfig())
        Path(root, f"done{rank}").write_text(body(rank, root, model))
    finally:
        dist.destroy_process_group()


def _run_two_ranks(body: Any, root: Path, hang: str) -> list[str]:
    """Runs ``body`` on 2 sharded ranks; fails with ``hang`` if they have not all exited in 240 s."""
    import time

    import torch.multiprocessing as mp

    context = mp.start_processes(
        _sharded_rank, args=(str(root), body), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 240
    while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):  # True once every rank exited
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise AssertionError(f"the ranks did not finish in 240 s: {hang}")
    return [(root / f"done{r}").read_text() for r in (0, 1)]


def _unequal_lengths(rank: int, root: str, model: Any) -> str:
    """Rank 0 has 2 x 24 tokens, rank 1 2 x 10 with no target at all."""
    from lightning_qlora.loss import IGNORE_INDEX, causal_lm_loss

    ids = torch.randint(0, 256, (2, 24 if rank == 0 else 10), generator=torch.Generator().manual_seed(rank))
    labels = ids if rank == 0 else torch.full_like(ids, IGNORE_INDEX)
    for _ in range(2):  # a training step twice: forward, backward (the head gathered in both)
        loss, n = causal_lm_loss(model, ids, None, labels, chunk_size=8)
        loss.backward()
    with torch.no_grad():  # and an evaluation forward
        causal_lm_loss(model, ids, None, labels, chunk_size=8)
    return f"{loss.item()} {n}"


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_ranks_with_other_lengths_or_no_target_call_the_sharded_head_equally_often(tmp_path, tied):
    """Padding makes batches differ in length between ranks, and a rank may hold no target: the chunked
    loss must still gather the head as often on every rank (else FSDP's collectives hang)."""
    save_tiny_llama(tmp_path / "m", tie_word_embeddings=tied)
    done = _run_two_ranks(_unequal_lengths, tmp_path, "a collective they did not all call")
    (loss0, n0), (loss1, n1) = (d.split() for d in done)
    assert int(n0) == 2 * 23 and int(n1) == 0 and float(loss1) == 0.0 and float(loss0) > 0


def _generate_own_length(rank: int, root: str, model: Any) -> str:
    """Rank 0 generates 2 new tokens, rank 1 6."""
    import transformers

    from lightning_qlora.generate import generate

    tokenizer = transformers.AutoTokenizer.from_pretrained(f"{root}/m")
    tokenizer.eos_token_id = None  # no early stop: each rank runs to its own max_new_tokens
    (text,) = generate(model, tokenizer, "ab", max_new_tokens=2 + 4 * rank, greedy=True)  # synced: sharded
    return str(len(tokenizer(text, add_special_tokens=False).input_ids))


@pytest.mark.slow
def test_sharded_ranks_that_finish_generating_at_other_steps_do_not_hang(tmp_path):
    """Under FSDP each generated token is a forward that gathers weights from every rank: a rank done early
    (its prompts ended, or fewer tokens) must keep joining them (``synced_gpus``, which ``generate`` turns on
    for a model sharded over several processes, as ``SampleGeneration`` runs it)."""
    save_tiny_llama(tmp_path / "m", tokenizer=True)
    short, long = map(
        int, _run_two_ranks(_generate_own_length, tmp_path, "a gather one rank no longer joined")
    )
    assert 0 < short < long  # each rank kept its own completion (bytes re-tokenized, so not exactly 2 and 6)
