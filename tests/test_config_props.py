"""Property tests of config validation: any value for any key either composes and passes the pre-flight
settings check, or fails with our own one-line error naming the key, never a library's exception.

The settings check (:func:`lightning_qlora.preflight.check_settings`) is the pre-flight minus the model,
tokenizer and data, so each example costs a Trainer built with nothing attached. The recipe is composed
once; each override is then applied the way Hydra's compose applies one (Hydra's own parser turns the
text into a value, ``OmegaConf.update`` merges it into the typed config), because a full composition
per example costs a second or more. The console script's whole path (``train.main``: exit code 2, one
line, no run directory) is exercised key by key in tests/test_faults_preflight.py.
Hypothesis runs derandomized (the same examples every run, so CI cannot flake) and keeps no database.
"""

from __future__ import annotations

import math
import string
from pathlib import Path
from typing import Any

import pytest
from conftest import micro_overrides
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import DictConfig, OmegaConf

from lightning_qlora import builders as B
from lightning_qlora import preflight as P
from lightning_qlora.config import describe_config_error, schema_keys

# The keys whose values the settings check judges. Paths and hub ids (model.name_or_path, data.path,
# model.tokenizer, ...) are left out: judging them means reading files or asking the hub, which
# tests/test_faults_preflight.py and tests/test_app.py do case by case.
CANDIDATE_KEYS = [
    "quant.enabled",
    "quant.quant_type",
    "quant.double_quant",
    "quant.blocksize",
    "quant.compute_dtype",
    "quant.quant_storage",
    "lora.r",
    "lora.alpha",
    "lora.dropout",
    "lora.use_rslora",
    "optimizer.name",
    "optimizer.lr",
    "optimizer.weight_decay",
    "optimizer.eps",
    "optimizer.scheduler",
    "optimizer.warmup_steps",
    "optimizer.warmup_ratio",
    "optimizer.min_lr_ratio",
    "data.format",
    "data.val_fraction",
    "data.max_length",
    "data.batch_size",
    "data.num_workers",
    "data.max_samples",
    "model.loss_chunk_size",
    "model.compile",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.strategy",
    "trainer.max_steps",
    "trainer.max_epochs",
    "trainer.val_check_interval",
    "trainer.check_val_every_n_epoch",
    "trainer.limit_train_batches",
    "trainer.limit_val_batches",
    "trainer.num_sanity_val_steps",
    "trainer.log_every_n_steps",
    "trainer.accumulate_grad_batches",
    "trainer.gradient_clip_val",
    "trainer.overfit_batches",
    "trainer.fast_dev_run",
    "logger.kind",
    "logger.init_timeout",
    "callbacks.log_every_n_steps",
    "callbacks.checkpoint_every_n_steps",
    "callbacks.on_nonfinite",
    "callbacks.max_skipped_batches",
    "callbacks.zero_grad_warn_steps",
    "sample.max_new_tokens",
    "seed",
]
# Keys other engineers may rename are taken from the schema as it is now.
KEYS = [
    k for k in CANDIDATE_KEYS if k.rsplit(".", 1)[-1] in schema_keys(k.rsplit(".", 1)[0] if "." in k else "")
]

