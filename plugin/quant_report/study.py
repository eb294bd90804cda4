"""A trained model's quality study: fit it in 16-bit, measure every 4-bit format, then LoRA on top.

Random weights say nothing about quality, and no hub is reachable, so the study trains its own:

1. **Fit.** A recipe's model (``--recipe default --train-first``: the embedded 4-layer Llama on the
   shipped instruction data) or a ~100M-parameter Llama on the Python standard library's own
   sources (``--stdlib-llama``) is trained from its random initialisation with the app's builders
   (``compose_recipe``, ``build_tokenizer``, ``build_datamodule``, ``build_module``) and a Lightning
   ``Trainer``. Every parameter trains (no plugin): ``QLoRAPrecision`` freezes the base, even with
   ``quant.enabled=false``, so it cannot fit a model from scratch. The trained model is saved
   (``<out>/model``, a transformers checkpoint with its tokenizer).
2. **Quality.** :func:`~lightning_qlora.quant_report.quality.evaluate_quality` on the held-out
   split of the same data: the unquantized model and every format and block size.
3. **Recovery** (QLoRA's second claim). From the saved model, LoRA is fitted through the real
   plugin (``build_plugin``) and ``Trainer`` for the same number of steps over the 4-bit base and
   over the 16-bit base, on the training split the model was fitted on; the held-out loss is taken
   by ``trainer.validate`` before and after.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch

from .quality import (
    BASELINE,
    BNB_FORMATS,
    QualityResult,
    default_dtype,
    eval_set_from_dataset,
    eval_set_from_file,
    evaluate_quality,
)

DEFAULT_LORA_STEPS = 100
DEFAULT_LORA_FORMATS: tuple[str, ...] = ("nf4_dq",)


@dataclass
class TrainSummary:
    """How the model was fitted."""

    steps: int
    max_steps: int
    seconds: float
    tokens: int
    train_loss: float | None
    params: int
    precision: str
    device: str
    stopped_by_time: bool = False

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class RecoveryRow:
    """Held-out loss of one base (``none`` = 16-bit) before and after ``steps`` of LoRA."""

    base: str
    blocksize: int | None
    steps: int
    loss_before: float
    loss_after: float
    train_loss: float | None
    seconds: float
    batches_before: list[tuple[float, int]] = field(default_factory=list, repr=False)
    batches_after: list[tuple[float, int]] = field(default_factory=list, repr=False)


@dataclass
class StudyResult:
    """Everything a train-first study measured (written as ``quality.json``)."""

    name: str
    data: dict[str, Any]
    train: TrainSummary
    quality: QualityResult
    recovery: list[RecoveryRow] = field(default_factory=list)
    lora: dict[str, Any] = field(default_factory=dict)
    corpus: dict[str, Any] | None = None
    model_dir: str = ""
    environment: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def recovery_row(self, base: str) -> RecoveryRow | None:
        return next((r for r in self.recovery if r.base == base), None)

    def to_json(self) -> dict[str, Any]:
        """Plain values for ``quality.json``."""
        return {
            "name": self.name,
            "model_dir": self.model_dir,
            "data": self.data,
            "corpus": self.corpus,
            "train": {**asdict(self.train), "tokens_per_s": self.train.tokens_per_s},
            "quality": self.quality.to_json(),
            "lora": self.lora,
            "recovery": [
                {k: v for k, v in asdict(r).items() if not k.startswith("batches")} for r in self.recovery
            ],
            "environment": self.environment,
            "seconds": self.seconds,
        }


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and hardware, for the record."""
    import bitsandbytes
    import lightning
    import transformers

    env = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lightning": lightning.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


# --------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------


class TokenCounter(L.Callback):
    """Counts the non-padding tokens of every training batch."""

    def __init__(self) -> None:
        self.tokens = 0

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.tokens += int(batch["attention_mask"].sum())


