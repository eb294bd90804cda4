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


@dataclass
class LoggerConfig:
    """Where metrics go.

    Args:
        kind: ``wandb`` | ``csv`` | ``none``.
        name: the W&B run name (default: the run name).
        offline: default: online iff a W&B API key is set.
        log_model: upload the adapter as a W&B artifact (online runs).
        init_timeout: seconds W&B may take to start online before the run falls back to offline.
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
    init_timeout: float = 60.0
    save_dir: str | None = None


@dataclass
class CallbacksConfig:
    """Monitors and checkpoints.

    Args:
        checkpoint_every_n_steps: ``null``: Lightning's default (end of each epoch).
        save_adapter_on_checkpoint: a PEFT-format adapter directory next to each checkpoint.
    """

    memory_monitor: bool = True
    log_every_n_steps: int = 10
    grad_norm: bool = True
    checkpoint: bool = True
    checkpoint_every_n_steps: int | None = None
    save_adapter_on_checkpoint: bool = True


@dataclass
class SampleConfig:
    """Prompts answered before and after training (instructions, formatted like the training data)."""

    prompts: list[str] = field(default_factory=list)
    max_new_tokens: int = 32


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
