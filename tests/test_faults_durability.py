"""Faults for real: kill -9 mid-save and mid-run; what survives must be whole, and a resumed run exact.

- Adapter directories are written whole or not at all: a process saving in a loop is killed at random
  moments, and after each kill every visible directory loads and is one save's content, never a mixture.
- The train loader's position is in the checkpoint: a CLI run killed at a random step after its first
  checkpoint, resumed from ``last.ckpt``, logs the uninterrupted run's losses step for step.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import transformers
from conftest import micro_overrides
from tiny import MICRO_LLAMA, tiny_llama_config

from lightning_qlora import LoRAConfig, QLoRAPrecision, QuantConfig
from lightning_qlora.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    load_adapter,
    read_adapter_config,
    save_adapter,
)
from lightning_qlora.atomic import recover_directories
from lightning_qlora.data import EpochSampler, InstructDataModule, ResumableLoader, build_byte_tokenizer
from lightning_qlora.lora import lora_layers

TESTS = Path(__file__).resolve().parent
FP32 = QuantConfig(compute_dtype=torch.float32)


def _seed() -> int:
    """A fresh seed per run (printed on failure), or FAULT_SEED to replay one."""
    return int(os.environ.get("FAULT_SEED", time.time_ns() % 2**31))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def _visible(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if not p.name.startswith("."))


def _hidden(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------------------------- adapter saves


def _converted_tiny() -> transformers.PreTrainedModel:
    model = transformers.LlamaForCausalLM(tiny_llama_config())
    QLoRAPrecision(quant=FP32, lora=LoRAConfig(r=4)).convert_module(model)
    return model


def _check_adapter(model: torch.nn.Module, directory: Path) -> int:
    """Loads the adapter and checks it is one save's content; returns that save's number."""
    load_adapter(model, directory)
    values = {
        float(v) for layer in lora_layers(model).values() for v in layer.lora_B.weight.detach().unique()
    }
    assert len(values) == 1, f"{directory}: lora_B holds several saves' values {sorted(values)[:5]}"
    number = int(values.pop())
    base = read_adapter_config(directory)["base_model_name_or_path"]
    assert base == f"save-{number}", f"{directory}: weights of save {number}, config of {base}"
    return number


def _save_forever(model: torch.nn.Module, root: Path, first: int) -> None:
    """A child's whole life: save after save, each one's lora_B filled with its number (recorded as
    base_model_name_or_path too), into a few names, some replacing a directory that exists."""
    try:
        layers = list(lora_layers(model).values())
        k = first
        while True:
            for layer in layers:
                layer.lora_B.weight.data.fill_(k)
            save_adapter(model, root / ("final" if k % 3 == 0 else f"step-{k % 4}"), f"save-{k}")
            k += 1
    finally:
        os._exit(1)  # never back into pytest


def test_adapter_saves_killed_at_random_moments_leave_only_whole_directories(tmp_path):
    """Each round forks a process that saves adapters in a loop and kills it with SIGKILL after a random
    moment (mid-save, as it does nothing else). Every visible directory it leaves is one save's whole
    adapter; the cleanup removes every temporary and loses no directory that existed."""
    seed, rounds = _seed(), 12
    rng = random.Random(seed)
    root = tmp_path / "adapters"
    root.mkdir()
    model = _converted_tiny()
    interrupted, seen = 0, set()
    for i in range(rounds):
        pid = os.fork()
        if pid == 0:
            _save_forever(model, root, 1000 * (i + 1))
        time.sleep(rng.uniform(0.03, 0.3))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        interrupted += bool(_hidden(root))
        for directory in _visible(root):  # before any cleanup
            _check_adapter(model, directory)
        snapshot = tmp_path / f"snap-{i}"  # the next round's saves clean up too: check a copy
        shutil.copytree(root, snapshot, symlinks=True)
        recover_directories(snapshot)
        assert _hidden(snapshot) == [], f"seed {seed}, round {i}: {_hidden(snapshot)}"
        names = {p.name for p in _visible(snapshot)}
        assert seen <= names, f"seed {seed}, round {i}: lost {seen - names}"
        seen = names
        for directory in _visible(snapshot):
            _check_adapter(model, directory)
    assert seen, "nothing was ever saved"
    assert interrupted >= 1, f"seed {seed}: no kill interrupted a save"


def test_peft_loads_a_directory_that_survived_a_kill(tmp_path):
    """What survives is PEFT's format, not just ours: PEFT itself loads it."""
    import peft

    model = _converted_tiny()
    for layer in lora_layers(model).values():
        layer.lora_B.weight.data.fill_(0.5)
    save_adapter(model, tmp_path / "final", "save-1")
    base = transformers.LlamaForCausalLM(tiny_llama_config())
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "final")
    weights = [p for n, p in loaded.named_parameters() if "lora_B" in n]
    assert weights and all(torch.all(w == 0.5) for w in weights)