class BatchLosses(L.Callback):
    """Each validation batch's ``(mean loss, target tokens)``: the standard errors of LoRA's differences."""

    def __init__(self) -> None:
        self.batches: list[tuple[float, int]] = []

    def on_validation_batch_end(
        self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        n = int((batch["labels"][:, 1:] != -100).sum())
        self.batches.append((float(outputs), n))

    def take(self) -> list[tuple[float, int]]:
        out, self.batches = self.batches, []
        return out


def _accelerator(device: torch.device) -> str:
    return "gpu" if device.type == "cuda" else "cpu"


def _train_loss(trainer: Any) -> float | None:
    v = trainer.callback_metrics.get("train/loss")
    return None if v is None else float(v)


def fit_full(
    cfg: Any,
    tokenizer: Any,
    datamodule: Any,
    steps: int,
    device: torch.device,
    max_seconds: float | None = None,
    progress: bool = False,
) -> tuple[Any, TrainSummary]:
    """Train every parameter of the recipe's model from its initialisation (no plugin).

    Mixed bf16 on a GPU (fp32 master weights), fp32 on a CPU. Gradient clipping and accumulation come
    from the recipe's ``trainer`` group, the optimizer and schedule from its ``optimizer`` group.

    Returns:
        The trained ``CausalLMModule`` and a summary of the fit.
    """
    from ..builders import build_module

    L.seed_everything(cfg.seed, verbose=False)
    module = build_module(cfg, tokenizer)
    counter = TokenCounter()
    precision = "bf16-mixed" if device.type == "cuda" else "32-true"
    trainer = L.Trainer(
        accelerator=_accelerator(device),
        devices=1,
        precision=precision,
        max_steps=steps,
        max_time={"seconds": max_seconds} if max_seconds else None,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        gradient_clip_val=cfg.trainer.gradient_clip_val,
        accumulate_grad_batches=cfg.trainer.accumulate_grad_batches,
        callbacks=[counter],
    )
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=datamodule.train_dataloader())
    seconds = time.perf_counter() - start
    summary = TrainSummary(
        steps=trainer.global_step,
        max_steps=steps,
        seconds=seconds,
        tokens=counter.tokens,
        train_loss=_train_loss(trainer),
        params=sum(p.numel() for p in module.model.parameters()),
        precision=precision,
        device=str(device),
        stopped_by_time=trainer.global_step < steps,
    )
    return module, summary


def lora_config(cfg: Any, model_dir: str, base: str, blocksize: int, dtype: torch.dtype) -> Any:
    """The recipe's config with the trained model as its base and ``base`` as its quantization."""
    from omegaconf import OmegaConf

    c = cfg.copy()
    OmegaConf.update(c, "model.name_or_path", model_dir)
    OmegaConf.update(c, "model.from_config", None, merge=False)
    OmegaConf.update(c, "model.tokenizer", model_dir)
    OmegaConf.update(c, "model.compile", False)  # short runs: compiling costs more than it saves
    OmegaConf.update(c, "quant.compute_dtype", str(dtype).removeprefix("torch."))
    if base == BASELINE:
        OmegaConf.update(c, "quant.enabled", False)
    else:
        quant_type, double_quant = BNB_FORMATS[base]
        OmegaConf.update(c, "quant.enabled", True)
        OmegaConf.update(c, "quant.quant_type", quant_type)
        OmegaConf.update(c, "quant.double_quant", double_quant)
        OmegaConf.update(c, "quant.blocksize", blocksize)
    return c


def lora_recovery(
    cfg: Any,
    tokenizer: Any,
    datamodule: Any,
    eval_set: Any,
    model_dir: str,
    steps: int,
    bases: Sequence[str],
    blocksize: int,
    device: torch.device,
    dtype: torch.dtype,
    log: Callable[[str], None] | None = None,
) -> list[RecoveryRow]:
    """LoRA for ``steps`` over each base, through ``QLoRAPrecision`` and a ``Trainer``.

    Each run starts from the saved model with the same seed (same adapter initialisation, same batch
    order), so the bases differ only in their quantization. The held-out loss comes from
    ``trainer.validate`` (the module's ``val/loss``, weighted by target tokens) before and after.
    """
    from torch.utils.data import DataLoader

    from ..builders import build_module, build_plugin

    loader = DataLoader(eval_set.batches, batch_size=None)  # already batched
    rows = []
    for base in bases:
        c = lora_config(cfg, model_dir, base, blocksize, dtype)
        losses = BatchLosses()
        L.seed_everything(c.seed, verbose=False)
        plugin = build_plugin(c)
        module = build_module(c, tokenizer)
        trainer = L.Trainer(
            accelerator=_accelerator(device),
            devices=1,
            plugins=[plugin],
            max_steps=steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            gradient_clip_val=c.trainer.gradient_clip_val,
            accumulate_grad_batches=c.trainer.accumulate_grad_batches,
            callbacks=[losses],
        )
        start = time.perf_counter()
        before = float(trainer.validate(module, dataloaders=loader, verbose=False)[0]["val/loss"])
        batches_before = losses.take()
        trainer.fit(module, train_dataloaders=datamodule.train_dataloader())
        after = float(trainer.validate(module, dataloaders=loader, verbose=False)[0]["val/loss"])
        batches_after = losses.take()
        row = RecoveryRow(
            base=base,
            blocksize=None if base == BASELINE else blocksize,
            steps=trainer.global_step,
            loss_before=before,
            loss_after=after,
            train_loss=_train_loss(trainer),
            seconds=time.perf_counter() - start,
            batches_before=batches_before,
            batches_after=batches_after,
        )
        rows.append(row)
        if log:
            log(f"LoRA over {base}: held-out loss {before:.4f} -> {after:.4f} after {row.steps} steps")
        del trainer, module, plugin
        _free(device)
    return rows


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# The whole study
# --------------------------------------------------------------------------------------------


