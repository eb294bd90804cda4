"""The pre-flight: everything a run needs, checked before anything is written.

:func:`preflight` builds the parts (:mod:`lightning_qlora.builders`) in order and checks what only the
machine can tell: the settings together, the device, the trainer, ``ckpt_path``, the model's files, the
tokenizer against the model, the data, the memory budget and that every output directory is writable.
A problem is a :class:`~lightning_qlora.messages.PreflightError` (or ``ValueError``/``OSError``) with
one line naming the setting, file or row, raised before the first log, checkpoint or W&B run exists.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .builders import (
    build_datamodule,
    build_module,
    build_plugin,
    build_tokenizer,
    builds_from_config,
    resolve_model_source,
    trainer_args,
    typed,
)
from .messages import PreflightError, one_line, say
from .sharding import FSDP2Strategy, FSDPConfig


def check_model_source(cfg: DictConfig) -> Any:
    """Loads the model's config (not its weights) and opens its weights files' headers, so a bad path,
    hub id or damaged file fails before the run starts. Returns the transformers config."""
    from .hub import looks_local
    from .module import build_hf_config

    m = cfg.model
    if builds_from_config(cfg):
        src = m.from_config if isinstance(m.from_config, str) else OmegaConf.to_container(m.from_config)
        if isinstance(src, str) and looks_local(src) and not os.path.exists(os.path.expanduser(src)):
            raise PreflightError(f"model.from_config={src!r} does not exist")
        return build_hf_config(src)
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
        config = AutoConfig.from_pretrained(path, revision=m.revision, trust_remote_code=m.trust_remote_code)
    except Exception as err:
        raise PreflightError(
            f"model.name_or_path={m.name_or_path!r} cannot be loaded: {one_line(err)}"
        ) from err
    if looks_local(m.name_or_path):
        check_weight_files(path, f"model.name_or_path={m.name_or_path!r}")
    return config


WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def check_weight_files(directory: str, label: str) -> list[str]:
    """Opens the header of every weights file of a saved model (not the weights): a truncated or
    missing shard fails here, not after the run started. Returns the files checked.

    Raises:
        PreflightError: no weights, an index naming a missing file, or a file that is not whole.
    """
    import zipfile

    from safetensors import safe_open

    index = next(
        (os.path.join(directory, n) for n in WEIGHT_INDEXES if os.path.isfile(os.path.join(directory, n))),
        None,
    )
    if index is not None:
        try:
            with open(index, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise PreflightError(
                f"{label}: {os.path.basename(index)} is not a valid weights index ({one_line(err)})"
            ) from None
    else:
        files = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
        files = files or [n for n in ("pytorch_model.bin",) if os.path.isfile(os.path.join(directory, n))]
    if not files:
        raise PreflightError(
            f"{label} has no weights (model.safetensors or pytorch_model.bin); to build a model from a config "
            "with random weights use model.from_config=<its config.json> model.name_or_path=null"
        )
    for name in files:
        file = os.path.join(directory, name)
        if not os.path.isfile(file):
            raise PreflightError(f"{label}: the weights file {name} named by its index is missing")
        try:
            if name.endswith(".safetensors"):
                with safe_open(file, framework="pt") as f:
                    f.keys()  # the header is read, and checked against the file's length, on open
            else:
                zipfile.ZipFile(file).close()  # torch's format is a zip: its directory is at the end
        except Exception as err:
            raise PreflightError(
                f"{label}: {name} is damaged or truncated ({one_line(err)}); save or download the model again"
            ) from None
    return files


def preflight(cfg: DictConfig) -> dict[str, Any]:
    """Checks everything a run needs before it writes anything; returns the built objects.

    Order: the settings alone (:func:`check_settings`: every group, the device, the trainer, the
    output directories), ``ckpt_path`` (readable, same plugin settings), the model's source (config,
    weights files), the tokenizer, the checkpoint against the model, and the data, read, validated and
    tokenized (and the checkpoint's saved data position against it).

    Raises:
        PreflightError, ValueError, FileNotFoundError: with a message naming the setting, file or row.
    """
    resolve_model_source(cfg)
    plugin = check_settings(cfg)
    ckpt = check_checkpoint(cfg.ckpt_path, plugin, sharded=_sharded(cfg)) if cfg.ckpt_path else None
    hf_config = check_model_source(cfg)
    if not builds_from_config(cfg):  # a 4-bit checkpoint must match the quant settings: known before loading
        from .checkpoint4bit_check import preflight_checkpoint

        preflight_checkpoint(
            cfg.model.name_or_path, plugin.quant, trust_remote_code=cfg.model.trust_remote_code
        )
    tokenizer = build_tokenizer(cfg)
    _check_tokenizer_fits(cfg, tokenizer, hf_config)
    if ckpt is not None:
        check_checkpoint_fits_model(
            cfg.ckpt_path, ckpt, hf_config, trust_remote_code=cfg.model.trust_remote_code
        )
        seed = (ckpt.get("hyper_parameters") or {}).get("seed")
        if builds_from_config(cfg) and seed is not None and seed != cfg.seed:
            # The base is rebuilt from the config with this run's seed: another seed, other random weights.
            raise PreflightError(
                f"ckpt_path={cfg.ckpt_path!r} was trained over a model built from a config with seed={seed}; "
                f"seed={cfg.seed} would build other random weights under its adapters; set seed={seed}"
            )
    datamodule = build_datamodule(cfg, tokenizer)
    datamodule.prepare_data()
    datamodule.setup("fit")
    _check_val_interval(cfg, datamodule)
    if builds_from_config(cfg) and hf_config is not None:
        hf_config.vocab_size = len(tokenizer)  # a model built from a config takes the tokenizer's vocabulary
    _check_memory_budget(cfg, hf_config, plugin)
    _check_fits_gpu(cfg, hf_config, plugin)
    problem = (
        datamodule.resume_problem(ckpt, replicas=_processes(cfg))
        if ckpt is not None and hasattr(datamodule, "resume_problem")
        else None
    )
    if problem:
        raise PreflightError(f"ckpt_path={cfg.ckpt_path!r}: {problem}")
    module = build_module(cfg, tokenizer)
    return {"plugin": plugin, "tokenizer": tokenizer, "datamodule": datamodule, "module": module}


def _sharded(cfg: DictConfig) -> bool:
    """The run shards the model (``trainer=fsdp``: ``FSDP2Strategy``)."""
    return str(cfg.trainer.strategy) == FSDP2Strategy.strategy_name


def _processes(cfg: DictConfig) -> int:
    """The processes the run trains with (each takes its share of the data): devices x nodes."""
    from .estimate import trainer_devices

    return trainer_devices(cfg.trainer, [])


def _check_memory_budget(cfg: DictConfig, hf_config: Any, plugin: Any) -> None:
    """``activation_checkpointing=auto``: a budget that no checkpointing setting meets stops here, with the
    estimate (eager, the larger one; the module chooses again from the first batch's real shape)."""
    if cfg.model.activation_checkpointing != "auto" or hf_config is None:
        return
    from .module import plan_checkpointing

    sharded = _sharded(cfg)
    estimate = plan_checkpointing(
        typed(cfg.model), hf_config, cfg.data.batch_size, cfg.data.max_length, plugin,
        dtype_bytes=plugin.dtype.itemsize, devices=_processes(cfg) if sharded else 1, sharded=sharded,
    )  # fmt: skip
    say(
        f"model.activation_checkpointing=auto: {estimate.checkpointing}"
        + (f" (one layer in {estimate.every_n_layers})" if estimate.checkpointing == "every_n_layers" else "")
        + f", estimated peak {estimate.total / 2**30:.1f} GiB of model.max_memory_gib={cfg.model.max_memory_gib:g}"
    )


# How far the estimate has landed above measured peaks (H200: +1% to +5%, BENCHMARKS.md): a run estimated
# within this much over its GPU may still fit, so it is warned about rather than stopped.
ESTIMATE_MARGIN = 0.10


def _check_fits_gpu(cfg: DictConfig, hf_config: Any, plugin: Any) -> None:
    """A run on a GPU whose estimated peak exceeds the GPU by more than the estimate's margin stops here with
    the estimate's table, before anything is loaded; within the margin it is warned about.
    ``lightning-qlora-estimate`` prints the same table for any GPU size."""
    from .estimate import gpu_memory_gib, will_fit

    if hf_config is None or str(cfg.trainer.accelerator).lower() == "cpu" or gpu_memory_gib() is None:
        return
    try:
        fit = will_fit(cfg, hf_config=hf_config, plugin=plugin)
    except ValueError as err:  # a model the estimate does not describe (not Llama-shaped): no verdict
        say(f"note: no memory estimate for this model ({one_line(err)}); the run goes on unchecked")
        return
    if fit.fits:
        return
    say(fit.table())
    total_gib = fit.estimate.total / 2**30
    if total_gib > fit.usable_gib * (1 + ESTIMATE_MARGIN):
        raise PreflightError(f"the run does not fit a {fit.gpu_gib:g} GiB GPU (table above): {fit.advice}")
    say(
        f"warning: the estimated peak {total_gib:.1f} GiB is over the {fit.usable_gib:.1f} GiB this GPU leaves, "
        f"within the estimate's {ESTIMATE_MARGIN:.0%} margin: the run goes on and may run out of memory; "
        f"{fit.advice}"
    )


def check_settings(cfg: DictConfig) -> Any:
    """Every check that needs no model, tokenizer or data: fast, and enough to stop a bad setting.

    Builds each group's dataclass (their ``__post_init__`` checks ranges), refuses non-finite
    numbers anywhere, then checks the device, the trainer (Lightning builds one, writing nothing)
    and that every output directory can be written. Returns the precision plugin.

    Raises:
        PreflightError, ValueError: one line naming the setting, its value and the fix.
    """
    _check_finite(cfg)
    for group in ("trainer", "logger", "callbacks", "sample", "optimizer", "data", "model"):
        typed(cfg[group])
    plugin = build_plugin(cfg)
    check_strategy(cfg)
    check_device(cfg)
    check_trainer(cfg, plugin)
    check_output_dirs(cfg)
    return plugin


def check_strategy(cfg: DictConfig) -> None:
    """Lightning's own FSDP (FSDP1) takes no precision plugin but its own: point to FSDP2. ``trainer.fsdp``
    settings changed under another strategy would be ignored: refuse them."""
    strategy = str(cfg.trainer.strategy)
    if strategy.lower().split("_")[0] == "fsdp":  # fsdp, fsdp_cpu_offload
        raise PreflightError(
            f"trainer.strategy={strategy}: Lightning's FSDPStrategy (FSDP1) accepts only its own precision plugin; "
            f"use trainer=fsdp (trainer.strategy={FSDP2Strategy.strategy_name}: FSDP2 through Lightning's "
            "ModelParallelStrategy, with the trainer.fsdp.* settings)"
        )
    if not _sharded(cfg):
        changed = [
            f"trainer.fsdp.{f.name}={getattr(cfg.trainer.fsdp, f.name)!r}"
            for f in dataclasses.fields(FSDPConfig)
            if getattr(cfg.trainer.fsdp, f.name) != f.default
        ]
        if changed:
            raise PreflightError(
                f"{', '.join(changed)} applies to trainer.strategy={FSDP2Strategy.strategy_name} only, but "
                f"trainer.strategy={strategy}; use trainer=fsdp, or drop the trainer.fsdp override"
            )


def _first_sentence(err: BaseException) -> str:
    text = one_line(err) or type(err).__name__
    return text.split(". ")[0]


def _check_finite(node: Any, prefix: str = "") -> None:
    """NaN or inf is never a meaningful setting; some would pass a range check (``nan <= 0`` is False)."""
    if OmegaConf.is_config(node):  # unresolved: ${hydra:...} cannot resolve outside a Hydra run
        node = OmegaConf.to_container(node, resolve=False)
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        name = f"{prefix}{key}" if isinstance(node, dict) else f"{prefix.rstrip('.')}[{key}]"
        if isinstance(value, (dict, list)):
            _check_finite(value, f"{name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise PreflightError(f"{name}={value} is not a finite number; give a real value")


def check_device(cfg: DictConfig) -> None:
    """A GPU asked for must exist: Lightning says so only once the run directory and W&B run exist."""
    import torch

    t = cfg.trainer
    accelerator = str(t.accelerator).lower()
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise PreflightError(
                f"trainer.accelerator={t.accelerator} but no CUDA GPU is available here "
                f"(torch {torch.__version__}); use trainer.accelerator=cpu (or auto)"
            )
        wanted = t.devices if isinstance(t.devices, int) else None
        have = torch.cuda.device_count()
        if wanted is not None and wanted > have:
            raise PreflightError(
                f"trainer.devices={wanted} but this machine has {have} CUDA GPU(s); use trainer.devices={have} or -1"
            )


def check_trainer(cfg: DictConfig, plugin: Any) -> None:
    """Lets Lightning itself judge the trainer settings (strategy, devices, precision) by building a
    Trainer with no logger and no callbacks, which writes nothing; its console lines are kept quiet."""
    import lightning as L

    quiet = [
        logging.getLogger(n)
        for n in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
    ]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        args = {**trainer_args(cfg), "enable_checkpointing": False}
        L.Trainer(plugins=[plugin], logger=False, callbacks=[], **args)
    except Exception as err:
        raise PreflightError(f"the trainer settings are refused by Lightning: {one_line(err)}") from None
    finally:
        for q, level in zip(quiet, levels, strict=True):
            q.setLevel(level)


def check_checkpoint(ckpt_path: str, plugin: Any, sharded: bool = False) -> dict[str, Any]:
    """Loads ``ckpt_path`` as plain tensors and settings only (no code runs) and checks that it was
    made with the same quantization and LoRA settings as ``plugin``. Returns the checkpoint.

    A sharded checkpoint (the folder ``trainer=fsdp`` writes: ``meta.pt`` and one ``.distcp`` file per
    rank) is read as its settings plus the shapes of its tensors (on the meta device), never their data.

    Args:
        ckpt_path: a ``.ckpt`` file, or a sharded checkpoint folder.
        plugin: the run's precision plugin.
        sharded: the run shards the model (``trainer=fsdp``): only then can a sharded folder resume.

    Raises:
        PreflightError: missing, truncated, not a Lightning checkpoint, holding pickled code, a sharded
            folder for an unsharded run, or made with other settings (the plugin's own message, which
            names each differing setting).
    """
    import pickle

    import torch

    label = f"ckpt_path={ckpt_path!r}"
    path = os.path.expanduser(ckpt_path)
    folder = os.path.isdir(path) and os.path.isfile(os.path.join(path, "meta.pt"))
    if folder and not sharded:
        raise PreflightError(
            f"{label} is a sharded checkpoint folder (written under trainer=fsdp); resume it with trainer=fsdp"
        )
    if not os.path.isfile(path) and not folder:
        raise PreflightError(
            f"{label} does not exist; give the path of a .ckpt file (e.g. <run>/checkpoints/last.ckpt) or of a "
            "sharded checkpoint folder (trainer=fsdp)"
        )
    try:
        ckpt = (
            _read_sharded(path)
            if folder
            else torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        )
    except pickle.UnpicklingError as err:
        raise PreflightError(
            f"{label} holds more than tensors and settings, and loading it could run code: refused "
            f"({_first_sentence(err)})"
        ) from None
    except Exception as err:
        raise PreflightError(
            f"{label} cannot be read: truncated or not a checkpoint ({_first_sentence(err)})"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise PreflightError(f"{label} is not a Lightning checkpoint (no state_dict)")
    key = type(plugin).__qualname__  # where Lightning stores a precision plugin's state_dict()
    if hasattr(plugin, "lora"):
        if key not in ckpt:
            raise PreflightError(
                f"{label} was not written by a QLoRA run (it has no {key} settings); resume from a lightning-qlora checkpoint"
            )
        try:
            plugin.load_state_dict(ckpt[key])  # compares only; raises on a difference
        except ValueError as err:
            raise PreflightError(
                f"{label}: {one_line(err)} (the quant.* / lora.* settings of the run that wrote it)"
            ) from None
    return ckpt


def _read_sharded(folder: str) -> dict[str, Any]:
    """A sharded (distributed-checkpoint) folder as a checkpoint dict: ``meta.pt``'s settings and loop state,
    and ``state_dict`` with each model tensor's shape on the meta device (read from the index, not the data)."""
    import torch
    import torch.distributed.checkpoint as dcp

    ckpt = torch.load(os.path.join(folder, "meta.pt"), map_location="cpu", weights_only=True)
    entries = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
    ckpt["state_dict"] = {
        key.removeprefix("state_dict."): torch.empty(tuple(meta.size), device="meta")
        for key, meta in entries.items()
        if key.startswith("state_dict.") and hasattr(meta, "size")
    }
    return ckpt


def check_checkpoint_fits_model(
    ckpt_path: str, ckpt: dict[str, Any], hf_config: Any, trust_remote_code: bool = False
) -> None:
    """Every adapter in ``ckpt_path`` belongs to a linear layer of the run's model, with its width.

    The model is built on the meta device (no memory, no weights) from its config. A checkpoint of
    another model used to pass the settings check and fail Lightning's strict load after the run
    directory and the W&B run existed.

    Raises:
        PreflightError: naming the first adapter that does not fit.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from .lora import is_adapter_key

    if hf_config is None:
        return
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code)
    except Exception:  # a model transformers cannot build on meta: the strict load still checks it
        return
    label = f"ckpt_path={ckpt_path!r}"
    for key, value in ckpt["state_dict"].items():
        if not is_adapter_key(key) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            continue
        layer_name, part = key.rsplit(".", 2)[0], key.rsplit(".", 2)[1]
        layer_name = layer_name.removeprefix("model.")  # CausalLMModule keeps the HF model as .model
        try:
            layer = model.get_submodule(layer_name)
        except AttributeError:
            raise PreflightError(
                f"{label} has adapters for a layer this model does not have ({layer_name}): it was trained on "
                "another model; resume with that run's model settings"
            ) from None
        width = (
            getattr(layer, "in_features", None) if part == "lora_A" else getattr(layer, "out_features", None)
        )
        have = value.shape[1] if part == "lora_A" else value.shape[0]
        if width is not None and width != have:
            raise PreflightError(
                f"{label} was trained on another model: its adapter {key} is {tuple(value.shape)}, but "
                f"{layer_name} here is {getattr(layer, 'in_features', '?')} -> {getattr(layer, 'out_features', '?')} "
                "wide; resume with that run's model settings"
            )


def output_dirs(cfg: DictConfig) -> dict[str, str]:
    """The directories a run writes, by what writes them."""
    run_dir = os.path.abspath(os.path.expanduser(cfg.output_dir))
    dirs = {"the run directory": run_dir}
    if cfg.save_adapter:
        dirs["the adapter (save_adapter)"] = os.path.join(run_dir, "adapter")
    if builds_from_config(cfg):
        dirs["the base model (a model built from a config)"] = os.path.join(run_dir, "base")
    if cfg.callbacks.checkpoint:
        dirs["checkpoints (callbacks.checkpoint)"] = os.path.join(run_dir, "checkpoints")
        if cfg.callbacks.save_adapter_on_checkpoint:
            dirs["adapters (callbacks.save_adapter_on_checkpoint)"] = os.path.join(
                run_dir, "checkpoints", "adapters"
            )
    if cfg.logger.kind != "none":
        save_dir = os.path.abspath(os.path.expanduser(cfg.logger.save_dir or run_dir))
        sub = "wandb" if cfg.logger.kind == "wandb" else "csv"
        dirs[f"the {cfg.logger.kind} logs (logger.save_dir)"] = os.path.join(save_dir, sub)
    if cfg.trainer.default_root_dir:
        dirs["trainer.default_root_dir"] = os.path.abspath(os.path.expanduser(cfg.trainer.default_root_dir))
    return dirs


def check_output_dirs(cfg: DictConfig) -> None:
    """Every directory the run will write can be created and written (a probe file, removed at once)."""
    for what, path in output_dirs(cfg).items():
        check_writable(path, what)


def check_writable(path: str, what: str) -> None:
    """``path`` (which may not exist yet) can be created and written.

    The nearest existing ancestor must be a directory, and a file must be creatable in it: that
    catches a read-only directory, a read-only file system and a file where a directory is expected,
    as root too (``os.access`` says yes to root on a read-only directory; a real write tells the truth).

    Raises:
        PreflightError: naming the path, what writes there, and the cause.
    """
    existing = path
    while not os.path.lexists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    if not os.path.isdir(existing):
        raise PreflightError(
            f"cannot write {what} at {path}: {existing} is a file, not a directory; move it away or choose "
            "another output directory (hydra.run.dir=...)"
        )
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".lightning-qlora-write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise PreflightError(
            f"cannot write {what} at {path}: {existing} is not writable ({err.strerror}); fix its permissions "
            "or choose another output directory (hydra.run.dir=...)"
        ) from None


def _check_tokenizer_fits(cfg: DictConfig, tokenizer: Any, hf_config: Any) -> None:
    """A tokenizer with more tokens than a loaded model's embedding would index past it mid-run."""
    if builds_from_config(cfg) or hf_config is None:
        return  # the embedding is sized to the tokenizer
    vocab = getattr(hf_config, "vocab_size", None) or getattr(
        getattr(hf_config, "text_config", None), "vocab_size", None
    )
    if vocab and len(tokenizer) > vocab:
        raise PreflightError(
            f"model.tokenizer={cfg.model.tokenizer!r} has {len(tokenizer)} tokens but the model "
            f"{cfg.model.name_or_path!r} embeds {vocab}; set model.tokenizer=null to use the model's own"
        )
    m = cfg.model
    if m.tokenizer and m.tokenizer != m.name_or_path and _has_tokenizer_files(m.name_or_path):
        say(
            f"model: using model.tokenizer={m.tokenizer!r}, not the tokenizer saved with {m.name_or_path!r} "
            "(set model.tokenizer=null to use that one)"
        )


def _has_tokenizer_files(name_or_path: str) -> bool:
    path = os.path.expanduser(name_or_path)
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, n)) for n in names)


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
