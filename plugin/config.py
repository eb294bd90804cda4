"""The Hydra schema of a run, and the one-line text of a configuration error.

A recipe (``recipes/*.yaml``) composes the groups of ``conf/`` over :class:`TrainConfig`. The groups
that configure the plugin's own parts are the plugin's own dataclasses, registered as they are:
``quant`` is :class:`~lightning_qlora.QuantConfig`, ``lora`` :class:`~lightning_qlora.LoRAConfig`,
``model`` :class:`~lightning_qlora.module.ModelConfig`, ``data`` :class:`~lightning_qlora.data.DataConfig`,
``optimizer`` :class:`~lightning_qlora.optim.OptimizerConfig`. A setting is therefore declared once,
with its default and its docstring, and Hydra rejects an unknown key or a wrong type by name before
anything runs. The groups below (trainer, logger, callbacks, sample) exist only in the application.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from .data import DataConfig
from .lora import LoRAConfig
from .messages import one_line
from .module import ModelConfig
from .nf4 import QuantConfig
from .optim import OptimizerConfig
from .sharding import FSDPConfig

RECIPES_MODULE = "lightning_qlora.recipes"
LOGGERS = ("wandb", "csv", "none")


@dataclass
class TrainerConfig:
    """Lightning ``Trainer`` arguments; ``null`` leaves Lightning's default."""

    accelerator: str = "auto"
    devices: Any = 1
    strategy: str = "auto"
    num_nodes: int = 1
    max_steps: int = -1
    max_epochs: int | None = None
    max_time: str | None = None
    val_check_interval: Any = None
    check_val_every_n_epoch: int | None = 1
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    num_sanity_val_steps: int | None = None
    log_every_n_steps: int = 10
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    fast_dev_run: Any = False
    overfit_batches: Any = 0.0
    profiler: str | None = None
    enable_progress_bar: bool = True
    enable_model_summary: bool = True
    deterministic: Any = None
    default_root_dir: str | None = None
    # Used with strategy=fsdp2 (trainer=fsdp) only; the pre-flight refuses it changed under another strategy.
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)

    def __post_init__(self) -> None:
        # Lightning checks these only once fit() runs (max_steps, val_check_interval), or not at all
        # (accumulate_grad_batches=0 divides by zero mid-setup): here they fail before anything exists.
        if not _int(self.max_steps) or self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(
                f"trainer.max_steps={self.max_steps!r} must be a positive number of optimizer steps, or -1 "
                "to stop by trainer.max_epochs"
            )
        if self.max_epochs is not None and (self.max_epochs == 0 or self.max_epochs < -1):
            raise ValueError(
                f"trainer.max_epochs={self.max_epochs!r} must be a positive number, -1 (no limit) or null"
            )
        if not _int(self.accumulate_grad_batches) or self.accumulate_grad_batches < 1:
            raise ValueError(
                f"trainer.accumulate_grad_batches={self.accumulate_grad_batches!r} must be >= 1 "
                "(batches per optimizer step)"
            )
        if self.num_nodes < 1:
            raise ValueError(f"trainer.num_nodes={self.num_nodes!r} must be >= 1")
        if self.log_every_n_steps < 1:
            raise ValueError(f"trainer.log_every_n_steps={self.log_every_n_steps!r} must be >= 1")
        if self.check_val_every_n_epoch is not None and self.check_val_every_n_epoch < 1:
            raise ValueError(
                f"trainer.check_val_every_n_epoch={self.check_val_every_n_epoch!r} must be >= 1, or null to "
                "count trainer.val_check_interval across epochs"
            )
        if self.num_sanity_val_steps is not None and self.num_sanity_val_steps < -1:
            raise ValueError(
                f"trainer.num_sanity_val_steps={self.num_sanity_val_steps!r} must be >= 0, or -1 for all"
            )
        if self.gradient_clip_val is not None and not (
            _number(self.gradient_clip_val) and self.gradient_clip_val >= 0
        ):
            raise ValueError(
                f"trainer.gradient_clip_val={self.gradient_clip_val!r} must be >= 0, or null for no clipping"
            )
        _check_batches("trainer.val_check_interval", self.val_check_interval, zero=False, none=True)
        _check_batches("trainer.limit_train_batches", self.limit_train_batches, zero=False, none=True)
        _check_batches("trainer.limit_val_batches", self.limit_val_batches, zero=True, none=True)
        _check_batches("trainer.overfit_batches", self.overfit_batches, zero=True, none=False)
        if not (isinstance(self.fast_dev_run, bool) or (_int(self.fast_dev_run) and self.fast_dev_run >= 0)):
            raise ValueError(
                f"trainer.fast_dev_run={self.fast_dev_run!r} must be true/false or a number of batches"
            )
        _check_devices(self.devices)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    """A real, finite number (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_batches(key: str, value: Any, zero: bool, none: bool) -> None:
    """Lightning's batch-count settings: an int (a number of batches) or a float in (0, 1] (a fraction)."""
    if value is None and none:
        return
    if _int(value) and (value > 0 or (zero and value == 0)):
        return
    if _number(value) and isinstance(value, float) and (0 < value <= 1 or (zero and value == 0)):
        return
    least = "0" if zero else "1"
    raise ValueError(
        f"{key}={value!r} must be a number of batches (>= {least}) or a fraction in "
        f"{'[0' if zero else '(0'}, 1.0]{', or null' if none else ''}"
    )


