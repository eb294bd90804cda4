"""Faults a user meets, done for real: bad settings, damaged files, unwritable outputs, NaN, a model path.

Each pre-flight case asserts the contract of ``lightning-qlora`` on bad input: exit code 2, exactly one
``lightning-qlora: error:`` line naming the problem, no traceback, and nothing left behind (no run
directory, no ``.hydra/``, no W&B run). Most run ``train.main`` in this process: it is the console
script's own entry point (argv, Hydra, the task), without paying the interpreter's start-up per case;
the cases where the process boundary matters (Hydra failing to make its directory, NaN's exit code,
the printed commands) run the installed console scripts in a subprocess.

As root (CI), ``chmod`` does not stop a write, so "read-only" outputs are made by putting a file where
a directory must go, which fails for root too; the permission variants run only as a normal user.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import BIN, MICRO_RUN, micro_overrides
from safetensors.torch import load_file
from torch import nn

from lightning_qlora import builders as B
from lightning_qlora import preflight as P
from lightning_qlora import train as T
from lightning_qlora.guards import NonFiniteError, NonFiniteGuard

ERROR = "lightning-qlora: error:"


def _main(args: list[str]) -> tuple[int, str, str]:
    """``lightning-qlora ARGS`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            T.main(args)
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(ERROR)]


def _assert_refused(code: int, stderr: str, expected: str) -> str:
    assert code == 2, stderr[-3000:]
    errors = _errors(stderr)
    assert len(errors) == 1, stderr[-3000:]
    assert expected in errors[0], errors[0]
    assert "Traceback" not in stderr and "Error executing job" not in stderr
    return errors[0]


@pytest.fixture
def micro(tmp_path: Path, wandb_offline: Path):
    """Overrides of the micro default run into ``tmp/run``, W&B offline (the default logger)."""

    def make(*extra: str, **kv: object) -> list[str]:
        base = micro_overrides(
            **{"hydra.run.dir": tmp_path / "run", "data.cache_dir": tmp_path / "cache", **kv}
        )
        return [*base, *extra]

    return make


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real checkpoint of the micro default run (lora.r=16 over the 64-wide micro Llama), 2 steps."""
    run = tmp_path_factory.mktemp("ckpt-run")
    cfg = B.compose_recipe(
        "default",
        [
            *micro_overrides(output_dir=run, **{"data.cache_dir": run / "cache", "trainer.max_steps": 2}),
            "logger=none",
            "sample.prompts=[]",
        ],
    )
    T.train(cfg)
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    return ckpt


# --------------------------------------------------------------------------- late failures, now pre-flight
@pytest.mark.parametrize(
    "override,expected",
    [
        ("trainer.max_steps=-5", "trainer.max_steps=-5 must be a positive number"),
        ("trainer.max_steps=0", "trainer.max_steps=0"),
        ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0 must be >= 1"),
        ("trainer.max_epochs=0", "trainer.max_epochs=0"),
        ("trainer.val_check_interval=0", "trainer.val_check_interval=0"),
        ("trainer.val_check_interval=1.5", "trainer.val_check_interval=1.5"),
        ("trainer.devices=0", "trainer.devices=0"),
        (
            "trainer.strategy=fsdpp",
            "the trainer settings are refused by Lightning: You selected an invalid strategy",
        ),
        ("data.batch_size=0", "data.batch_size"),
        ("optimizer.lr=-1", "optimizer.lr=-1.0 must be a positive number"),
        ("optimizer.lr=0", "optimizer.lr=0.0 must be a positive number"),
        ("optimizer.lr=nan", "optimizer.lr=nan is not a finite number"),
        ("optimizer.betas=[0.9,1.5]", "optimizer.betas=[0.9, 1.5]"),
        ("lora.alpha=inf", "lora.alpha=inf is not a finite number"),
        ("callbacks.on_nonfinite=ignore", "callbacks.on_nonfinite='ignore' is not a policy"),
        ("logger.init_timeout=0", "logger.init_timeout=0.0 must be a positive number"),
        ("model.name_or_path=/nonexistent", "model.name_or_path='/nonexistent' does not exist"),
        (
            "trainer.strategy=fsdp",
            "Lightning's FSDPStrategy (FSDP1) accepts only its own precision plugin; use trainer=fsdp",
        ),
        (
            "trainer.fsdp.reshard_after_forward=false",
            "applies to trainer.strategy=fsdp2 only, but trainer.strategy=auto",
        ),
        ("trainer.fsdp.cpu_offload=true", "trainer.fsdp.cpu_offload=true is not supported yet"),
        ("trainer.fsdp.wrap=layers", "trainer.fsdp.wrap='layers' is not supported"),
    ],
)
def test_a_bad_setting_stops_in_preflight_with_one_line_and_leaves_nothing(
    micro, tmp_path, override, expected
):
    code, _, err = _main(micro(override))
    _assert_refused(code, err, expected)
    assert not (tmp_path / "run").exists()
    assert not list((tmp_path / "wandb-home").rglob("*.wandb"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_accelerator_gpu_without_cuda_is_refused_before_anything_is_written(micro, tmp_path):
    code, _, err = _main(micro("trainer.accelerator=gpu"))
    _assert_refused(code, err, "trainer.accelerator=gpu but no CUDA GPU is available here")
    assert "trainer.accelerator=cpu" in err
    assert not (tmp_path / "run").exists()


def test_a_truncated_safetensors_file_is_refused_in_preflight(micro, tmp_path, tiny_llama_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, _, err = _main(micro(f"model.name_or_path={model}", "model.from_config=null"))
    _assert_refused(code, err, "model.safetensors is damaged or truncated")
    assert not (tmp_path / "run").exists()


def test_an_index_naming_a_missing_shard_is_refused(micro, tmp_path, tiny_llama_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    (model / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}})
    )
    code, _, err = _main(micro(f"model.name_or_path={model}", "model.from_config=null"))
    _assert_refused(code, err, "model-00002-of-00002.safetensors named by its index is missing")


def test_a_truncated_checkpoint_is_refused_in_preflight(micro, tmp_path, checkpoint):
    bad = tmp_path / "cut.ckpt"
    bad.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    code, _, err = _main(micro(f"ckpt_path={bad}"))
    _assert_refused(code, err, "cannot be read: truncated or not a checkpoint (PytorchStreamReader failed")
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_with_other_lora_settings_gets_the_plugins_message_in_one_line(
    micro, tmp_path, checkpoint
):
    code, _, err = _main(micro(f"ckpt_path={checkpoint}", "lora.r=8"))
    line = _assert_refused(code, err, "this checkpoint was trained with other QLoRA settings")
    assert "lora.r: checkpoint 16, plugin 8" in line
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_of_another_model_is_refused_in_preflight(micro, tmp_path, checkpoint):
    # The default recipe's own tiny Llama is 256 wide; the checkpoint's adapters are for the 64-wide micro one.
    overrides = [o for o in micro() if not o.startswith("++model.from_config")]
    code, _, err = _main([*overrides, f"ckpt_path={checkpoint}"])
    _assert_refused(code, err, "was trained on another model")
    assert not (tmp_path / "run").exists()


def test_resuming_a_run_built_from_a_config_with_another_seed_is_refused(micro, tmp_path, checkpoint):
    code, _, err = _main(micro(f"ckpt_path={checkpoint}", "seed=7"))
    _assert_refused(code, err, "built from a config with seed=42; seed=7 would build other random weights")


def test_a_checkpoint_holding_pickled_objects_is_refused_without_running_it(micro, tmp_path):
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": Path("/etc/passwd")}, evil)  # any non-tensor object: pickled
    code, _, err = _main(micro(f"ckpt_path={evil}"))
    _assert_refused(code, err, "loading it could run code: refused")


def test_the_checkpoint_fixture_resumes(micro, tmp_path, checkpoint):
    """The refusals above are specific: the same checkpoint with its own settings passes pre-flight."""
    overrides = micro_overrides(output_dir=tmp_path / "r", **{"data.cache_dir": tmp_path / "cache"})
    cfg = B.compose_recipe("default", [*overrides, f"ckpt_path={checkpoint}"])
    parts = P.preflight(cfg)
    assert parts["plugin"].lora.r == 16


# ------------------------------------------------------------------------------------ unwritable outputs
def test_a_run_directory_under_a_file_fails_before_hydra_writes_anything(micro, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    code, _, err = _main(micro(**{"hydra.run.dir": blocker / "run"}))
    _assert_refused(code, err, f"{blocker} is a file, not a directory")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "wandb-home") == ["blocker"]


def test_a_file_where_checkpoints_go_fails_in_preflight_not_at_the_first_checkpoint(micro, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("in the way")
    code, _, err = _main(micro())
    _assert_refused(code, err, "cannot write checkpoints (callbacks.checkpoint)")
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints"]  # no .hydra/, no wandb/, no base/


def test_a_file_where_the_wandb_logs_go_fails_in_preflight(micro, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "wandb").write_text("in the way")
    code, _, err = _main(micro())
    _assert_refused(code, err, "cannot write the wandb logs (logger.save_dir)")
    assert sorted(p.name for p in run.iterdir()) == ["wandb"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through a read-only mode")
def test_a_read_only_checkpoints_directory_fails_in_preflight(micro, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints").chmod(0o500)
    try:
        code, _, err = _main(micro())
    finally:
        (run / "checkpoints").chmod(0o700)
    _assert_refused(code, err, "is not writable (Permission denied)")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through a read-only mode")
def test_a_read_only_working_directory_fails_before_hydra(micro, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        code, _, err = _main(micro(**{"hydra.run.dir": parent / "run"}))
    finally:
        parent.chmod(0o700)
    _assert_refused(code, err, "is not writable (Permission denied)")


def test_an_unwritable_working_directory_gives_one_line_not_hydras_traceback(micro, tmp_path, monkeypatch):
    """Hydra itself would fail making outputs/ (a chain of tracebacks); the check runs before it."""
    (tmp_path / "outputs").write_text("a file where Hydra makes its run directories")
    monkeypatch.chdir(tmp_path)
    overrides = [o for o in micro() if not o.startswith("hydra.run.dir")]  # Hydra's default: outputs/...
    code, _, err = _main(overrides)
    _assert_refused(code, err, f"{tmp_path / 'outputs'} is a file, not a directory")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "wandb-home") == ["outputs"]


# ------------------------------------------------------------------------------------- the model's source
def test_a_model_path_wins_over_the_default_recipes_from_config(
    tmp_path, tiny_llama_dir, wandb_offline, capsys
):
    """The default recipe's model option builds a 256-wide Llama from a config; a path given on top of
    it is the model that trains (64 wide), and the adapter names it."""
    overrides = [o for o in MICRO_RUN if not o.startswith(("model.name_or_path", "++model.from_config"))]
    cfg = B.compose_recipe(
        "default",
        [
            *overrides,
            f"model.name_or_path={tiny_llama_dir}",
            f"output_dir={tmp_path / 'run'}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "trainer.max_steps=1",
            "logger=none",
            "sample.prompts=[]",
        ],
    )
    assert cfg.model.from_config is None  # the default option's from_config gave way, and said so
    assert "model.from_config is not used when a path is given" in capsys.readouterr().err
    summary = T.train(cfg)
    assert summary["base_model"] == str(tiny_llama_dir)
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tiny_llama_dir
    )
    weights = load_file(adapter / "adapter_model.safetensors")
    q = next(w for k, w in weights.items() if k.endswith("q_proj.lora_A.weight"))
    assert q.shape[1] == 64  # the saved micro model's width, not the config's 256
    assert not (tmp_path / "run" / "base").exists()  # nothing built from a config, so no base saved


# ----------------------------------------------------------------------------- the default run's base model
def test_a_run_from_a_config_saves_its_exact_base_and_the_adapter_reloads_over_it(tmp_path, wandb_offline):
    """The saved base + adapter, loaded the way lightning-qlora-generate loads them, reproduce the run's
    final validation loss: the base is the very weights the adapter was trained on."""
    from lightning_qlora.export import load_model
    from lightning_qlora.loss import causal_lm_loss

    cfg = B.compose_recipe(
        "default",
        [
            *micro_overrides(output_dir=tmp_path / "run", **{"data.cache_dir": tmp_path / "cache"}),
            "logger=none",
            "sample.prompts=[]",
        ],
    )
    parts = P.preflight(cfg)
    summary = T.train(cfg, parts)
    base, adapter = Path(summary["base_model"]), Path(summary["adapter_dir"])
    assert base == tmp_path / "run" / "base" and (base / "model.safetensors").is_file()
    assert (base / "tokenizer.json").is_file()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base)
    assert not list((tmp_path / "run").glob(".base-*"))  # the temporary directory was renamed

    model = load_model(base, adapter, device="cpu")
    total, count = 0.0, 0
    for i, batch in enumerate(parts["datamodule"].val_dataloader()):
        if i >= cfg.trainer.limit_val_batches:
            break
        with torch.no_grad():
            loss, n = causal_lm_loss(
                model, batch["input_ids"], batch["attention_mask"], batch["labels"], cfg.model.loss_chunk_size
            )
        total, count = total + float(loss) * n, count + n
    assert total / count == pytest.approx(summary["final_val_loss"], rel=1e-5, abs=1e-5)


@pytest.mark.slow
def test_the_commands_the_summary_prints_work_as_printed(run_cli, tmp_path):
    run = tmp_path / "run"
    result = run_cli(*micro_overrides(**{"hydra.run.dir": run, "trainer.max_steps": 2}), "sample.prompts=[]")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("  use it "))
    commands = [lines[start].removeprefix("  use it").strip(), lines[start + 1].strip()]
    assert commands[0].startswith("lightning-qlora-generate --model ")
    assert commands[1].startswith("lightning-qlora-export --base ")
    assert f"--model {run / 'base'} --adapter {run / 'adapter'}" in commands[0]
    for command in commands:
        argv = shlex.split(command)
        done = subprocess.run(
            [str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=300, cwd=tmp_path
        )
        assert done.returncode == 0, (command, done.stderr[-3000:])
    assert (run / "merged" / "config.json").is_file()


# -------------------------------------------------------------------------------------------------- NaN
@pytest.mark.slow
def test_a_nan_run_stops_with_exit_3_and_keeps_the_last_good_adapter(run_cli, tmp_path):
    run = tmp_path / "run"
    overrides = micro_overrides(
        **{"hydra.run.dir": run, "trainer.max_steps": 8, "callbacks.checkpoint_every_n_steps": 1}
    )
    result = run_cli(*overrides, "optimizer.lr=1e20", "sample.prompts=[]")
    assert result.returncode == 3, result.stderr[-3000:]
    errors = _errors(result.stderr)
    assert len(errors) == 1 and "Traceback" not in result.stderr
    line = errors[0]
    assert "training stopped at step 1: the loss is nan on batch 1 of epoch 0" in line
    assert "likely the learning rate" in line and f"{run / 'adapter'}" in line
    assert "finished" not in result.stdout
    # Before training: one line on what the pre-flight found, one on the rows data.max_length=64 cost.
    assert (
        "lightning-qlora: pre-flight ok: model llama(from_config), nf4-lora-float32, lora.r=16"
        in result.stderr
    )
    assert "dropped" in result.stderr.split("pre-flight ok:")[1].split("\n")[1]
    for adapter in (run / "adapter", run / "checkpoints" / "adapters" / "final"):
        weights = load_file(adapter / "adapter_model.safetensors")
        assert all(torch.isfinite(w).all() for w in weights.values()), adapter
        # The last good adapter is the one before the update that diverged: here the initial one (B = 0).
        assert all(not w.any() for k, w in weights.items() if "lora_B" in k), adapter
        assert (adapter / "adapter_config.json").is_file()


@pytest.mark.slow
def test_a_nan_under_ddp_stops_both_ranks_together_with_one_line(run_cli, tmp_path):
    """Two CPU processes (gloo): the loss is local to each rank, so the guard reduces its decision; a rank
    stopping alone would leave the other waiting in the next all-reduce for ever."""
    run = tmp_path / "run"
    overrides = micro_overrides(**{"hydra.run.dir": run, "trainer.max_steps": 8})
    result = run_cli(
        *overrides, "optimizer.lr=1e20", "trainer.strategy=ddp", "trainer.devices=2", "sample.prompts=[]"
    )
    assert result.returncode == 3, result.stderr[-3000:]
    assert len(_errors(result.stderr)) == 1 and "training stopped at step 1" in result.stderr
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


# ------------------------------------------------------- the guard with a real Trainer and a scripted loss
class _Scripted(L.LightningModule):
    """A linear model whose loss is NaN on the given batches (what a bad batch or an overflow gives)."""

    def __init__(
        self,
        nan_batches: set[int] = frozenset(),
        lr: float = 0.1,
        zero_grad: bool = False,
        scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.nan_batches, self.lr, self.flat, self.scale = set(nan_batches), lr, zero_grad, scale
        self.seen: dict[int, torch.Tensor] = {}  # the weights each batch started with

    def on_train_batch_start(self, batch, batch_idx):
        self.seen[batch_idx] = self.layer.weight.detach().clone()

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = ((self.layer(x) - y) ** 2).mean() * self.scale
        if self.flat:
            loss = loss * 0 + 1.0  # a loss that does not move: the gradient is exactly zero
        if batch_idx in self.nan_batches:
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _fit(module: L.LightningModule, guard: NonFiniteGuard, steps: int = 6) -> L.Trainer:
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    trainer = L.Trainer(
        max_steps=steps,
        callbacks=[guard],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    return trainer


def test_guard_stop_puts_back_the_weights_of_the_last_finite_step():
    module = _Scripted(nan_batches={3})
    with pytest.raises(NonFiniteError) as info:
        _fit(module, NonFiniteGuard("stop"))
    assert info.value.step == 3 and info.value.good_step == 2
    assert "the loss is nan on batch 3 of epoch 0" in str(info.value)
    # Batch 3's weights gave NaN; batch 2's were the last to give a finite loss.
    assert torch.equal(module.layer.weight, module.seen[2]) and not torch.equal(
        module.seen[2], module.seen[3]
    )


def test_guard_skip_drops_that_update_and_goes_on():
    module = _Scripted(nan_batches={3})
    guard = NonFiniteGuard("skip", max_skipped=2)
    trainer = _fit(module, guard)
    assert trainer.global_step == 6 and guard.skipped == [3]
    assert torch.equal(module.seen[3], module.seen[4])  # batch 3 changed nothing
    assert not torch.equal(module.seen[4], module.seen[5])  # training went on after it
    assert torch.isfinite(module.layer.weight).all()


def test_guard_skip_stops_past_its_limit():
    module = _Scripted(nan_batches={2, 3, 4, 5})
    with pytest.raises(NonFiniteError) as info:
        _fit(module, NonFiniteGuard("skip", max_skipped=2))
    assert info.value.step == 4 and "2 updates were skipped before it" in str(info.value)
    # Batch 1's weights were the last to give a finite loss (batch 2's already gave NaN).
    assert info.value.good_step == 1 and torch.equal(module.layer.weight, module.seen[1])


def test_guard_stops_on_an_update_that_overflows_the_weights():
    # Finite loss and gradients (~1e6), but lr * gradient (~1e43) is past float32: the update makes inf.
    module = _Scripted(lr=1e37, scale=1e6)
    with pytest.raises(NonFiniteError) as info:
        _fit(module, NonFiniteGuard("stop"))
    assert "made the adapter weights non-finite" in str(info.value)
    assert "likely the learning rate" in str(info.value)
    assert torch.isfinite(module.layer.weight).all()
    assert torch.equal(module.layer.weight, module.seen[info.value.step])


def test_guard_warns_once_when_the_gradient_stays_exactly_zero(capsys):
    module = _Scripted(zero_grad=True)
    _fit(module, NonFiniteGuard("stop", zero_grad_warn_steps=3), steps=8)
    err = capsys.readouterr().err
    assert err.count("adapter gradient has been exactly zero for 3 steps (since step 0)") == 1


def test_guard_is_silent_on_a_healthy_run(capsys):
    module = _Scripted()
    guard = NonFiniteGuard("stop", zero_grad_warn_steps=3)
    _fit(module, guard)
    assert "lightning-qlora" not in capsys.readouterr().err and not guard.skipped


# ------------------------------------------------------------------------------------------------- W&B
def test_the_wandb_key_source_names_where_the_key_is(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert B.wandb_key_source() is None
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    (tmp_path / "netrc").chmod(0o600)
    assert B.wandb_key_source() == str(tmp_path / "netrc")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert B.wandb_key_source() == "WANDB_API_KEY"


# ------------------------------------------------------------------------------------------------ --help
def test_help_lists_the_groups_their_options_and_the_recipes(capsys):
    code, out, _ = _main(["--help"])
    assert code == 0
    for text in (
        "recipes (--config-name RECIPE",
        "llama2_7b_alpaca",
        "quant      fp4, nf4, nf4_dq*, none",
        "model ",
        "tiny_llama*",
        "keys: r, alpha, dropout",
        "callbacks ",
        "on_nonfinite",
    ):
        assert text in out, text
    code, out, _ = _main(["--config-name", "llama2_7b_alpaca", "--help"])
    assert code == 0 and "llama2_7b*" in out and "qlora_paper*" in out


def test_preflight_checks_finish_quickly_for_every_recipe(tmp_path):
    """check_settings (no model, tokenizer or data) is what the property tests lean on: it must stay cheap."""
    for name in ("default", "llama2_7b_alpaca"):
        cfg = B.compose_recipe(name, [f"output_dir={tmp_path / name}", "trainer.accelerator=cpu"])
        start = time.perf_counter()
        P.check_settings(cfg)
        assert time.perf_counter() - start < 10
        assert not (tmp_path / name).exists()  # the write probe leaves nothing


def test_nan_in_a_setting_is_named_even_where_a_range_check_would_let_it_pass():
    cfg = B.compose_recipe("default", ["output_dir=/tmp/unused", "lora.alpha=nan"])
    with pytest.raises(P.PreflightError, match=r"lora.alpha=nan is not a finite number"):
        P.check_settings(cfg)
    assert math.isnan(cfg.lora.alpha)
