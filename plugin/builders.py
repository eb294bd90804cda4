"""Build a run's parts from its composed config, and check them all before anything is written.

Each ``build_*`` turns one group of a :class:`~lightning_qlora.config.TrainConfig` into the object it
configures; the plugin's own groups are instantiated as the plugin's own dataclasses
(``OmegaConf.to_object``), whose ``__post_init__`` refuses a bad value with a line naming its key.
:func:`preflight` runs them in order and fails before the first log, checkpoint or W&B run exists.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .config import LOGGERS, RECIPES_MODULE, describe_config_error, register_configs
from .messages import one_line, say


class PreflightError(Exception):
    """A problem with the run's inputs, found before anything is written."""


def compose_recipe(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The config ``lightning-qlora --config-name NAME OVERRIDES...`` would run, composed without running.

    Raises:
        ValueError: the recipe or an override is bad (one line naming the key; callers add where it
            came from).
    """
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    try:
        with initialize_config_module(RECIPES_MODULE, version_base="1.3"):
            return compose(name, list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise ValueError(describe_config_error(err, name)) from None


def typed(node: Any) -> Any:
    """A config group as the dataclass its schema names (``cfg.lora`` -> ``LoRAConfig``), validated."""
    return OmegaConf.to_object(node) if OmegaConf.is_config(node) else node


def build_plugin(cfg: DictConfig) -> Any:
    """``QLoRAPrecision`` from ``cfg.quant`` and ``cfg.lora`` (``quant.enabled=false``: 16-bit LoRA)."""
    from .precision import QLoRAPrecision

    return QLoRAPrecision(quant=typed(cfg.quant), lora=typed(cfg.lora))


def build_tokenizer(cfg: DictConfig) -> Any:
    """``model.tokenizer``, else the model's own (the byte tokenizer for a model built from a config)."""
    from .data import load_tokenizer

    m = cfg.model
    return load_tokenizer(m.tokenizer or (None if m.from_config is not None else m.name_or_path))


def build_datamodule(cfg: DictConfig, tokenizer: Any) -> Any:
    from .data import InstructDataModule

    return InstructDataModule(tokenizer, typed(cfg.data))


def build_module(cfg: DictConfig, tokenizer: Any) -> Any:
    """``CausalLMModule``; a model built from a config gets the tokenizer's vocabulary and special ids."""
    from .module import CausalLMModule

    model = typed(cfg.model)
    overrides: dict[str, Any] = {"pad_token_id": tokenizer.pad_token_id}
    if model.from_config is not None:  # random weights: the embedding follows the tokenizer
        overrides.update(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    return CausalLMModule(model, optimizer=typed(cfg.optimizer), seed=cfg.seed, config_overrides=overrides)


def check_model_source(cfg: DictConfig) -> None:
    """Loads the model's config (not its weights), so a bad path or hub id fails before the run starts."""
    from .hub import looks_local
    from .module import build_hf_config

    m = cfg.model
    if m.from_config is not None:
        src = m.from_config if isinstance(m.from_config, str) else OmegaConf.to_container(m.from_config)
        if isinstance(src, str) and looks_local(src) and not os.path.exists(os.path.expanduser(src)):
            raise PreflightError(f"model.from_config={src!r} does not exist")
        build_hf_config(src)
        return
    if not m.name_or_path:
        raise PreflightError("set model.name_or_path (hub id or local path) or model.from_config")
    path = os.path.expanduser(m.name_or_path)
    if looks_local(m.name_or_path):
        if not os.path.isdir(path):
            raise PreflightError(f"model.name_or_path={m.name_or_path!r} does not exist")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise PreflightError(
                f"model.name_or_path={m.name_or_path!r} has no config.json (not a saved transformers model)"
            )
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path, revision=m.revision, trust_remote_code=m.trust_remote_code)
    except Exception as err:
        raise PreflightError(
            f"model.name_or_path={m.name_or_path!r} cannot be loaded: {one_line(err)}"
        ) from err


def build_logger(cfg: DictConfig, run_dir: str) -> Any:
    """The run's Lightning logger; W&B falls back to offline, then to CSV, and says so once."""
    from lightning.pytorch.loggers import CSVLogger

    lc = cfg.logger
    save_dir = lc.save_dir or run_dir
    if lc.kind == "none":
        return None
    if lc.kind == "csv":
        return CSVLogger(save_dir=save_dir, name="csv", version="")
    offline = lc.offline if lc.offline is not None else not wandb_key_available()
    kwargs = {
        "project": lc.project,
        "name": lc.name or cfg.run_name,
        "entity": lc.entity,
        "group": lc.group,
        "tags": list(lc.tags) or None,
        "job_type": lc.job_type,
        "save_dir": save_dir,
    }
    try:
        return _init_wandb(offline=offline, init_timeout=lc.init_timeout, **kwargs)
    except Exception as err:
        first = one_line(err)
    if not offline:
        say(f"W&B online init failed ({first}); logging offline instead (upload later with `wandb sync`)")
        try:
            return _init_wandb(offline=True, **kwargs)
        except Exception as err:
            first = one_line(err)
    say(f"W&B is unavailable ({first}); logging to CSV in {save_dir}/csv instead")
    return CSVLogger(save_dir=save_dir, name="csv", version="")


def _init_wandb(offline: bool, init_timeout: float = 60.0, **kwargs: Any) -> Any:
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    os.makedirs(kwargs["save_dir"], exist_ok=True)
    settings = wandb.Settings(init_timeout=init_timeout, silent=True, console="off")
    if offline:
        settings.mode = "offline"
    logger = WandbLogger(
        offline=offline, settings=settings, **{k: v for k, v in kwargs.items() if v is not None}
    )
    logger.experiment  # noqa: B018 - initialise now, so a broken setting is caught here, not mid-run
    return logger


def wandb_key_available() -> bool:
    """True when a W&B API key is set (``WANDB_API_KEY``) or stored by ``wandb login`` (netrc)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def build_callbacks(
    cfg: DictConfig, run_dir: str, tokenizer: Any = None, datamodule: Any = None
) -> list[Any]:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from .callbacks import AdapterCheckpoint, GradNormMonitor, MemoryMonitor, RunSummary, SampleGeneration

    cb = cfg.callbacks
    callbacks: list[Any] = [
        RunSummary(config=OmegaConf.to_container(cfg, resolve=True), model_name=model_name(cfg))
    ]
    if cb.memory_monitor:
        callbacks.append(MemoryMonitor(log_every_n_steps=cb.log_every_n_steps))
    if cb.grad_norm:
        callbacks.append(GradNormMonitor())
    if cb.checkpoint:
        callbacks.append(
            ModelCheckpoint(
                dirpath=os.path.join(run_dir, "checkpoints"),
                filename="step{step}",
                auto_insert_metric_name=False,
                every_n_train_steps=cb.checkpoint_every_n_steps,
                save_last=True,
            )
        )
        if cb.save_adapter_on_checkpoint:
            # PEFT-format adapters next to the checkpoints: adapters/step-<N>/ and adapters/final/
            adapters = os.path.join(run_dir, "checkpoints", "adapters")
            callbacks.append(
                AdapterCheckpoint(dirpath=adapters, base_model_name_or_path=cfg.model.name_or_path)
            )
    if cfg.sample.prompts and tokenizer is not None:
        prompts = [_format_prompt(datamodule, p) for p in cfg.sample.prompts]
        callbacks.append(SampleGeneration(tokenizer, prompts, cfg.sample.max_new_tokens))
    return callbacks


def _format_prompt(datamodule: Any, instruction: str) -> str:
    """The prompt as training formats it: the instruction template, or the chat template for chat data."""
    fmt = getattr(datamodule, "format_prompt", None)
    if fmt is None:
        return instruction
    if getattr(datamodule, "data_format", None) == "chat":
        return fmt({"messages": [{"role": "user", "content": instruction}]})
    return fmt({"instruction": instruction, "input": ""})


def build_trainer(cfg: DictConfig, plugin: Any, logger: Any, callbacks: list[Any]) -> Any:
    import lightning as L

    # None is passed through: it is Lightning's own default for every key but check_val_every_n_epoch,
    # where it means "count val_check_interval across epochs".
    args = OmegaConf.to_container(cfg.trainer, resolve=True)
    args["default_root_dir"] = args["default_root_dir"] or cfg.output_dir
    return L.Trainer(
        plugins=[plugin], logger=logger if logger is not None else False, callbacks=callbacks, **args
    )


def model_name(cfg: DictConfig) -> str:
    return typed(cfg.model).display_name


def preflight(cfg: DictConfig) -> dict[str, Any]:
    """Checks everything a run needs before it writes anything; returns the built objects.

    Raises:
        PreflightError, ValueError, FileNotFoundError: with a message naming the setting, file or row.
    """
    if cfg.logger.kind not in LOGGERS:
        raise PreflightError(f"logger.kind={cfg.logger.kind!r} is not supported; use one of {LOGGERS}")
    if cfg.ckpt_path and not os.path.isfile(os.path.expanduser(cfg.ckpt_path)):
        raise PreflightError(f"ckpt_path={cfg.ckpt_path!r} does not exist")
    plugin = build_plugin(cfg)
    typed(cfg.optimizer)  # refuses an unknown optimizer or scheduler now, not at the first step
    check_model_source(cfg)
    tokenizer = build_tokenizer(cfg)
    datamodule = build_datamodule(cfg, tokenizer)
    datamodule.prepare_data()
    datamodule.setup("fit")
    _check_val_interval(cfg, datamodule)
    module = build_module(cfg, tokenizer)
    return {"plugin": plugin, "tokenizer": tokenizer, "datamodule": datamodule, "module": module}


def _check_val_interval(cfg: DictConfig, datamodule: Any) -> None:
    """Lightning refuses an int val_check_interval beyond one epoch only once training has started."""
    t = cfg.trainer
    train_set = getattr(datamodule, "train_dataset", None)
    if not isinstance(t.val_check_interval, int) or t.check_val_every_n_epoch is None or train_set is None:
        return
    batches = -(-len(train_set) // cfg.data.batch_size)
    if t.limit_train_batches is not None:
        limit = t.limit_train_batches
        batches = min(batches, int(limit if isinstance(limit, int) else limit * batches))
    if t.val_check_interval > batches:
        raise PreflightError(
            f"trainer.val_check_interval={t.val_check_interval} is more than the {batches} training batches of an "
            "epoch; set trainer.check_val_every_n_epoch=null to count it across epochs, or lower it"
        )