def _check_devices(devices: Any) -> None:
    ok = (
        devices == "auto"
        or (_int(devices) and (devices >= 1 or devices == -1))
        or (
            isinstance(devices, str)
            and all(p.strip().isdigit() for p in devices.split(",") if p.strip())
            and devices.strip()
        )
        or (isinstance(devices, (list, tuple)) and devices and all(_int(d) and d >= 0 for d in devices))
    )
    if not ok:
        raise ValueError(
            f"trainer.devices={devices!r} must be a number of devices (>= 1), -1 (all), 'auto', or device "
            "indices like [0, 1]"
        )


@dataclass
class LoggerConfig:
    """Where metrics go.

    Args:
        kind: ``wandb`` | ``csv`` | ``none``.
        name: the W&B run name (default: the run name).
        offline: default: online iff a W&B API key is set.
        log_model: upload the adapter as a W&B artifact (online runs).
        init_timeout: seconds W&B may take to start online before the run falls back to offline (said
            on the console when it tries).
        save_dir: default: the run directory.
    """

    kind: str = "wandb"
    project: str = "lightning-qlora"
    name: str | None = None
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    job_type: str | None = None
    offline: bool | None = None
    log_model: bool = True
    init_timeout: float = 15.0
    save_dir: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in LOGGERS:
            raise ValueError(f"logger.kind={self.kind!r} is not supported; use one of {', '.join(LOGGERS)}")
        if not _number(self.init_timeout) or self.init_timeout <= 0:
            raise ValueError(
                f"logger.init_timeout={self.init_timeout!r} must be a positive number of seconds"
            )


NONFINITE_POLICIES = ("stop", "skip")


@dataclass
class CallbacksConfig:
    """Monitors, checkpoints and the non-finite guard (:class:`~lightning_qlora.guards.NonFiniteGuard`).

    Args:
        checkpoint_every_n_steps: ``null``: Lightning's default (end of each epoch).
        save_adapter_on_checkpoint: a PEFT-format adapter directory next to each checkpoint.
        on_nonfinite: what a NaN/inf loss, gradient or adapter weight does: ``stop`` ends the run
            (exit code 3) keeping the last good adapter as the final one; ``skip`` drops that batch's
            update and goes on, up to ``max_skipped_batches``, then stops.
        max_skipped_batches: with ``skip``: how many updates may be skipped in a run before it stops.
        zero_grad_warn_steps: warn once when the adapters' gradient is exactly zero for this many
            optimizer steps in a row (nothing is learned; 0 turns the warning off).
    """

    memory_monitor: bool = True
    log_every_n_steps: int = 10
    grad_norm: bool = True
    checkpoint: bool = True
    checkpoint_every_n_steps: int | None = None
    save_adapter_on_checkpoint: bool = True
    on_nonfinite: str = "stop"
    max_skipped_batches: int = 10
    zero_grad_warn_steps: int = 10

    def __post_init__(self) -> None:
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(
                f"callbacks.on_nonfinite={self.on_nonfinite!r} is not a policy; use one of "
                f"{', '.join(NONFINITE_POLICIES)}"
            )
        if self.max_skipped_batches < 0:
            raise ValueError(f"callbacks.max_skipped_batches={self.max_skipped_batches!r} must be >= 0")
        if self.zero_grad_warn_steps < 0:
            raise ValueError(
                f"callbacks.zero_grad_warn_steps={self.zero_grad_warn_steps!r} must be >= 0 (0: no warning)"
            )
        if self.log_every_n_steps < 1:
            raise ValueError(f"callbacks.log_every_n_steps={self.log_every_n_steps!r} must be >= 1")
        if self.checkpoint_every_n_steps is not None and self.checkpoint_every_n_steps < 1:
            raise ValueError(
                f"callbacks.checkpoint_every_n_steps={self.checkpoint_every_n_steps!r} must be >= 1, or null "
                "(the end of each epoch)"
            )