def test_an_interrupted_replacement_is_rolled_back_and_temporaries_removed(tmp_path):
    """The one moment a name is missing (old copy moved away, new one not yet in): recovery restores it."""
    model = _converted_tiny()
    for layer in lora_layers(model).values():
        layer.lora_B.weight.data.fill_(7)
    save_adapter(model, tmp_path / "final", "save-7")
    dead = _dead_pid()
    os.rename(tmp_path / "final", tmp_path / f".final.old-{dead}-0000aaaa")
    partial = tmp_path / f".final.tmp-{dead}-0000bbbb"
    partial.mkdir()
    (partial / ADAPTER_WEIGHTS).write_bytes(b"half a file")
    stale = tmp_path / f".step-3.tmp-{dead}-0000cccc"  # a first save of step-3 that never finished
    stale.mkdir()
    live = tmp_path / f".step-4.tmp-{os.getppid()}-0000dddd"  # another live process is writing this one
    live.mkdir()
    assert _visible(tmp_path) == []
    recover_directories(tmp_path)
    assert [p.name for p in _visible(tmp_path)] == ["final"]
    assert _hidden(tmp_path) == [live.name]
    assert _check_adapter(model, tmp_path / "final") == 7


def test_adapter_checkpoint_cleans_up_at_fit_start(tmp_path):
    """AdapterCheckpoint.setup removes what an earlier killed run left in its directory."""
    import lightning as L

    from lightning_qlora.callbacks import AdapterCheckpoint

    dead = _dead_pid()
    (tmp_path / "adapters" / f".step-5.tmp-{dead}-0000eeee").mkdir(parents=True)
    trainer = L.Trainer(
        callbacks=[AdapterCheckpoint(tmp_path / "adapters")],
        logger=False,
        accelerator="cpu",
        enable_progress_bar=False,
    )
    callback = next(c for c in trainer.callbacks if isinstance(c, AdapterCheckpoint))
    callback.setup(trainer, L.LightningModule(), "fit")  # what Lightning calls as fit starts
    assert _hidden(tmp_path / "adapters") == []


def test_saving_into_a_directory_with_other_files_keeps_them(tmp_path):
    """A user's directory is never swapped as a whole: their files stay, the adapter files are replaced."""
    model = _converted_tiny()
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "data.bin").write_bytes(b"x")
    for value in (1, 2):
        for layer in lora_layers(model).values():
            layer.lora_B.weight.data.fill_(value)
        save_adapter(model, tmp_path, f"save-{value}")
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "sub" / "data.bin").is_file()
    assert _check_adapter(model, tmp_path) == 2
    assert _hidden(tmp_path) == []


# ---------------------------------------------------------------------------------------- loader position


def _batches(loader, n: int) -> list[list[int]]:
    out, it = [], iter(loader)
    while len(out) < n:
        try:
            out.append(next(it).tolist())
        except StopIteration:
            it = iter(loader)
    return out


def _loader(rows: int = 23, batch: int = 4, seed: int = 5) -> ResumableLoader:
    data = torch.arange(rows)
    return ResumableLoader(data, batch_size=batch, sampler=EpochSampler(data, seed=seed))


def test_epoch_order_depends_on_seed_and_epoch_only():
    first, second = _batches(_loader(), 12), _batches(_loader(), 12)
    assert first == second  # no global RNG: the same seed gives the same batches in a new process
    per_epoch = len(_loader())
    epochs = [sorted(sum(first[e * per_epoch : (e + 1) * per_epoch], [])) for e in range(2)]
    assert epochs[0] == epochs[1] == list(range(23))  # every row once per epoch
    assert first[:per_epoch] != first[per_epoch : 2 * per_epoch]  # a new order each epoch
    assert _batches(_loader(seed=6), 6) != first[:6]


