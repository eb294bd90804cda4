"""Build a run's parts from its composed config.

Each ``build_*`` turns one group of a :class:`~lightning_qlora.config.TrainConfig` into the object it
configures; every group is instantiated as its dataclass (``OmegaConf.to_object``), whose
``__post_init__`` refuses a bad value with a line naming its key. The checks that run before any of it
is written are :mod:`lightning_qlora.preflight`'s.

The model's source follows one rule: ``model.from_config`` is used only when ``model.name_or_path``
is null. A path or hub id, once given, is what the run loads (``from_pretrained``); to build a named
model from a config, give ``model.from_config=... model.name_or_path=null``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .config import RECIPES_MODULE, describe_config_error, register_configs
from .messages import PreflightError, one_line, say
from .sharding import FSDP2Strategy, FSDPConfig


def compose_recipe(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The config ``lightning-qlora --config-name NAME OVERRIDES...`` would run, composed without running
    (with the model-source rule applied: :func:`resolve_model_source`).

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
            cfg = compose(name, list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise ValueError(describe_config_error(err, name)) from None
    resolve_model_source(cfg)  # what runs: a given model.name_or_path wins over model.from_config
    return cfg


def typed(node: Any) -> Any:
    """A config group as the dataclass its schema names (``cfg.lora`` -> ``LoRAConfig``), validated."""
    return OmegaConf.to_object(node) if OmegaConf.is_config(node) else node


def build_plugin(cfg: DictConfig) -> Any:
    """``QLoRAPrecision`` from ``cfg.quant`` and ``cfg.lora`` (``quant.enabled=false``: 16-bit LoRA)."""
    from .precision import QLoRAPrecision

    return QLoRAPrecision(quant=typed(cfg.quant), lora=typed(cfg.lora))


def builds_from_config(cfg: DictConfig) -> bool:
    """True when the model is built from ``model.from_config`` (random weights): only without a path."""
    return cfg.model.from_config is not None and not cfg.model.name_or_path


def model_config(cfg: DictConfig) -> Any:
    """``cfg.model`` as a ``ModelConfig``, with ``from_config`` dropped when ``name_or_path`` is given."""
    model = typed(cfg.model)
    if model.name_or_path and model.from_config is not None:
        model = dataclasses.replace(model, from_config=None)
    return model


def build_tokenizer(cfg: DictConfig) -> Any:
    """``model.tokenizer``, else the model's own (the byte tokenizer for a model built from a config)."""
    from .data import load_tokenizer

    m = cfg.model
    return load_tokenizer(m.tokenizer or (None if builds_from_config(cfg) else m.name_or_path))


def build_datamodule(cfg: DictConfig, tokenizer: Any) -> Any:
    from .data import InstructDataModule

    return InstructDataModule(tokenizer, typed(cfg.data))


