"""Experiment tracking with real wandb (offline, no mocks), read back with ``wandb leet inspect``."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import micro_overrides, wandb_leet
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_qlora import train as T
from lightning_qlora.callbacks import MemoryMonitor, parameter_counts
from lightning_qlora.config import LoggerConfig

STEPS = 4


def history(run_dir: Path) -> list[dict]:
    """The run's history rows, from its .wandb transaction log."""
    records = [json.loads(line) for line in wandb_leet("--json", str(run_dir)).splitlines() if line.strip()]
    return [r["history"]["item"] for r in records if r.get("type") == "history"]


@pytest.fixture
def offline_run(compose, tmp_path, wandb_offline):
    """A short default-recipe run logged to an offline W&B run; returns (summary, wandb run dir, cfg)."""
    cfg = compose("default", micro_overrides(output_dir=tmp_path / "run", **{"trainer.max_steps": STEPS}))
    summary = T.train(cfg)
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    return summary, runs[0], cfg


@pytest.mark.slow
def test_offline_wandb_run_holds_config_history_memory_throughput_and_counts(offline_run, micro_llama_config):
    summary, run_dir, cfg = offline_run
    state = json.loads(wandb_leet("--summary", "--json", str(run_dir)))
    assert state["state"] == "finished" and state["exit_code"] == 0

    # The resolved config: no interpolation left, the run dir filled in.
    config = state["config"]
    assert "${" not in json.dumps(config)
    assert config["output_dir"] == str(run_dir.parents[1]) and config["lora"]["r"] == cfg.lora.r
    info = config["run_info"]
    assert (
        info["precision_plugin"]["quant"]["quant_type"] == "nf4"
        and info["precision_plugin"]["lora"]["r"] == cfg.lora.r
    )
    assert info["model_name"] == "llama(from_config)"
    assert info["weight_bytes"]["nf4"] > 0 and info["weight_bytes"]["float32"] > 0

    # Parameter counts match the model built on its own.
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(micro_llama_config)
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(kwargs.pop("model_type"), **kwargs))
    linears = [m for n, m in plain.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")]
    lora = sum(cfg.lora.r * (m.in_features + m.out_features) for m in linears)
    params = info["params"]
    assert params["total"] == sum(p.numel() for p in plain.parameters()) + lora
    assert params["trainable"] == lora
    assert params["4bit"] == sum(m.weight.numel() for m in linears)

    # The end-of-run summary (checked below).
    final = state["summary"]

    # One history row with the loss per logged step (log_every_n_steps=1), and val loss per validation.
    rows = history(run_dir)
    losses = [r for r in rows if "train/loss" in r]
    assert [r["trainer/global_step"] for r in losses] == list(range(STEPS))
    assert all("train/lr" in r and r["train/grad_norm"] > 0 for r in losses)
    assert any("val/loss" in r for r in rows)
    for row in losses:  # memory and throughput: CPU run, so host keys and no GPU keys
        assert 0 < row["mem/host_rss_gib"] <= row["mem/host_peak_rss_gib"] + 1e-6
        assert not any(k.startswith("mem/gpu") for k in row)
    warmup = 3  # MemoryMonitor's default: their time is reported apart from the steady-state tokens/s
    for row in losses[warmup:]:
        assert row["perf/tokens_per_s"] > 0 and row["perf/samples_per_s"] > 0 and row["perf/step_time_s"] > 0
    assert not any("perf/tokens_per_s" in row for row in losses[: warmup - 1])
    warmups = {
        r["perf/warmup_s"] for r in rows if "perf/warmup_s" in r
    }  # one value (Lightning may repeat it)
    assert len(warmups) == 1 and warmups.pop() == pytest.approx(final["warmup_s"])

    final = state["summary"]
    for key in ("final_train_loss", "final_val_loss", "peak_host_rss_gib", "mean_tokens_per_s", "warmup_s"):
        assert final[key] > 0, key
    assert final["adapter_dir"] == summary["adapter_dir"] and Path(final["adapter_dir"]).is_dir()
    assert final["params_trainable"] == lora


@pytest.mark.slow
def test_a_broken_wandb_setting_falls_back_and_training_completes(run_cli, tmp_path):
    """Online W&B against a refused local port (no network): one line before it waits, then offline within
    ``logger.init_timeout``, and training completes. A fresh process: wandb reads its environment once."""
    env = {
        "WANDB_API_KEY": "x" * 40,
        "WANDB_BASE_URL": "http://127.0.0.1:9",
        "WANDB_DIR": str(tmp_path),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
    }
    env_unset = {"WANDB_MODE": None}
    run_dir = tmp_path / "run"
    overrides = micro_overrides(
        **{"trainer.max_steps": 2, "logger.init_timeout": 3, "hydra.run.dir": run_dir}
    )
    start = time.perf_counter()
    result = run_cli(*overrides, "sample.prompts=[]", env={**env, **env_unset})
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    assert "finished 2 steps" in result.stdout
    # One line before it waits, one when it gives up...
    assert (
        "lightning-qlora: W&B: connecting online (key found in WANDB_API_KEY); falls back to offline after 3 s "
        "(logger.init_timeout)"
    ) in result.stderr.splitlines()
    assert result.stderr.count("W&B online init failed") == 1 and "logging offline instead" in result.stderr
    # ...after the 3 s asked for: the whole run takes 15-30 s on a busy 2-core machine, against the 90 s of
    # wandb's own timeout or the 60 s our default used to be (now 15 s).
    assert seconds < 60 and LoggerConfig().init_timeout == 15
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


class _TinyLM(L.LightningModule):
    """Not a transformers model: MemoryMonitor works with any module and logger."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.out = nn.Linear(16, 50)

    def training_step(self, batch, batch_idx):
        ids = batch["input_ids"]
        loss = nn.functional.cross_entropy(
            self.out(self.emb(ids[:, :-1])).flatten(0, 1), ids[:, 1:].flatten()
        )
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_memory_monitor_works_with_any_trainer_and_logger(tmp_path):
    ids = torch.randint(0, 50, (24, 12))
    mask = torch.ones_like(ids)
    mask[:, -2:] = 0  # padding is not counted as tokens
    loader = torch.utils.data.DataLoader(
        [{"input_ids": i, "attention_mask": m} for i, m in zip(ids, mask, strict=True)], batch_size=4
    )
    monitor = MemoryMonitor(log_every_n_steps=2, warmup_steps=2)
    trainer = L.Trainer(
        max_steps=6,
        logger=CSVLogger(tmp_path, name="", version=""),
        callbacks=[monitor],
        log_every_n_steps=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
    )
    trainer.fit(_TinyLM(), loader)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    logged = [r for r in rows if r.get("perf/tokens_per_s")]
    assert len(logged) == 2  # steps 4 and 6: the window of step 2 held only warm-up batches
    assert all(float(r["perf/tokens_per_s"]) > 0 and float(r["mem/host_rss_gib"]) > 0 for r in logged)
    assert not any(k.startswith("mem/gpu") for k in rows[0])
    warmup = [r for r in rows if r.get("perf/warmup_s")]
    # logged once (Lightning repeats a step-logged key's last value in later rows)
    assert all(float(r["perf/warmup_s"]) == pytest.approx(monitor.warmup_time) for r in warmup)
    assert monitor.warmup_time > 0 and warmup[0]["step"] == "1"
    assert float(warmup[0]["perf/time_to_first_step_s"]) > 0
    assert monitor.total_tokens == 6 * 4 * 10  # six batches of 4 x 10 real tokens (padding not counted)
    assert monitor.steady_tokens == 4 * 4 * 10  # the two warm-up batches left out of tokens/s
    assert monitor.mean_tokens_per_s == monitor.steady_tokens / monitor.steady_time


def test_parameter_counts_count_4bit_weights_as_the_weights_they_encode():
    from lightning_qlora import LoRAConfig, QLoRAPrecision, QuantConfig

    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    QLoRAPrecision(quant=QuantConfig(compute_dtype="float32"), lora=LoRAConfig(r=2)).convert_module(model)
    model.to("cpu")  # quantizes
    counts = parameter_counts(model)
    assert counts["4bit"] == 64 * 128 * 2
    assert counts["trainable"] == 2 * (64 + 128) * 2
    assert counts["total"] == counts["4bit"] + 128 + 64 + counts["trainable"]
