"""``lightning-qlora``: the Hydra entry point that runs a recipe.

    lightning-qlora                                          # recipes/default.yaml: tiny Llama, CPU, minutes
    lightning-qlora --config-name llama2_7b_alpaca lora.r=32 trainer.max_steps=500
    lightning-qlora -m lora.r=4,8,16                         # a sweep: one run per value

Every recipe composes typed config groups from ``conf/`` (the schema is :mod:`lightning_qlora.config`),
so an unknown key or a wrong type stops before anything runs, with one line naming the key. The
pre-flight (:mod:`lightning_qlora.builders`) then checks every setting, the device, the files and the
output directories, and builds the plugin, tokenizer, data and module, before the first log or
checkpoint is written; if it fails, the run directory Hydra made is removed again (exit code 2).
A run that diverges (NaN/inf) stops with one line, keeps its last good adapter, and exits with code 3.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import sys
import time
from importlib import resources
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .builders import (
    build_callbacks,
    build_logger,
    build_module,
    build_trainer,
    builds_from_config,
    model_name,
)
from .config import RECIPES_MODULE, describe_config_error, recipes
from .messages import EXIT_TRAINING, PreflightError, fail, one_line, say
from .preflight import preflight


class TrainingStopped(RuntimeError):
    """The run stopped on a non-finite loss, gradient or weight; the last good adapter was saved.

    Attributes:
        summary: what the run got to (step, paths), as :func:`train` returns it.
    """

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


def train(cfg: DictConfig, parts: dict[str, Any] | None = None) -> dict[str, Any]:
    """Runs a composed config end to end; returns the run summary (losses, throughput, paths).

    Raises:
        TrainingStopped: a NaN/inf loss, gradient or adapter weight stopped the run (with
            ``callbacks.on_nonfinite=stop``, or ``skip`` past ``callbacks.max_skipped_batches``); the
            last good adapter is the saved one.
    """
    import lightning as L

    from .adapters import save_adapter
    from .builders import save_base_model
    from .callbacks import AdapterCheckpoint, RunSummary, SampleGeneration, update_wandb_summary
    from .guards import NonFiniteError
    from .sharding import gathered_adapters

    parts = parts or preflight(cfg)
    run_dir = os.path.abspath(cfg.output_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = parts["module"]
    base_model = cfg.model.name_or_path
    if builds_from_config(cfg):
        # Saved first and trained from: the adapter's base is then a directory that holds exactly the
        # weights it was trained on, which export and generate can load.
        base_model = save_base_model(cfg, parts["tokenizer"], run_dir, parts["plugin"].dtype)
        module = build_module(cfg, parts["tokenizer"], base=base_model)
    logger = build_logger(cfg, run_dir)
    callbacks = build_callbacks(cfg, run_dir, parts["tokenizer"], parts["datamodule"], base_model=base_model)
    trainer = build_trainer(cfg, parts["plugin"], logger, callbacks)
    start = time.perf_counter()
    stopped: NonFiniteError | None = None
    try:
        trainer.fit(module, datamodule=parts["datamodule"], ckpt_path=cfg.ckpt_path)
    except NonFiniteError as err:  # the guard put the last good adapter back into the model
        stopped = err

    summary = dict(next(c for c in callbacks if isinstance(c, RunSummary)).summary)
    summary.setdefault("global_step", trainer.global_step)
    summary["wall_time_s"] = time.perf_counter() - start
    summary["run_dir"] = run_dir
    summary["base_model"] = base_model
    summary["tokenizer_flag"] = _tokenizer_flag(cfg, base_model)
    summary["data"] = dict(getattr(parts["datamodule"], "stats", None) or {})
    if cfg.save_adapter and module.model is not None:
        adapter_dir = os.path.join(run_dir, "adapter")
        with gathered_adapters(module.model):  # every rank gathers FSDP's shards; rank zero writes
            if trainer.is_global_zero:
                save_adapter(module.model, adapter_dir, base_model, trainer.precision_plugin)
        summary["adapter_dir"] = adapter_dir
    final = None
    if stopped is not None and module.model is not None:
        # Lightning skips on_fit_end after an exception: write adapters/final (the last good one) here.
        for cb in callbacks:
            if isinstance(cb, AdapterCheckpoint):
                cb.on_fit_end(trainer, module)
                final = os.path.join(str(cb.dirpath), "final")
    summary["logs"] = _log_location(logger)
    if stopped is not None:
        summary.update(stopped_at_step=stopped.step, last_good_step=stopped.good_step)
        update_wandb_summary(trainer, {"stopped": str(stopped), **summary_paths(summary)})
        _finish(logger, exit_code=EXIT_TRAINING)
        where = summary.get("adapter_dir") or final
        raise TrainingStopped(
            f"{stopped}: {where}" if where else f"{stopped} (not saved: save_adapter=false)", summary
        )
    if trainer.is_global_zero:
        _track_adapter(cfg, logger, summary.get("adapter_dir"))
        update_wandb_summary(trainer, summary_paths(summary))
        sampler = next((c for c in callbacks if isinstance(c, SampleGeneration)), None)
        print_summary(summary, sampler)
    _finish(logger)
    return summary


def summary_paths(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: summary[k] for k in ("adapter_dir", "run_dir", "base_model") if summary.get(k)}


def _tokenizer_flag(cfg: DictConfig, base_model: str | None) -> str | None:
    """The ``--tokenizer`` export/generate need: the run's own, when the base does not carry it."""
    tok = cfg.model.tokenizer
    if not tok or builds_from_config(cfg) or tok == base_model:
        return None  # a saved base holds its tokenizer; none set means the base's own
    return tok


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

        artifact = wandb.Artifact(f"adapter-{run.id}", type="model", metadata={"base_model": model_name(cfg)})
        artifact.add_dir(adapter_dir)
        run.log_artifact(artifact, aliases=["latest"])
    except Exception as err:
        say(f"could not upload the adapter to W&B ({one_line(err)}); it is in {adapter_dir}")