def build_module(cfg: DictConfig, tokenizer: Any, base: str | None = None) -> Any:
    """``CausalLMModule``; a model built from a config gets the tokenizer's vocabulary and special ids.

    Args:
        base: load the model from this directory instead (the base :func:`save_base_model` wrote).
    """
    from .module import CausalLMModule

    model = model_config(cfg)
    if base is not None:
        model = dataclasses.replace(model, name_or_path=base, from_config=None)
    overrides: dict[str, Any] = {"pad_token_id": tokenizer.pad_token_id}
    if model.from_config is not None:  # random weights: the embedding follows the tokenizer
        overrides.update(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    return CausalLMModule(model, optimizer=typed(cfg.optimizer), seed=cfg.seed, config_overrides=overrides)


def build_logger(cfg: DictConfig, run_dir: str) -> Any:
    """The run's Lightning logger; W&B falls back to offline, then to CSV, and says so once."""
    from lightning.pytorch.loggers import CSVLogger

    lc = cfg.logger
    save_dir = lc.save_dir or run_dir
    if lc.kind == "none":
        return None
    if lc.kind == "csv":
        return CSVLogger(save_dir=save_dir, name="csv", version="")
    key_source = wandb_key_source()
    offline = lc.offline if lc.offline is not None else key_source is None
    kwargs = {
        "project": lc.project,
        "name": lc.name or cfg.run_name,
        "entity": lc.entity,
        "group": lc.group,
        "tags": list(lc.tags) or None,
        "job_type": lc.job_type,
        "save_dir": save_dir,
    }
    if not offline:  # online can wait for the server: say so, rather than sit silent
        say(
            f"W&B: connecting online (key found in {key_source or 'nowhere: logger.offline=false'}); falls back "
            f"to offline after {lc.init_timeout:g} s (logger.init_timeout)"
        )
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


def _init_wandb(offline: bool, init_timeout: float = 15.0, **kwargs: Any) -> Any:
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
    return wandb_key_source() is not None


def wandb_key_source() -> str | None:
    """Where the W&B API key comes from: ``"WANDB_API_KEY"``, the netrc file's path, or None."""
    if os.environ.get("WANDB_API_KEY"):
        return "WANDB_API_KEY"
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return path if netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None else None
    except (OSError, netrc.NetrcParseError):
        return None


def build_callbacks(
    cfg: DictConfig,
    run_dir: str,
    tokenizer: Any = None,
    datamodule: Any = None,
    base_model: str | None = None,
) -> list[Any]:
    """The run's callbacks; ``base_model`` (default ``model.name_or_path``) goes into each adapter's config."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from .callbacks import (
        AdapterCheckpoint,
        GradNormMonitor,
        MemoryMonitor,
        RunSummary,
        SampleGeneration,
        StepProgressBar,
    )
    from .guards import NonFiniteGuard

    cb = typed(cfg.callbacks)
    callbacks: list[Any] = [
        RunSummary(config=OmegaConf.to_container(cfg, resolve=True), model_name=model_name(cfg)),
        NonFiniteGuard(cb.on_nonfinite, cb.max_skipped_batches, cb.zero_grad_warn_steps),
    ]
    if cfg.trainer.enable_progress_bar:  # Lightning refuses a bar callback with the bar turned off
        callbacks.append(StepProgressBar())
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
            base = base_model or cfg.model.name_or_path
            callbacks.append(AdapterCheckpoint(dirpath=adapters, base_model_name_or_path=base))
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

    return L.Trainer(
        plugins=[plugin],
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        **trainer_args(cfg),
    )


def trainer_args(cfg: DictConfig) -> dict[str, Any]:
    # None is passed through: it is Lightning's own default for every key but check_val_every_n_epoch,
    # where it means "count val_check_interval across epochs".
    args = OmegaConf.to_container(cfg.trainer, resolve=True)
    args["default_root_dir"] = args["default_root_dir"] or cfg.output_dir
    fsdp = args.pop("fsdp")
    if args["strategy"] == FSDP2Strategy.strategy_name:
        args["strategy"] = FSDP2Strategy(FSDPConfig(**fsdp))
        # Validation under torch.inference_mode makes FSDP2's gathered weights inference tensors, which
        # torch 2.11 refuses to track afterwards; Lightning itself uses no_grad for its own FSDP strategy.
        args["inference_mode"] = False
    return args


def model_name(cfg: DictConfig) -> str:
    return typed(cfg.model).display_name


def save_base_model(cfg: DictConfig, tokenizer: Any, run_dir: str, dtype: Any) -> str:
    """Builds the model ``model.from_config`` describes (seeded random weights, unquantized, in the
    compute dtype) and saves it with its tokenizer as ``<run_dir>/base``; returns that path.

    The run then trains from this directory (``from_pretrained``), so the adapter's
    ``base_model_name_or_path`` names exactly the weights it was trained on, and
    ``lightning-qlora-generate`` / ``-export`` work on it. Written to a temporary directory and
    renamed, so ``base/`` is whole or absent. Under DDP the ranks launched by rank 0 find it written.
    """
    import torch
    from lightning.fabric.utilities.rank_zero import _get_rank
    from transformers import AutoModelForCausalLM

    from .module import build_hf_config

    base = os.path.join(run_dir, "base")
    if (_get_rank() or 0) > 0:  # launched by rank 0 after it wrote base/
        if not os.path.isfile(os.path.join(base, "config.json")):
            raise PreflightError(f"the base model {base} that rank 0 writes is missing")
        return base
    m = cfg.model
    src = (
        m.from_config
        if isinstance(m.from_config, str)
        else OmegaConf.to_container(m.from_config, resolve=True)
    )
    hf_config = build_hf_config(
        src,
        {
            "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # the weights training computes in: the saved base is exact
    try:
        torch.manual_seed(cfg.seed)
        kwargs = {"trust_remote_code": m.trust_remote_code}
        if m.attn_implementation:
            kwargs["attn_implementation"] = m.attn_implementation
        model = AutoModelForCausalLM.from_config(hf_config, **kwargs)
    finally:
        torch.set_default_dtype(previous)
    os.makedirs(run_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".base-", dir=run_dir)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if os.path.exists(base):
            shutil.rmtree(base)
        os.replace(tmp, base)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return base


def resolve_model_source(cfg: DictConfig) -> None:
    """Applies the model-source rule to ``cfg`` itself (so the logged config says what ran), and says so.

    ``model.name_or_path`` wins over ``model.from_config``: the default recipe's model option builds
    from a config, and a path given on top of it used to be ignored.
    """
    m = cfg.model
    if m.name_or_path and m.from_config is not None:
        say(
            f"model: loading model.name_or_path={m.name_or_path!r} (from_pretrained); model.from_config is "
            "not used when a path is given (set model.name_or_path=null to build from the config)"
        )
        with writable(cfg):
            m.from_config = None


@contextlib.contextmanager
def writable(cfg: DictConfig) -> Iterator[None]:
    readonly = OmegaConf.is_readonly(cfg)
    OmegaConf.set_readonly(cfg, False)
    try:
        yield
    finally:
        OmegaConf.set_readonly(cfg, readonly)