@pytest.mark.parametrize("stop", [0, 1, 4, 5, 6, 11, 13])
def test_a_loader_resumed_from_its_state_continues_with_the_next_batch(stop):
    """Stopped after any number of batches (mid-epoch, at an epoch's end, in a later epoch), a new loader
    given the state draws exactly what the first would have drawn next, RNG included."""
    reference = _loader()
    expected = _batches(reference, 20)
    first = _loader()
    it = iter(first)
    seen = []
    for _ in range(stop):
        try:
            seen.append(next(it).tolist())
        except StopIteration:
            it = iter(first)
            seen.append(next(it).tolist())
    assert seen == expected[:stop]
    torch.manual_seed(1234)  # the RNG state the next step would draw from
    state = first.state_dict()
    drawn = torch.rand(3)
    torch.manual_seed(999)  # a new process: another RNG state until the first resumed batch
    second = _loader()
    second.load_state_dict(state)
    resumed = []
    it = iter(second)
    resumed.append(next(it).tolist())
    assert torch.equal(torch.rand(3), drawn), "the RNG state comes back with the first resumed batch"
    while len(resumed) < 20 - stop:
        try:
            resumed.append(next(it).tolist())
        except StopIteration:
            it = iter(second)
    assert resumed == expected[stop:]


def test_a_loader_with_another_sampler_resumes_by_drawing_and_dropping():
    """E.g. the sequential sampler Lightning puts in for overfit_batches: no skipping by index, same result."""
    data = torch.arange(10)
    first = ResumableLoader(data, batch_size=3)
    it = iter(first)
    assert [next(it).tolist() for _ in range(2)] == [[0, 1, 2], [3, 4, 5]]
    again = ResumableLoader(data, batch_size=3)
    again.load_state_dict(first.state_dict())
    assert [b.tolist() for b in again] == [[6, 7, 8], [9]]
    assert again.state_dict()["epoch"] == 1 and again.state_dict()["batches"] == 0


def test_a_state_for_other_data_is_refused():
    state = _loader().state_dict()
    for other, what in (
        (_loader(rows=24), "rows"),
        (_loader(batch=3), "batch_size"),
        (_loader(seed=1), "seed"),
    ):
        with pytest.raises(ValueError, match=rf"cannot resume the data position: .*checkpoint {what}="):
            other.load_state_dict(state)


def test_an_epoch_cut_by_limit_train_batches_resumes_at_the_next_epoch():
    loader = _loader()
    loader.limit_batches = lambda: 3
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    assert (state["epoch"], state["batches"]) == (0, 3)
    resumed = _loader()
    resumed.limit_batches = lambda: 3
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)  # what Lightning does at the epoch start
    reference = _loader()
    reference.sampler.set_epoch(1)
    assert next(iter(resumed)).tolist() == next(iter(reference)).tolist()


def test_ranks_share_an_epoch_and_resume_their_own_share():
    data = torch.arange(23)

    def rank(r: int) -> ResumableLoader:
        return ResumableLoader(data, batch_size=4, sampler=EpochSampler(data, seed=3, num_replicas=2, rank=r))

    shares = [sum((b.tolist() for b in rank(r)), []) for r in (0, 1)]
    assert (
        sorted(set(shares[0]) | set(shares[1])) == list(range(23)) and len(shares[0]) == len(shares[1]) == 12
    )
    first = rank(1)
    next(iter(first))
    again = rank(1)
    again.load_state_dict(first.state_dict())
    assert sum((b.tolist() for b in again), []) == shares[1][4:]