def _finish(logger: Any, exit_code: int = 0) -> None:
    from lightning.pytorch.loggers import WandbLogger

    if isinstance(logger, WandbLogger):
        with contextlib.suppress(Exception):  # a multirun starts the next W&B run in this process
            logger.experiment.finish(exit_code=exit_code)


def print_summary(summary: dict[str, Any], sampler: Any = None) -> None:
    def fmt(key: str, unit: str = "", spec: str = ".4f") -> str:
        return f"{summary[key]:{spec}}{unit}" if summary.get(key) is not None else "n/a"

    lines = [
        f"lightning-qlora: finished {summary.get('global_step', 0)} steps in {summary.get('wall_time_s', 0):.0f} s",
        f"  train loss {fmt('final_train_loss')}   val loss {fmt('first_val_loss')} -> {fmt('final_val_loss')}",
        f"  tokens/s {fmt('mean_tokens_per_s', '', ',.0f')} (after {summary.get('warmup_steps', 0)} warm-up steps "
        f"of {fmt('warmup_s', ' s', '.1f')}; first step after {fmt('time_to_first_step_s', ' s', '.1f')})",
        f"  peak host RSS {fmt('peak_host_rss_gib', ' GiB', '.2f')}   peak GPU memory {fmt('peak_gpu_mem_gib', ' GiB', '.2f')}",
        f"  adapter  {summary.get('adapter_dir', 'not saved')}",
    ]
    if summary.get("base_model"):
        lines.append(f"  base     {summary['base_model']}")
    data = data_line(summary.get("data") or {})
    if data:
        lines.append(f"  data     {data}")
    lines.append(f"  logs     {summary.get('logs') or 'none'}")
    if summary.get("logs") and "offline-run" in str(summary["logs"]):
        lines.append(f"           (offline W&B run; upload with: wandb sync {summary['logs']})")
    commands = usage_commands(summary)
    if commands:
        lines += [f"  use it   {commands[0]}", *(f"           {c}" for c in commands[1:])]
    if sampler is not None and sampler.prompts:
        for i, prompt in enumerate(sampler.prompts):
            before = sampler.before[i] if i < len(sampler.before) else "n/a"
            after = sampler.after[i] if i < len(sampler.after) else "n/a"
            lines += [f"  prompt  {prompt!r}", f"    before: {before!r}", f"    after:  {after!r}"]
    print("\n".join(lines), flush=True)