@dataclass
class SampleConfig:
    """Prompts answered before and after training (instructions, formatted like the training data)."""

    prompts: list[str] = field(default_factory=list)
    max_new_tokens: int = 32

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"sample.max_new_tokens={self.max_new_tokens!r} must be >= 1")


def _schema(cls: type) -> Any:
    """A group's default: the dataclass's fields as a config node, so no ``__post_init__`` runs (it
    would turn ``compute_dtype`` into a ``torch.dtype``, which a config cannot hold)."""
    return field(default_factory=lambda: OmegaConf.structured(cls))


@dataclass
class TrainConfig:
    """A whole run: what every recipe composes. ``ckpt_path`` resumes from a Lightning checkpoint."""

    model: ModelConfig = _schema(ModelConfig)
    data: DataConfig = _schema(DataConfig)
    quant: QuantConfig = _schema(QuantConfig)
    lora: LoRAConfig = _schema(LoRAConfig)
    optimizer: OptimizerConfig = _schema(OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    run_name: str = "run"
    seed: int = 42
    output_dir: str = "${hydra:runtime.output_dir}"
    save_adapter: bool = True
    ckpt_path: str | None = None


def register_configs() -> None:
    """Registers the schema; ``conf/train.yaml`` puts ``train_schema`` first in every recipe."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


register_configs()


def recipes() -> list[str]:
    """Names of the shipped recipes (``--config-name`` values)."""
    files = resources.files(RECIPES_MODULE).iterdir()
    return sorted(f.name[: -len(".yaml")] for f in files if f.name.endswith(".yaml") and f.name[0] != "_")


def describe_config_error(err: BaseException, config_name: str = "default") -> str:
    """One line for a Hydra/OmegaConf composition error: the key, the bad value, the allowed values."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

    cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else err
    if isinstance(err, MissingConfigException):
        missing = err.missing_cfg_file or ""
        if "/" in missing and err.options:
            group, option = missing.rsplit("/", 1)
            return f"{group}={option} is not an option of '{group}'; choose one of: {', '.join(sorted(err.options))}"
        if missing == config_name or "primary config" in str(err):
            return f"no recipe named '{config_name}'; recipes: {', '.join(recipes())}"
        return one_line(err)
    if isinstance(cause, ConfigKeyError) or "not in" in str(cause):
        key = getattr(cause, "full_key", None) or ""
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        known = schema_keys(parent)
        hint = f"; '{parent or 'the config'}' has: {', '.join(known)}" if known else ""
        if key:
            return f"unknown config key '{key}'{hint}"
    if isinstance(cause, ValidationError):
        key = getattr(cause, "full_key", "") or "?"
        msg = str(getattr(cause, "msg", cause)).splitlines()[0]
        return f"bad value for '{key}': {msg}"
    return one_line(err)


def schema_keys(path: str) -> list[str]:
    """The keys the schema allows under ``path`` (``"lora"``, ``""`` for the top level)."""
    node: Any = OmegaConf.structured(TrainConfig)
    for part in [p for p in path.split(".") if p]:
        node = node.get(part) if OmegaConf.is_dict(node) else None
    return list(node.keys()) if OmegaConf.is_dict(node) else []
