"""Shared fixtures: a micro Llama saved like a hub model, offline W&B, Hydra composition, the CLI.

Everything is offline: models are built from a config and saved with ``save_pretrained``; the
tokenizer is the package's byte-level one (saved next to the model so ``AutoTokenizer`` loads it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tiny import MICRO_LLAMA

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Overrides that shrink any recipe to seconds on a CPU: micro model, few rows, few steps, no sanity check.
MICRO_RUN = [
    "model.name_or_path=null",
    "model.tokenizer=byte",
    "++model.from_config=" + json.dumps(MICRO_LLAMA).replace('"', "").replace(" ", ""),
    "data.path=null",
    "data.format=auto",
    "data.prompt_template=short",
    "data.max_samples=96",
    "data.max_length=64",
    "data.batch_size=8",
    "data.val_fraction=0.1",
    "trainer.accelerator=cpu",
    "trainer.max_steps=3",
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=2",
    "trainer.num_sanity_val_steps=0",
    "trainer.accumulate_grad_batches=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "quant.compute_dtype=float32",
    "sample.max_new_tokens=4",
]


def micro_overrides(**extra: Any) -> list[str]:
    """:data:`MICRO_RUN` with ``key=value`` pairs added or replaced (``a__b=1`` means ``a.b=1``)."""
    out = list(MICRO_RUN)
    keys = {o.split("=", 1)[0].lstrip("+"): i for i, o in enumerate(out)}
    for key, value in extra.items():
        key = key.replace("__", ".")
        item = f"{key}={'null' if value is None else value}"
        if key in keys:
            out[keys[key]] = item
        else:
            out.append(item)
    return out


@pytest.fixture(scope="session")
def micro_llama_config() -> dict[str, Any]:
    """Config kwargs of the micro Llama (with the byte tokenizer's vocab size)."""
    from lightning_qlora.data import build_byte_tokenizer

    return {**MICRO_LLAMA, "vocab_size": len(build_byte_tokenizer())}


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, micro_llama_config: dict[str, Any]) -> Path:
    """A micro Llama saved with ``save_pretrained`` (random weights, seed 0) plus its byte tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lightning_qlora.data import build_byte_tokenizer

    path = tmp_path_factory.mktemp("tiny-llama")
    kwargs = dict(micro_llama_config)
    tok = build_byte_tokenizer()
    config = AutoConfig.for_model(
        kwargs.pop("model_type"),
        **kwargs,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Real wandb, offline, silent, writing under tmp; no key, so nothing can go online."""
    wdir = tmp_path / "wandb-home"
    wdir.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(wdir))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(wdir / "config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(wdir / "cache"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return wdir


@pytest.fixture
def compose() -> Iterator[Callable[..., Any]]:
    """``compose(recipe, overrides)`` -> the recipe's config, as Hydra composes it (no run dir made)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from lightning_qlora.config import RECIPES_MODULE  # importing it registers the schema

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=RECIPES_MODULE, version_base="1.3"):
        yield lambda name="default", overrides=(): hydra_compose(config_name=name, overrides=list(overrides))


@pytest.fixture
def run_cli(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess]:
    """Runs ``lightning-qlora`` (``python -m lightning_qlora.train`` with ``module=True``) from a tmp cwd, W&B offline."""

    def run(
        *args: str, module: bool = False, cwd: Path | None = None, env: dict | None = None, timeout: int = 300
    ):
        cmd = [sys.executable, "-m", "lightning_qlora.train"] if module else [str(BIN / "lightning-qlora")]
        full_env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"}
        full_env.pop("WANDB_API_KEY", None)
        for key, value in (env or {}).items():  # None unsets
            if value is None:
                full_env.pop(key, None)
            else:
                full_env[key] = value
        return subprocess.run(
            [*cmd, *args], cwd=cwd or tmp_path, env=full_env, capture_output=True, text=True, timeout=timeout
        )

    return run


def wandb_leet(*args: str) -> str:
    """``wandb leet inspect ARGS``: wandb's own reader of a run directory (offline runs included)."""
    result = subprocess.run(
        [str(BIN / "wandb"), "leet", "inspect", *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def wandb_summary(run_dir: Path) -> dict[str, Any]:
    """The summary of a W&B run directory, read back with ``wandb leet inspect --summary --json``."""
    return json.loads(wandb_leet("--summary", "--json", str(run_dir)))["summary"]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