def usage_commands(summary: dict[str, Any], prompt: str = "hi") -> list[str]:
    """The generate and export commands that load this run's adapter over its base, ready to paste."""
    base, adapter = summary.get("base_model"), summary.get("adapter_dir")
    if not base or not adapter:
        return []
    q = shlex.quote
    tok = f" --tokenizer {q(summary['tokenizer_flag'])}" if summary.get("tokenizer_flag") else ""
    merged = os.path.join(summary.get("run_dir") or os.path.dirname(adapter), "merged")
    return [
        f"lightning-qlora-generate --model {q(base)} --adapter {q(adapter)}{tok} --prompt {q(prompt)}",
        f"lightning-qlora-export --base {q(base)} --adapter {q(adapter)} --out {q(merged)}{tok}",
    ]


def data_line(stats: dict[str, Any]) -> str:
    """The rows trained and validated on, and what ``data.max_length`` / ``data.on_overlong`` cost."""
    if not stats:
        return ""
    line = f"{stats.get('train_rows', '?')} train / {stats.get('val_rows', 0)} val rows"
    losses = data_losses(stats)
    return f"{line}; {losses.removeprefix('data: ')}" if losses else line


def data_losses(stats: dict[str, Any]) -> str | None:
    """The data module's own line on dropped and truncated rows (and tokens), or a plain count."""
    try:
        from .data.datamodule import describe_data_losses
    except ImportError:  # a data module without it: count what its stats hold
        dropped, truncated = stats.get("dropped", 0), stats.get("truncated", 0)
        return f"data: {dropped} rows dropped, {truncated} truncated" if dropped or truncated else None
    return describe_data_losses(stats)


# --------------------------------------------------------------------------------------------- CLI
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
        fail(
            one_line(err)
            if isinstance(err, (PreflightError, ValueError, OSError))
            else f"{type(err).__name__}: {one_line(err)}"
        )
    from lightning.fabric.utilities.rank_zero import _get_rank

    rank_zero = (_get_rank() or 0) == 0  # under DDP every rank runs this; one of them speaks
    if rank_zero:
        say(f"pre-flight ok: {preflight_line(cfg, parts)}")
        losses = data_losses(dict(getattr(parts["datamodule"], "stats", None) or {}))
        if losses:  # rows dropped or cut by data.max_length: said before training, not discovered after
            say(losses)
    try:
        summary = train(cfg, parts)
    except TrainingStopped as err:  # every rank stops at the same step (the guard's decision is reduced)
        if not rank_zero:
            sys.exit(EXIT_TRAINING)
        fail(str(err), code=EXIT_TRAINING)
    return summary.get("final_val_loss")


def preflight_line(cfg: DictConfig, parts: dict[str, Any]) -> str:
    """What the pre-flight found: the model, the plugin, and the rows the data module kept."""
    stats = dict(getattr(parts.get("datamodule"), "stats", None) or {})
    plugin = parts.get("plugin")
    text = f"model {model_name(cfg)}, {getattr(plugin, 'precision', 'plugin')}, lora.r={cfg.lora.r}"
    if stats:
        text += f"; data {stats.get('train_rows', '?')} train / {stats.get('val_rows', 0)} val rows"
    return text


_hydra_main = hydra.main(version_base="1.3", config_path=f"pkg://{RECIPES_MODULE}", config_name="default")(
    task
)


def check_composition(argv: list[str]) -> None:
    """Composes the config the command line asks for (first value of each sweep), exiting with one line on error.

    Hydra would report the same errors, but as several lines and a hint about HYDRA_FULL_ERROR. Also
    checks that the run directory Hydra is about to create can be written: Hydra's own failure there
    is a chain of tracebacks.
    """
    from hydra import compose, initialize_config_module
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from .preflight import check_writable

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
            cfg = compose(config_name=name, overrides=overrides, return_hydra_config=True)
            key = "hydra.sweep.dir" if args.multirun else "hydra.run.dir"
            run_dir = None if args.cfg else OmegaConf.select(cfg, key)
    except Exception as err:
        fail(describe_config_error(err, name))
    if run_dir:
        try:
            check_writable(os.path.abspath(os.path.expanduser(str(run_dir))), f"the run directory ({key})")
        except PreflightError as err:
            fail(str(err))


