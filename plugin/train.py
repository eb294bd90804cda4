"""``lightning-qlora``: the Hydra entry point that runs a recipe.

    lightning-qlora                                          # recipes/default.yaml: tiny Llama, CPU, minutes
    lightning-qlora --config-name llama2_7b_alpaca lora.r=32 trainer.max_steps=500
    lightning-qlora -m lora.r=4,8,16                         # a sweep: one run per value

Every recipe composes typed config groups from ``conf/`` (schemas below), so an unknown key or a
wrong type stops before anything runs, with one line naming the key. A pre-flight step then
builds the plugin config, tokenizer and data (and checks the model's source) before the first
log or checkpoint is written; if it fails, the run directory Hydra made is removed again.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

RECIPES_MODULE = "lightning_qlora.recipes"
LOGGERS = ("wandb", "csv", "none")
EXIT_USAGE = 2


# --------------------------------------------------------------------------------------------- schemas
@dataclass
class ModelSchema:
    name_or_path: str | None = None  # hub id or local dir (from_pretrained)
    from_config: Any = None  # dict of config kwargs incl. model_type, or a config.json/dir: random weights
    tokenizer: str | None = None  # None: the model's own; "byte": the offline byte-level tokenizer
    gradient_checkpointing: bool = False
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    revision: str | None = None
    loss_chunk_size: int = 4096
    compile: Any = "auto"  # true | false | auto (compile decoder blocks on CUDA)


@dataclass
class DataSchema:
    path: str | None = None  # None: the shipped tiny instruction dataset
    name: str | None = None
    format: str = "auto"
    train_split: str = "train"
    val_split: str | None = None
    val_fraction: float = 0.05
    max_length: int = 512
    train_on_prompt: bool = False
    packing: bool = False
    batch_size: int = 4
    num_workers: int = 0
    prompt_template: str | None = None
    text_field: str = "text"
    max_samples: int | None = None
    seed: int = 42
    cache_dir: str | None = None


@dataclass
class QuantSchema:
    enabled: bool = True  # false: plain 16-bit LoRA through the same plugin (quant=none)
    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    compute_dtype: str = "bfloat16"
    quant_storage: str = "uint8"
    skip_modules: list[str] = field(default_factory=lambda: ["lm_head"])


@dataclass
class LoRASchema:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Any = "all-linear"  # "all-linear", a list of names, or a regex
    exclude_modules: list[str] = field(default_factory=list)
    use_rslora: bool = False


@dataclass
class OptimizerSchema:
    name: str = "adamw"  # adamw | adam | sgd | paged_adamw8bit
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.1


@dataclass
class TrainerSchema:
    """Lightning Trainer arguments; ``null`` leaves Lightning's default."""

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
class LoggerSchema:
    kind: str = "wandb"  # wandb | csv | none
    project: str = "lightning-qlora"
    name: str | None = None  # default: the run name
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    job_type: str | None = None
    offline: bool | None = None  # default: online iff a W&B API key is set
    log_model: bool = True  # upload the adapter as a W&B artifact (online runs)
    init_timeout: float = 60.0  # seconds W&B may take to start online before the run falls back to offline
    save_dir: str | None = None  # default: the run directory


@dataclass
class CallbacksSchema:
    memory_monitor: bool = True
    log_every_n_steps: int = 10
    grad_norm: bool = True
    checkpoint: bool = True
    checkpoint_every_n_steps: int | None = None  # null: Lightning's default (end of each epoch)
    save_adapter_on_checkpoint: bool = True


@dataclass
class SampleSchema:
    prompts: list[str] = field(default_factory=list)  # instructions, formatted like the training data
    max_new_tokens: int = 32


@dataclass
class TrainSchema:
    model: ModelSchema = field(default_factory=ModelSchema)
    data: DataSchema = field(default_factory=DataSchema)
    quant: QuantSchema = field(default_factory=QuantSchema)
    lora: LoRASchema = field(default_factory=LoRASchema)
    optimizer: OptimizerSchema = field(default_factory=OptimizerSchema)
    trainer: TrainerSchema = field(default_factory=TrainerSchema)
    logger: LoggerSchema = field(default_factory=LoggerSchema)
    callbacks: CallbacksSchema = field(default_factory=CallbacksSchema)
    sample: SampleSchema = field(default_factory=SampleSchema)
    run_name: str = "run"
    seed: int = 42
    output_dir: str = "${hydra:runtime.output_dir}"
    save_adapter: bool = True
    ckpt_path: str | None = None  # resume from this Lightning checkpoint


def register_configs() -> None:
    """Registers the schemas; ``conf/train.yaml`` puts ``train_schema`` first in every recipe."""
    ConfigStore.instance().store(name="train_schema", node=TrainSchema)


register_configs()


