"""``lightning-qlora``: the Hydra entry point that runs a recipe.

    lightning-qlora                                          # recipes/default.yaml: tiny Llama, CPU, minutes
    lightning-qlora --config-name llama2_7b_alpaca lora.r=32 trainer.max_steps=500
    lightning-qlora -m lora.r=4,8,16                         # a sweep: one run per value

Every recipe composes typed config groups from ``conf/`` (the schema is :mod:`lightning_qlora.config`),
so an unknown key or a wrong type stops before anything runs, with one line naming the key. The
pre-flight (:mod:`lightning_qlora.builders`) then builds the plugin, tokenizer, data and module (and
checks the model's source) before the first log or checkpoint is written; if it fails, the run
directory Hydra made is removed again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .builders import (
    PreflightError,
    build_callbacks,
    build_logger,
    build_trainer,
    model_name,
    preflight,
)
from .config import RECIPES_MODULE, describe_config_error
from .messages import fail, one_line, say


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

        artifact = wandb.Artifact(f"adapter-{run.id}", type="model", metadata={"base_model": model_name(cfg)})
        artifact.add_dir(adapter_dir)
        run.log_artifact(artifact, aliases=["latest"])
    except Exception as err:
        say(f"could not upload the adapter to W&B ({one_line(err)}); it is in {adapter_dir}")


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
    summary = train(cfg, parts)
    return summary.get("final_val_loss")


_hydra_main = hydra.main(version_base="1.3", config_path=f"pkg://{RECIPES_MODULE}", config_name="default")(
    task
)


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
        fail(describe_config_error(err, name))


def main(argv: list[str] | None = None) -> None:
    """Console script ``lightning-qlora``: Hydra's command line (``--config-name``, overrides, ``-m``)."""
    argv = sys.argv[1:] if argv is None else argv
    check_composition(argv)
    sys.argv = [sys.argv[0], *argv]
    _hydra_main()


if __name__ == "__main__":
    main()