class _Recorder(L.LightningModule):
    """Records what each step sees: the batch (a checksum of its ids) and a draw from the global RNG."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: dict[int, tuple[int, float]] = {}

    def training_step(self, batch, batch_idx):
        ids = batch["input_ids"]
        self.seen[self.global_step] = (
            int((ids * torch.arange(ids.numel()).view_as(ids)).sum()),
            float(torch.rand(())),
        )
        return (self.w - 1) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _datamodule(tmp_path: Path, **settings) -> InstructDataModule:
    """40 rows in batches of 8: 5 batches an epoch."""
    rows = [{"instruction": f"Say {i}.", "output": str(i)} for i in range(40)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = {"batch_size": 8, "val_fraction": 0, "cache_dir": str(tmp_path / "cache"), **settings}
    return InstructDataModule(build_byte_tokenizer(), path=str(path), **settings)


def _fit(tmp_path: Path, name: str, max_steps: int, ckpt: Path | None = None, limit=1.0, **data) -> _Recorder:
    from lightning.pytorch.callbacks import ModelCheckpoint

    dm = _datamodule(tmp_path, **data)
    module = _Recorder()
    torch.manual_seed(0)
    trainer = L.Trainer(
        max_steps=max_steps,
        limit_train_batches=limit,
        callbacks=[ModelCheckpoint(tmp_path / name, every_n_train_steps=1, save_top_k=-1, filename="{step}")],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
    return module


@pytest.mark.parametrize(("at", "limit"), [(3, 1.0), (5, 1.0), (7, 1.0), (3, 3), (6, 3)])
def test_lightning_resumes_the_data_module_at_the_next_batch(tmp_path, at, limit, recwarn):
    """Through Lightning's own checkpoint and ckpt_path: mid-epoch, at an epoch's end, in a later epoch,
    and with limit_train_batches ending epochs early, each resumed step sees the batch and the RNG draw
    of the uninterrupted run, and Lightning does not warn that the loader cannot resume."""
    whole = _fit(tmp_path, "a", 12, limit=limit).seen
    resumed = _fit(tmp_path, "b", 12, ckpt=tmp_path / "a" / f"step={at}.ckpt", limit=limit).seen
    assert sorted(resumed) == list(range(at, 12))
    assert {s: whole[s] for s in resumed} == resumed
    assert not [w for w in recwarn if "not resumable" in str(w.message)]


def test_a_checkpoint_made_for_other_data_settings_is_refused_naming_the_setting(tmp_path):
    """Pre-flight (dm.resume_problem) and Lightning's own restore both name what differs."""
    _fit(tmp_path, "a", 3)
    ckpt = tmp_path / "a" / "step=3.ckpt"
    state = torch.load(ckpt, weights_only=True)
    for settings, problem in (
        ({}, None),
        ({"batch_size": 4}, "data.batch_size differs (checkpoint batch_size=8, now 4)"),
        ({"seed": 1}, "data.seed differs (checkpoint seed=42, now 1)"),
        ({"max_samples": 20}, "another number of rows"),
    ):
        dm = _datamodule(tmp_path, **settings)
        dm.setup()
        found = dm.resume_problem(state)
        assert (found is None) if problem is None else (problem in found and "ckpt_path=null" in found), found
    with pytest.raises(ValueError, match=r"cannot resume the data position: data\.batch_size differs"):
        _fit(tmp_path, "b", 6, ckpt=ckpt, batch_size=4)


def test_data_losses_reach_the_run_summary(tmp_path):
    """What data.max_length cost is on record at the end of a run (RunSummary -> W&B summary)."""
    from lightning_qlora.callbacks import RunSummary

    dm = _datamodule(tmp_path, max_length=41, prompt_template="short")  # rows 0-9 truncated, 10-39 dropped
    summary = RunSummary()
    L.Trainer(
        max_steps=1,
        callbacks=[summary],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
    ).fit(_Recorder(), datamodule=dm)
    stats = dm.stats
    assert (stats["truncated"], stats["dropped"]) == (10, 30)
    assert summary.summary["data/truncated_rows"] == stats["truncated"]
    assert summary.summary["data/dropped_rows"] == stats["dropped"]
    assert summary.summary["data/lost_tokens"] == stats["lost_tokens"] > 0


# ---------------------------------------------------------------------------------------- kill -9 and resume

# LQ_TEST_ACCELERATOR=gpu runs the kill/resume test on a GPU (the checks are the same).
ACCELERATOR = os.environ.get("LQ_TEST_ACCELERATOR", "cpu")
STEPS, EVERY = 11, 3  # 5 batches an epoch with MICRO_RUN's data: the run crosses two epoch ends
RESUME_RUN = [
    "logger=csv",
    "sample.prompts=[]",
    "lora.dropout=0.1",  # dropout draws from the RNG: exact only if its state comes back too
    f"trainer.max_steps={STEPS}",
    "trainer.val_check_interval=5",  # validation between checkpoint and next step must not shift anything
    f"callbacks.checkpoint_every_n_steps={EVERY}",
]