# --------------------------------------------------------------------------------------------- builders
class PreflightError(Exception):
    """A problem with the run's inputs, found before anything is written."""


def build_plugin(cfg: DictConfig) -> Any:
    """``QLoRAPrecision`` from ``cfg.quant`` and ``cfg.lora``."""
    from .lora import LoRAConfig
    from .nf4 import QuantConfig
    from .precision import QLoRAPrecision

    q = OmegaConf.to_container(cfg.quant, resolve=True)
    enabled = q.pop("enabled")
    quant = QuantConfig(**q) if enabled else None
    lora = LoRAConfig(**OmegaConf.to_container(cfg.lora, resolve=True))
    return QLoRAPrecision(quant=quant, lora=lora, compute_dtype=q["compute_dtype"])


def build_tokenizer(cfg: DictConfig) -> Any:
    from .tokenizer import load_tokenizer

    source = cfg.model.tokenizer or (None if cfg.model.from_config is not None else cfg.model.name_or_path)
    tokenizer = load_tokenizer(source)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # Llama/Mistral ship without one; padding is masked anyway
    return tokenizer


def build_datamodule(cfg: DictConfig, tokenizer: Any) -> Any:
    from .data import InstructDataModule

    return InstructDataModule(tokenizer, **OmegaConf.to_container(cfg.data, resolve=True))