@dataclass
class StudySettings:
    """What a train-first study does; the CLI fills it from its flags."""

    train_steps: int | None = None  # None: the recipe's trainer.max_steps
    max_train_seconds: float | None = None
    lora_steps: int | None = None  # None: DEFAULT_LORA_STEPS (a recipe) or the plan's (stdlib)
    lora_formats: tuple[str, ...] = DEFAULT_LORA_FORMATS
    eval_tokens: int | None = None
    eval_data: str | None = None
    formats: tuple[str, ...] = ()
    blocksizes: tuple[int, ...] = ()
    dtype: str | None = None
    progress: bool = False


@dataclass
class PreparedStudy:
    """A study whose inputs are checked and whose data is tokenized: what remains is compute."""

    cfg: Any
    lora_cfg: Any
    name: str
    settings: StudySettings
    out_dir: Path
    device: torch.device
    dtype: torch.dtype
    steps: int
    tokenizer: Any
    datamodule: Any
    eval_set: Any
    data: dict[str, Any]
    corpus: dict[str, Any] | None = None


def check_settings(
    cfg: Any, settings: StudySettings, device: torch.device, lora_cfg: Any = None
) -> tuple[StudySettings, int, torch.dtype]:
    """Every check that needs no data and no model: steps, dtype, optimizer, LoRA plugins, block sizes.

    Returns:
        The settings with their defaults filled in, the fit's steps and the compute dtype.

    Raises:
        ValueError: one line naming the flag or config key.
    """
    from ..builders import build_plugin, typed

    dtype = default_dtype(device, settings.dtype)
    steps = settings.train_steps if settings.train_steps is not None else int(cfg.trainer.max_steps)
    if steps <= 0:
        raise ValueError(
            f"--train-steps must be positive, got {steps} (default: the recipe's trainer.max_steps)"
        )
    if settings.lora_steps is None:
        settings = dataclasses.replace(settings, lora_steps=DEFAULT_LORA_STEPS)
    if settings.lora_steps < 0:
        raise ValueError(f"--lora-steps must be >= 0 (0: no LoRA phase), got {settings.lora_steps}")
    lc = cfg if lora_cfg is None else lora_cfg
    typed(cfg.optimizer)
    typed(cfg.data)
    typed(lc.lora)
    for base in (BASELINE, *settings.lora_formats):  # the plugin each LoRA run will build, built now
        build_plugin(lora_config(lc, "unused", base, int(lc.quant.blocksize), dtype))
    _check_width(cfg, settings.blocksizes)
    return settings, steps, dtype


def prepare_study(
    cfg: Any,
    name: str,
    settings: StudySettings,
    out_dir: str | os.PathLike[str],
    device: torch.device,
    corpus: dict[str, Any] | None = None,
    lora_cfg: Any = None,
) -> PreparedStudy:
    """Check every setting and tokenize the data, so that nothing fails after minutes of training.

    Args:
        cfg: a composed recipe (``compose_recipe``).
        name: label of the study (recipe name or ``stdlib-llama``).
        settings: steps, formats, block sizes, evaluation budget.
        out_dir: the trained model goes to ``out_dir/model``.
        device: where to train and evaluate.
        corpus: what the data is (for the record), if built by the study.
        lora_cfg: the config of the LoRA phase if it differs from ``cfg`` (a learning rate for
            adapters rather than for a fit from scratch); the data must be the same.

    Raises:
        ValueError, FileNotFoundError: a bad setting, data file or block size, in one line.
    """
    from ..builders import build_datamodule, build_tokenizer

    settings, steps, dtype = check_settings(cfg, settings, device, lora_cfg)
    lc = cfg if lora_cfg is None else lora_cfg
    tokenizer = build_tokenizer(cfg)
    dm = build_datamodule(cfg, tokenizer)
    dm.prepare_data()
    dm.setup("fit")
    if settings.eval_data:
        eval_set = eval_set_from_file(settings.eval_data, tokenizer, dm.config, settings.eval_tokens)
    else:
        if dm.val_dataset is None:
            raise ValueError(
                f"recipe {name!r} holds out no validation split (data.val_fraction=0 and no data.val_split); "
                "set one, or pass --eval-data FILE"
            )
        eval_set = eval_set_from_dataset(
            dm.val_dataset,
            dm.pad_id,
            dm.config.batch_size,
            f"the held-out split of {_data_name(cfg)}",
            dm.data_format,
            settings.eval_tokens,
        )
    data = {
        "source": _data_name(cfg),
        "format": dm.data_format,
        "max_length": dm.config.max_length,
        "packing": dm.config.packing,
        "batch_size": dm.config.batch_size,
        **dm.stats,
    }
    return PreparedStudy(
        cfg=cfg,
        lora_cfg=lc,
        name=name,
        settings=settings,
        out_dir=Path(out_dir),
        device=device,
        dtype=dtype,
        steps=steps,
        tokenizer=tokenizer,
        datamodule=dm,
        eval_set=eval_set,
        data=data,
        corpus=corpus,
    )