def _losses(run_dir: Path) -> dict[int, float]:
    """Per-step train loss from the CSV logger (the last value logged for a step wins)."""
    out = {}
    with open(run_dir / "csv" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row.get("train/loss"):
                out[int(row["step"])] = float(row["train/loss"])
    return out


def _cli(run_dir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"}
    env.pop("WANDB_API_KEY", None)
    args = [
        *micro_overrides(trainer__accelerator=ACCELERATOR),
        *RESUME_RUN,
        f"hydra.run.dir={run_dir}",
        *extra,
    ]
    return subprocess.Popen(
        [sys.executable, "-m", "lightning_qlora.train", *args],
        cwd=run_dir.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _micro_model() -> transformers.PreTrainedModel:
    from lightning_qlora.data import build_byte_tokenizer

    kwargs = {**MICRO_LLAMA, "vocab_size": len(build_byte_tokenizer())}
    return transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    )


@pytest.mark.slow
def test_a_run_killed_at_a_random_step_resumes_with_the_same_losses(tmp_path):
    """kill -9 at a random moment after the first checkpoint; resumed from last.ckpt in the same run
    directory, every step from the checkpoint on logs the uninterrupted run's loss, bit for bit on CPU
    (same batches, same RNG draws, same float32 kernels and thread count: nothing may differ)."""
    seed = _seed()
    rng = random.Random(seed)
    full, killed = tmp_path / "full", tmp_path / "killed"
    reference = _cli(full)  # the uninterrupted run, alongside the one to kill
    victim = _cli(killed)
    ckpt, adapters = killed / "checkpoints" / "last.ckpt", killed / "checkpoints" / "adapters"
    wait_for = rng.choice([EVERY, 2 * EVERY])
    deadline = time.monotonic() + 240
    while not (ckpt.exists() and (adapters / f"step-{wait_for}").exists()):
        assert victim.poll() is None, victim.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.6))  # somewhere in the next steps: mid-step, mid-validation or mid-save
    assert victim.poll() is None, f"seed {seed}: the run finished before the kill"
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    resumed_from = torch.load(ckpt, weights_only=True)["global_step"]
    assert EVERY <= resumed_from < STEPS

    resumed = _cli(killed, f"ckpt_path={ckpt}")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert "not resumable" not in err  # Lightning's warning when the loader's position is lost
    out_ref, err_ref = reference.communicate(timeout=300)
    assert reference.returncode == 0, err_ref[-3000:]

    expected, got = _losses(full), _losses(killed)
    steps = list(range(resumed_from, STEPS))
    diffs = [abs(got[s] - expected[s]) if s in got else float("inf") for s in steps]
    assert max(diffs) == 0.0, (
        f"seed {seed}: resumed at step {resumed_from} ({wait_for=}); |resumed - uninterrupted| per step {diffs}"
    )
    # The adapters the killed run left: cleaned at the resumed run's start, every one loads.
    assert _hidden(adapters) == []
    model = _micro_model()
    QLoRAPrecision(quant=FP32, lora=LoRAConfig(r=16, alpha=32)).convert_module(model)
    names = {p.name for p in _visible(adapters)}
    assert {f"step-{s}" for s in range(EVERY, STEPS + 1, EVERY)} | {"final"} <= names
    for directory in _visible(adapters):
        assert (directory / ADAPTER_CONFIG).is_file() and load_adapter(model, directory)
    final = json.loads((adapters / "final" / "qlora_config.json").read_text())
    assert final["lora"]["r"] == 16


# ---------------------------------------------------------------------------------------- progress bar


def test_the_progress_bar_counts_steps_of_the_run_across_a_resume(tmp_path, capsys):
    """Step-bounded training shows step N/max_steps, also after a resume (Lightning's bar read 40/20)."""
    import re

    import lightning as L
    from torch.utils.data import TensorDataset

    from lightning_qlora.callbacks import StepProgressBar

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    rows = TensorDataset(torch.randn(20, 2))
    data = ResumableLoader(rows, batch_size=4, sampler=EpochSampler(rows, seed=0))  # 5 batches an epoch

    def fit(max_steps: int, ckpt: Path | None = None) -> L.Trainer:
        trainer = L.Trainer(
            max_steps=max_steps,
            callbacks=[StepProgressBar()],
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            accelerator="cpu",
            default_root_dir=tmp_path,
        )
        trainer.fit(Tiny(), data, ckpt_path=ckpt)
        return trainer

    fit(7).save_checkpoint(tmp_path / "a.ckpt")
    capsys.readouterr()
    fit(12, tmp_path / "a.ckpt")
    out = capsys.readouterr().out
    shown = re.findall(r"step (\d+)/(\d+)", out)
    assert shown and {total for _, total in shown} == {"12"}
    counts = [int(n) for n, _ in shown]
    assert counts[0] == 7 and counts[-1] == 12 and counts == sorted(counts)
    assert "Epoch" not in out