def help_text(config_name: str = "default") -> str:
    """``lightning-qlora --help``: the recipes, the config groups with their options, the keys, examples."""
    from hydra import compose, initialize_config_module

    from .config import schema_keys

    choices: dict[str, Any] = {}
    with contextlib.suppress(Exception):  # an unknown recipe still gets the help, without its choices
        with initialize_config_module(config_module=RECIPES_MODULE, version_base="1.3"):
            cfg = compose(config_name=config_name, return_hydra_config=True)
            choices = dict(cfg.hydra.runtime.choices)
    lines = [
        "usage: lightning-qlora [--config-name RECIPE] [GROUP=OPTION ...] [KEY=VALUE ...] [-m] [--cfg job]",
        "",
        "Fine-tunes LoRA adapters over a 4-bit (NF4) base model with QLoRAPrecision, as a recipe says.",
        "",
        "recipes (--config-name RECIPE; default: default):",
    ]
    for name in recipes():
        lines.append(f"  {name:<20} {_first_comment(resources.files(RECIPES_MODULE) / f'{name}.yaml')}")
    lines += ["", f"config groups (GROUP=OPTION; * = the choice of recipe '{config_name}'):"]
    conf = resources.files("lightning_qlora.conf")
    for group in sorted(g.name for g in conf.iterdir() if g.is_dir() and not g.name.startswith("_")):
        options = sorted(
            o.name[: -len(".yaml")] for o in (conf / group).iterdir() if o.name.endswith(".yaml")
        )
        marked = [f"{o}*" if choices.get(group) == o else o for o in options]
        lines += _wrap(f"{group:<10} {', '.join(marked)}", 2, 13)
        if schema_keys(group):
            lines += _wrap(f"keys: {', '.join(schema_keys(group))}", 13, 19)
    lines += [
        *_wrap(
            f"top-level keys: {', '.join(_top_level_keys())}, sample.prompts, sample.max_new_tokens", 2, 8
        ),
        "",
        "examples:",
        "  lightning-qlora                                   # the default recipe: tiny Llama, CPU, no downloads",
        "  lightning-qlora trainer.accelerator=gpu lora.r=32 trainer.max_steps=500",
        "  lightning-qlora --config-name llama2_7b_alpaca data.max_length=1024",
        "  lightning-qlora model=local model.name_or_path=/path/to/saved_model",
        "  lightning-qlora data=local data.path=my.jsonl",
        "  lightning-qlora -m lora.r=4,8,16                  # a sweep: one run per value",
        "  lightning-qlora ckpt_path=outputs/.../checkpoints/last.ckpt   # resume",
        "  lightning-qlora --cfg job                         # print the composed config and stop",
        "",
        "Bad input stops before training with one line and exit code 2; a run that diverges (NaN) stops",
        "with exit code 3 and keeps its last good adapter. Hydra's own flags: --hydra-help. Guide: docs/app.md",
    ]
    return "\n".join(lines)


def _wrap(text: str, indent: int, hanging: int, width: int = 110) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width, initial_indent=" " * indent, subsequent_indent=" " * hanging)


def _top_level_keys() -> list[str]:
    from .config import schema_keys

    groups = {"model", "data", "quant", "lora", "optimizer", "trainer", "logger", "callbacks", "sample"}
    return [k for k in schema_keys("") if k not in groups]


def _first_comment(path: Any) -> str:
    """The first sentence of a recipe file's opening comment: what it is."""
    words = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#") or not line.strip("# "):
            break
        words.append(line.lstrip("# ").rstrip())
    text = " ".join(words)
    return text.split(". ")[0].rstrip(".") if text else ""


def main(argv: list[str] | None = None) -> None:
    """Console script ``lightning-qlora``: Hydra's command line (``--config-name``, overrides, ``-m``)."""
    from hydra._internal.utils import get_args_parser

    argv = sys.argv[1:] if argv is None else argv
    args, _ = get_args_parser().parse_known_args(argv)
    if args.help:  # Hydra's own help cannot list groups that come from the recipe's search path
        print(help_text(args.config_name or "default"))
        return
    check_composition(argv)
    sys.argv = [sys.argv[0], *argv]
    _hydra_main()


if __name__ == "__main__":
    main()