def build_module(cfg: DictConfig, tokenizer: Any) -> Any:
    from .module import CausalLMModule

    m = cfg.model
    from_config = (
        OmegaConf.to_container(m.from_config, resolve=True)
        if OmegaConf.is_config(m.from_config)
        else m.from_config
    )
    overrides: dict[str, Any] = {"pad_token_id": tokenizer.pad_token_id}
    if from_config is not None:  # random weights: the embedding follows the tokenizer
        overrides.update(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    return CausalLMModule(
        name_or_path=m.name_or_path,
        from_config=from_config,
        config_overrides=overrides,
        gradient_checkpointing=m.gradient_checkpointing,
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        seed=cfg.seed,
        attn_implementation=m.attn_implementation,
        trust_remote_code=m.trust_remote_code,
        revision=m.revision,
        loss_chunk_size=m.loss_chunk_size,
        compile=m.compile,
    )


def check_model_source(cfg: DictConfig) -> None:
    """Loads the model's config (not its weights), so a bad path or hub id fails before the run starts."""
    from .module import _looks_local, build_hf_config

    m = cfg.model
    if m.from_config is not None:
        src = (
            m.from_config
            if isinstance(m.from_config, str)
            else OmegaConf.to_container(m.from_config, resolve=True)
        )
        if isinstance(src, str) and _looks_local(src) and not os.path.exists(os.path.expanduser(src)):
            raise PreflightError(f"model.from_config={src!r} does not exist")
        build_hf_config(src)
        return
    if not m.name_or_path:
        raise PreflightError("set model.name_or_path (hub id or local path) or model.from_config")
    path = os.path.expanduser(m.name_or_path)
    if _looks_local(m.name_or_path):
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
            f"model.name_or_path={m.name_or_path!r} cannot be loaded: {_one_line(err)}"
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
        first = _one_line(err)
    if not offline:
        _say(f"W&B online init failed ({first}); logging offline instead (upload later with `wandb sync`)")
        try:
            return _init_wandb(offline=True, **kwargs)
        except Exception as err:
            first = _one_line(err)
    _say(f"W&B is unavailable ({first}); logging to CSV in {save_dir}/csv instead")
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

    from .adapters import AdapterCheckpoint
    from .callbacks import GradNormMonitor, MemoryMonitor, RunSummary, SampleGeneration

    cb = cfg.callbacks
    callbacks: list[Any] = [
        RunSummary(config=OmegaConf.to_container(cfg, resolve=True), model_name=_model_name(cfg))
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


def _model_name(cfg: DictConfig) -> str:
    m = cfg.model
    if m.name_or_path:
        return str(m.name_or_path)
    if isinstance(m.from_config, str):
        return m.from_config
    return f"{m.from_config.get('model_type', 'model')}(from_config)"


# --------------------------------------------------------------------------------------------- the run
def preflight(cfg: DictConfig) -> dict[str, Any]:
    """Checks everything a run needs before it writes anything; returns the built objects.

    Raises:
        PreflightError, ValueError, FileNotFoundError: with a message naming the setting, file or row.
    """
    if cfg.logger.kind not in LOGGERS:
        raise PreflightError(f"logger.kind={cfg.logger.kind!r} is not supported; use one of {LOGGERS}")
    from .module import OPTIMIZERS, SCHEDULERS

    if cfg.optimizer.name not in OPTIMIZERS:
        raise PreflightError(
            f"optimizer.name={cfg.optimizer.name!r} is not supported; use one of {OPTIMIZERS}"
        )
    if cfg.optimizer.scheduler not in SCHEDULERS:
        raise PreflightError(
            f"optimizer.scheduler={cfg.optimizer.scheduler!r} is not supported; use one of {SCHEDULERS}"
        )
    if cfg.ckpt_path and not os.path.isfile(os.path.expanduser(cfg.ckpt_path)):
        raise PreflightError(f"ckpt_path={cfg.ckpt_path!r} does not exist")
    plugin = build_plugin(cfg)
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


def train(cfg: DictConfig, parts: dict[str, Any] | None = None) -> dict[str, Any]:
    """Runs a composed config end to end; returns the run summary (losses, throughput, paths)."""
    import lightning as L

    from .adapters import save_adapter
    from .callbacks import RunSummary, SampleGeneration, update_wandb_summary

    parts = parts or preflight(cfg)
    run_dir = os.path.abspath(cfg.output_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    logger = build_logger(cfg, run_dir)
    callbacks = build_callbacks(cfg, run_dir, parts["tokenizer"], parts["datamodule"])
    trainer = build_trainer(cfg, parts["plugin"], logger, callbacks)
    module = parts["module"]
    start = time.perf_counter()
    trainer.fit(module, datamodule=parts["datamodule"], ckpt_path=cfg.ckpt_path)

    summary = dict(next(c for c in callbacks if isinstance(c, RunSummary)).summary)
    summary["wall_time_s"] = time.perf_counter() - start
    summary["run_dir"] = run_dir
    if cfg.save_adapter and trainer.is_global_zero and module.model is not None:
        adapter_dir = os.path.join(run_dir, "adapter")
        save_adapter(module.model, adapter_dir, cfg.model.name_or_path, trainer.precision_plugin)
        summary["adapter_dir"] = adapter_dir
    summary["logs"] = _log_location(logger)
    if trainer.is_global_zero:
        _track_adapter(cfg, logger, summary.get("adapter_dir"))
        update_wandb_summary(trainer, {k: summary[k] for k in ("adapter_dir", "run_dir") if k in summary})
        sampler = next((c for c in callbacks if isinstance(c, SampleGeneration)), None)
        print_summary(summary, sampler)
    _finish(logger)
    return summary


def _log_location(logger: Any) -> str | None:
    if logger is None:
        return None
    run = getattr(logger, "_experiment", None)
    if run is not None and getattr(run, "dir", None):
        return os.path.dirname(run.dir)  # the wandb run dir (offline-run-... or run-...), holding run-*.wandb
    return getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)


def _track_adapter(cfg: DictConfig, logger: Any, adapter_dir: str | None) -> None:
    """Uploads the adapter as a W&B artifact when online; offline runs only record its path."""
    from lightning.pytorch.loggers import WandbLogger

    if adapter_dir is None or not isinstance(logger, WandbLogger) or not cfg.logger.log_model:
        return
    try:
        run = logger.experiment
        if run.settings.mode == "offline" or getattr(run, "offline", False):
            return
        import wandb

        artifact = wandb.Artifact(
            f"adapter-{run.id}", type="model", metadata={"base_model": _model_name(cfg)}
        )
        artifact.add_dir(adapter_dir)
        run.log_artifact(artifact, aliases=["latest"])
    except Exception as err:
        _say(f"could not upload the adapter to W&B ({_one_line(err)}); it is in {adapter_dir}")


def _finish(logger: Any) -> None:
    from lightning.pytorch.loggers import WandbLogger

    if isinstance(logger, WandbLogger):
        with contextlib.suppress(Exception):  # a multirun starts the next W&B run in this process
            logger.experiment.finish()


def print_summary(summary: dict[str, Any], sampler: Any = None) -> None:
    def fmt(key: str, unit: str = "", spec: str = ".4f") -> str:
        return f"{summary[key]:{spec}}{unit}" if summary.get(key) is not None else "n/a"

    lines = [
        f"lightning-qlora: finished {summary.get('global_step', 0)} steps in {summary.get('wall_time_s', 0):.0f} s",
        f"  train loss {fmt('final_train_loss')}   val loss {fmt('first_val_loss')} -> {fmt('final_val_loss')}",
        f"  tokens/s {fmt('mean_tokens_per_s', '', ',.0f')}   peak host RSS {fmt('peak_host_rss_gib', ' GiB', '.2f')}"
        f"   peak GPU memory {fmt('peak_gpu_mem_gib', ' GiB', '.2f')}",
        f"  adapter  {summary.get('adapter_dir', 'not saved')}",
        f"  logs     {summary.get('logs') or 'none'}",
    ]
    if summary.get("logs") and "offline-run" in str(summary["logs"]):
        lines.append(f"           (offline W&B run; upload with: wandb sync {summary['logs']})")
    if sampler is not None and sampler.prompts:
        for i, prompt in enumerate(sampler.prompts):
            before = sampler.before[i] if i < len(sampler.before) else "n/a"
            after = sampler.after[i] if i < len(sampler.after) else "n/a"
            lines += [f"  prompt  {prompt!r}", f"    before: {before!r}", f"    after:  {after!r}"]
    print("\n".join(lines), flush=True)


# --------------------------------------------------------------------------------------------- CLI
def _one_line(err: BaseException | str) -> str:
    return re.sub(r"\s*\n\s*", " ", str(err)).strip()


def _say(message: str) -> None:
    print(f"lightning-qlora: {message}", file=sys.stderr, flush=True)


def _fail(message: str) -> None:
    print(f"lightning-qlora: error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USAGE)


def _remove_partial_run(run_dir: str) -> None:
    """Removes what Hydra wrote for a run that never started (``.hydra/``, the job log), then the dir if empty."""
    if not run_dir or not os.path.isdir(run_dir):
        return
    shutil.rmtree(os.path.join(run_dir, ".hydra"), ignore_errors=True)
    job = HydraConfig.get().job.name if HydraConfig.initialized() else None
    for name in os.listdir(run_dir):
        if name.endswith(".log") and (job is None or name == f"{job}.log"):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(run_dir, name))
    with contextlib.suppress(OSError):
        os.rmdir(run_dir)


def task(cfg: DictConfig) -> float | None:
    """The Hydra task: pre-flight, then train. Returns the final validation loss (for sweepers)."""
    run_dir = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else cfg.output_dir
    try:
        OmegaConf.resolve(cfg)
        parts = preflight(cfg)
    except Exception as err:
        _remove_partial_run(run_dir)
        _fail(
            _one_line(err)
            if isinstance(err, (PreflightError, ValueError, OSError))
            else f"{type(err).__name__}: {_one_line(err)}"
        )
    summary = train(cfg, parts)
    return summary.get("final_val_loss")


_hydra_main = hydra.main(version_base="1.3", config_path=f"pkg://{RECIPES_MODULE}", config_name="default")(
    task
)


def recipes() -> list[str]:
    """Names of the shipped recipes (``--config-name`` values)."""
    files = resources.files(RECIPES_MODULE).iterdir()
    return sorted(f.name[: -len(".yaml")] for f in files if f.name.endswith(".yaml"))


def check_composition(argv: list[str]) -> None:
    """Composes the config the command line asks for (first value of each sweep), exiting with one line on error.

    Hydra would report the same errors, but as several lines and a hint about HYDRA_FULL_ERROR.
    """
    from hydra import compose, initialize_config_module
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args, _ = get_args_parser().parse_known_args(argv)
    if (
        args.help
        or args.hydra_help
        or args.info
        or args.shell_completion
        or args.config_dir
        or args.config_path
    ):
        return
    if getattr(args, "experimental_rerun", None):
        return
    name = args.config_name or "default"
    try:
        overrides = []
        for o in OverridesParser.create().parse_overrides(args.overrides):
            if o.is_sweep_override():
                first = next(iter(o.sweep_string_iterator()))
                overrides.append(f"{o.get_key_element()}={first}")
            else:
                overrides.append(o.input_line)
        with initialize_config_module(config_module=RECIPES_MODULE, version_base="1.3"):
            compose(config_name=name, overrides=overrides)
    except Exception as err:
        _fail(describe_config_error(err, name))


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
        return _one_line(err)
    if isinstance(cause, ConfigKeyError) or "not in" in str(cause):
        key = getattr(cause, "full_key", None) or ""
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        known = _schema_keys(parent)
        hint = f"; '{parent or 'the config'}' has: {', '.join(known)}" if known else ""
        if key:
            return f"unknown config key '{key}'{hint}"
    if isinstance(cause, ValidationError):
        key = getattr(cause, "full_key", "") or "?"
        msg = str(getattr(cause, "msg", cause)).splitlines()[0]
        return f"bad value for '{key}': {msg}"
    return _one_line(err)


def _schema_keys(path: str) -> list[str]:
    node: Any = OmegaConf.structured(TrainSchema)
    for part in [p for p in path.split(".") if p]:
        node = node.get(part) if OmegaConf.is_dict(node) else None
    return list(node.keys()) if OmegaConf.is_dict(node) else []


def main(argv: list[str] | None = None) -> None:
    """Console script ``lightning-qlora``: Hydra's command line (``--config-name``, overrides, ``-m``)."""
    argv = sys.argv[1:] if argv is None else argv
    check_composition(argv)
    sys.argv = [sys.argv[0], *argv]
    _hydra_main()


if __name__ == "__main__":
    main()