def run_study(p: PreparedStudy, log: Callable[[str], None] | None = None) -> StudyResult:
    """Fit the model, save it, measure every format on held-out data, then LoRA recovery."""
    say = log or (lambda _m: None)
    start = time.perf_counter()
    dm, settings, device = p.datamodule, p.settings, p.device
    say(
        f"data: {p.data.get('train_rows')} training rows ({dm.num_train_tokens:,} tokens); evaluating "
        f"{p.eval_set.rows} rows ({p.eval_set.target_tokens:,} target tokens, loss on {p.eval_set.loss_on})"
    )
    say(f"fitting {p.name} in 16-bit: {p.steps} steps on {device}")
    module, train = fit_full(
        p.cfg, p.tokenizer, dm, p.steps, device, settings.max_train_seconds, settings.progress
    )
    loss_text = "n/a" if train.train_loss is None else f"{train.train_loss:.4f}"
    say(
        f"fitted: {train.steps} steps in {train.seconds:.0f} s ({train.tokens_per_s:,.0f} tokens/s), "
        f"last training loss {loss_text}"
    )
    model_dir = str(p.out_dir / "model")
    module.model.save_pretrained(model_dir)
    p.tokenizer.save_pretrained(model_dir)
    del module
    _free(device)
    # A fresh load of what was saved: the weights the LoRA phase loads too, without what training
    # left on the module (compiled blocks on a GPU, gradients, the optimizer's references).
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=p.dtype)
    quality = evaluate_quality(
        model,
        p.eval_set,
        settings.formats,
        settings.blocksizes,
        device=device,
        dtype=p.dtype,
        model_name=f"{p.name} (trained, {train.params:,} parameters)",
        log=say,
    )
    del model
    _free(device)
    recovery: list[RecoveryRow] = []
    lora_info: dict[str, Any] = {}
    if settings.lora_steps > 0:
        lc = p.lora_cfg
        blocksize = int(lc.quant.blocksize)
        bases = [BASELINE, *settings.lora_formats]
        recovery = lora_recovery(
            lc,
            p.tokenizer,
            dm,
            p.eval_set,
            model_dir,
            settings.lora_steps,
            bases,
            blocksize,
            device,
            p.dtype,
            say,
        )
        lora_info = {
            "steps": settings.lora_steps,
            "r": int(lc.lora.r),
            "alpha": float(lc.lora.alpha),
            "dropout": float(lc.lora.dropout),
            "target_modules": str(lc.lora.target_modules),
            "lr": float(lc.optimizer.lr),
            "blocksize": blocksize,
            "data": f"the training split of {_data_name(p.cfg)} (the rows the model was fitted on)",
        }
    if p.corpus is not None:
        p.corpus["tokens"] = {"train": p.data.get("train_tokens"), "val": p.data.get("val_tokens")}
    return StudyResult(
        name=p.name,
        data=p.data,
        train=train,
        quality=quality,
        recovery=recovery,
        lora=lora_info,
        corpus=p.corpus,
        model_dir=model_dir,
        environment=environment(device),
        seconds=time.perf_counter() - start,
    )


def _data_name(cfg: Any) -> str:
    path = cfg.data.path
    return "builtin:tiny_instruct" if path is None else str(path)


def _check_width(cfg: Any, blocksizes: Sequence[int]) -> None:
    """Refuse block sizes wider than the model's layers before minutes of training, not after."""
    from ..module import build_hf_config

    m = cfg.model
    if m.from_config is None or not blocksizes:
        return
    from omegaconf import OmegaConf

    src = m.from_config if isinstance(m.from_config, str) else OmegaConf.to_container(m.from_config)
    hf = build_hf_config(src)
    widths = [getattr(hf, k) for k in ("hidden_size", "intermediate_size") if getattr(hf, k, None)]
    if not widths:
        return
    heads = getattr(hf, "num_attention_heads", None)
    head_dim = getattr(hf, "head_dim", None) or (hf.hidden_size // heads if heads else None)
    if heads and head_dim:
        widths.append(heads * head_dim)  # o_proj's input
    width = min(widths)
    too_big = sorted(b for b in blocksizes if b > width)
    if too_big:
        raise ValueError(
            f"--blocksizes {','.join(map(str, too_big))} is larger than the narrowest layer input ({width}) of "
            f"the recipe's model: bitsandbytes quantizes such a layer wrongly; use block sizes up to "
            f"{max(b for b in (32, 64, 128, 256, 512, 1024, 2048, 4096) if b <= width) if width >= 32 else 32}"
        )