NAMES = [
    "nf4",
    "fp4",
    "int8",
    "bfloat16",
    "float16",
    "float32",
    "uint8",
    "adamw",
    "sgd",
    "cosine",
    "gpu",
    "cpu",
]
NAMES += ["auto", "ddp", "stop", "skip", "wandb", "csv", "none", "chat", "text", "true", "false", "null"]
VALUES = st.one_of(
    st.integers(min_value=-(2**40), max_value=2**40),
    st.sampled_from([-2, -1, 0, 1, 2, 3, 7, 64, 100, 4096, 10**9]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.5, 0.5, 1.0, 1.5, 1e-8, 1e20, math.nan, math.inf, -math.inf]),
    st.sampled_from(NAMES),
    st.text(alphabet=string.ascii_letters + string.digits + "_-.", min_size=1, max_size=10),
)
FAST = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def render(value: object) -> str:
    """A value as a Hydra override writes it (``nan``, ``inf`` and ``-inf`` are Hydra floats)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return str(value)


def _names_the_key(message: str, key: str) -> bool:
    """Our messages name the key (``lora.r=0 must be ...``, ``bad value for 'lora.r'``); Lightning's
    refusals, relayed, name the trainer argument after saying where they come from."""
    group, leaf = key.rsplit(".", 1) if "." in key else ("", key)
    return key in message or (group == "trainer" and "refused by Lightning" in message and leaf in message)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("props")


@pytest.fixture(scope="module")
def base(out_dir: Path) -> DictConfig:
    """The default recipe with the micro overrides, composed once."""
    return B.compose_recipe("default", micro_overrides(output_dir=out_dir / "run"))


def with_override(base: DictConfig, override: str) -> DictConfig:
    """``base`` with ``key=value`` applied as Hydra's compose applies it.

    Raises:
        ValueError: our one-line text of Hydra's or OmegaConf's refusal (as ``compose_recipe`` gives).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        parsed = OverridesParser.create().parse_override(override)
        cfg = base.copy()
        OmegaConf.update(cfg, parsed.key_or_group, parsed.value(), merge=True)
    except (HydraException, OmegaConfBaseException) as err:
        raise ValueError(describe_config_error(err)) from None
    return cfg


def judge(base: DictConfig, key: str, value: Any) -> str | None:
    """None when ``key=value`` composes and passes the settings check, else the one-line refusal."""
    try:
        P.check_settings(with_override(base, f"{key}={render(value)}"))
    except (P.PreflightError, ValueError) as err:  # anything else (a library's own error) fails the test
        return str(err)
    return None


@FAST
@given(key=st.sampled_from(KEYS), value=VALUES)
def test_any_value_of_any_key_validates_or_fails_with_one_line_naming_the_key(base, out_dir, key, value):
    refusal = judge(base, key, value)
    if refusal is not None:
        assert "\n" not in refusal.strip(), refusal
        assert _names_the_key(refusal, key), f"{key}={render(value)}: {refusal}"
    assert not (out_dir / "run").exists()  # the check writes nothing


# Keys that must be positive, with values that are not: each must be refused, naming the key.
POSITIVE = [
    "lora.r",
    "lora.alpha",
    "data.batch_size",
    "optimizer.lr",
    "optimizer.eps",
    "trainer.accumulate_grad_batches",
    "trainer.log_every_n_steps",
    "logger.init_timeout",
    "sample.max_new_tokens",
]
NOT_POSITIVE = st.one_of(
    st.integers(min_value=-(10**6), max_value=0),
    st.floats(max_value=0.0, allow_infinity=True),
    st.just(math.nan),
)


@FAST
@given(key=st.sampled_from(POSITIVE), value=NOT_POSITIVE)
def test_a_value_that_is_not_positive_is_refused_naming_the_key(base, key, value):
    refusal = judge(base, key, value)
    assert refusal is not None, f"{key}={render(value)} was accepted"
    assert "\n" not in refusal.strip() and _names_the_key(refusal, key), refusal


def test_the_override_helper_agrees_with_a_real_composition(base, out_dir):
    """with_override is only a shortcut if it gives what Hydra's compose gives."""
    for override in ("lora.r=7", "optimizer.lr=1e-3", "trainer.devices=auto", "quant.blocksize=128"):
        composed = B.compose_recipe("default", [*micro_overrides(output_dir=out_dir / "run"), override])
        assert with_override(base, override) == composed, override
    for override in ("lora.r=abc", "trainer.max_steps=1.5"):
        with pytest.raises(ValueError) as ours:
            with_override(base, override)
        with pytest.raises(ValueError) as hydra:
            B.compose_recipe("default", [*micro_overrides(output_dir=out_dir / "run"), override])
        assert str(ours.value) == str(hydra.value)
