"""``CausalLMModule``: a LightningModule that fine-tunes any transformers causal LM.

The model is built in ``configure_model`` so the Trainer's init contexts apply: with
:class:`~lightning_qlora.QLoRAPrecision` its linear layers are staged on the host and quantized
layer by layer as the model moves to the accelerator (a 7B model never exists there in 16-bit).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

OPTIMIZERS = ("adamw", "adam", "sgd", "paged_adamw8bit")
SCHEDULERS = ("cosine", "linear", "constant")
IGNORE_INDEX = -100


def build_hf_config(from_config: Any, overrides: Mapping[str, Any] | None = None) -> Any:
    """A transformers config from a dict of kwargs (with ``model_type``), a config.json path, or a hub id.

    Args:
        from_config: ``{"model_type": "llama", "hidden_size": 64, ...}``, a path to ``config.json`` or
            to a model directory, or a hub id.
        overrides: extra attributes set on the config (e.g. the tokenizer's ``vocab_size``).

    Raises:
        ValueError: a dict without a known ``model_type``.
    """
    from transformers import AutoConfig

    if isinstance(from_config, (str, os.PathLike)):
        path = os.fspath(from_config)
        if path.endswith(".json"):
            config = AutoConfig.from_pretrained(os.path.dirname(path) or ".", **_json_name(path))
        else:
            config = AutoConfig.from_pretrained(path)
    else:
        kwargs = dict(from_config)
        model_type = kwargs.pop("model_type", None)
        if not model_type:
            raise ValueError("model.from_config needs a 'model_type' (e.g. llama, mistral, qwen2)")
        try:
            config = AutoConfig.for_model(model_type, **kwargs)
        except ValueError as err:
            raise ValueError(f"model.from_config.model_type={model_type!r}: {err}") from None
    for key, value in (overrides or {}).items():
        setattr(config, key, value)
    return config


def _json_name(path: str) -> dict[str, Any]:
    name = os.path.basename(path)
    return {} if name == "config.json" else {"config_file_name": name}


class CausalLMModule(L.LightningModule):
    """Causal-LM fine-tuning: next-token loss on ``labels`` (``-100`` ignored), AdamW, warmup + cosine.

    Args:
        name_or_path: hub id or local directory for ``from_pretrained``; with ``from_config`` set it
            only names the model.
        from_config: build from this config with random weights instead (see :func:`build_hf_config`).
        config_overrides: attributes set on the model config (vocab size, special token ids, ...).
        gradient_checkpointing: recompute decoder layers in the backward (non-reentrant).
        optimizer: ``name`` (adamw|adam|sgd|paged_adamw8bit), ``lr``, ``weight_decay``, ``betas``, ``eps``,
            ``scheduler`` (cosine|linear|constant), ``warmup_steps`` or ``warmup_ratio``, ``min_lr_ratio``.
        seed: seeds the random weights of a ``from_config`` model.
        attn_implementation: passed to transformers (``sdpa``, ``eager``, ``flash_attention_2``).
        trust_remote_code: passed to transformers.
        revision: hub revision.
        loss_chunk_size: tokens per chunk of the output head + cross-entropy, so the fp32 logits of the
            whole batch never exist at once (0 = one chunk).
        compile: ``torch.compile`` each decoder block (``true``/``false``). ``"auto"`` compiles on CUDA
            and stays eager elsewhere (compiling on a CPU costs more than it saves on short runs).
            Inside a compiled block a 4-bit matmul is one opaque op (``nf4.dequantize_matmul``).
    """

    def __init__(
        self,
        name_or_path: str | None = None,
        from_config: Any = None,
        config_overrides: Mapping[str, Any] | None = None,
        gradient_checkpointing: bool = False,
        optimizer: Mapping[str, Any] | None = None,
        seed: int = 42,
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        revision: str | None = None,
        loss_chunk_size: int = 4096,
        compile: bool | str = "auto",
    ) -> None:
        super().__init__()
        if name_or_path is None and from_config is None:
            raise ValueError("set model.name_or_path (hub id or local path) or model.from_config")
        # The resolved Hydra config is logged by RunSummary; Lightning's own hparams logging would repeat it.
        self.save_hyperparameters(logger=False)
        self.optimizer_cfg = dict(optimizer or {})
        self.model: nn.Module | None = None

    @property
    def model_name(self) -> str:
        if self.hparams.name_or_path:
            return str(self.hparams.name_or_path)
        cfg = self.hparams.from_config
        return f"{cfg.get('model_type', 'model')}(from_config)" if isinstance(cfg, Mapping) else str(cfg)

    def configure_model(self) -> None:
        if self.model is not None:  # called again by trainer.validate/test after fit
            return
        from transformers import AutoModelForCausalLM

        hp = self.hparams
        kwargs: dict[str, Any] = {"trust_remote_code": hp.trust_remote_code}
        if hp.attn_implementation:
            kwargs["attn_implementation"] = hp.attn_implementation
        if hp.from_config is not None:
            config = build_hf_config(hp.from_config, hp.config_overrides)
            torch.manual_seed(hp.seed)
            model = AutoModelForCausalLM.from_config(config, **kwargs)
        else:
            path = str(hp.name_or_path)
            if _looks_local(path) and not os.path.isdir(os.path.expanduser(path)):
                raise FileNotFoundError(f"model.name_or_path={path!r} does not exist")
            # Inside QLoRAPrecision's init context the default dtype is the compute dtype. The weights
            # load on the host (memory-mapped) and each linear weight is quantized on its way to the
            # accelerator, so the 16-bit model never sits on the GPU whole.
            model = AutoModelForCausalLM.from_pretrained(
                os.path.expanduser(path),
                dtype=torch.get_default_dtype(),
                revision=hp.revision,
                device_map="cpu",
                **kwargs,
            )
            for key, value in (hp.config_overrides or {}).items():
                if key != "vocab_size":
                    setattr(model.config, key, value)
        if hp.gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
                model.activation_checkpointing_enable(
                    activation_checkpointing_kwargs={"use_reentrant": False}
                )
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False  # the KV cache is useless in training and costs memory
        model.train()  # from_pretrained returns eval mode (dropout off); Lightning toggles modes itself
        self.model = model

    def on_fit_start(self) -> None:
        # Here, after QLoRAPrecision converted the model and the Trainer moved (quantized) it: compile
        # must see the final layers.
        hp = self.hparams
        wanted = hp.compile is True or (hp.compile == "auto" and self.device.type == "cuda")
        if wanted and not getattr(self.model, "_blocks_compiled", False):
            compile_blocks(self.model)
            self.model._blocks_compiled = True

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def _loss(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, int]:
        labels = batch.get("labels")
        if labels is None:
            labels = batch["input_ids"].masked_fill(batch.get("attention_mask", 1) == 0, IGNORE_INDEX)
        return causal_lm_loss(
            self.model, batch["input_ids"], batch.get("attention_mask"), labels, self.hparams.loss_chunk_size
        )

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        loss, n_targets = self._loss(batch)
        self.log(
            "train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=max(n_targets, 1)
        )
        return loss

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        loss, n_targets = self._loss(batch)
        # Weighted by target tokens, so val/loss is the per-token loss over the whole split.
        self.log(
            "val/loss",
            loss,
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            sync_dist=True,
            batch_size=max(n_targets, 1),
        )
        return loss

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError("no trainable parameters: add QLoRAPrecision (or unfreeze something) to train")
        optimizer = build_optimizer(params, self.optimizer_cfg)
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1
        scheduler = build_scheduler(optimizer, self.optimizer_cfg, total)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _looks_local(path: str) -> bool:
    """A path rather than a hub id: exists, or is absolute/relative-marked, or has more than one '/'."""
    return os.path.exists(os.path.expanduser(path)) or path.startswith(("/", ".", "~")) or path.count("/") > 1


def _split_head(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """The decoder backbone and output head of a transformers causal LM, or ``(None, None)``.

    Models whose logits are post-processed (soft-capping, scaling) take the plain path.
    """
    config = getattr(model, "config", None)
    prefix = getattr(model, "base_model_prefix", None)
    if config is None or not prefix or not hasattr(model, "get_output_embeddings"):
        return None, None
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None, None
    backbone, head = getattr(model, prefix, None), model.get_output_embeddings()
    if backbone is None or head is None or backbone is model:
        return None, None
    return backbone, head


def compile_blocks(model: nn.Module) -> int:
    """``torch.compile`` every block of the model's largest ``nn.ModuleList`` (its decoder layers).

    Compiling block by block keeps compile time to one block's graph, reused for all of them,
    and leaves the 4-bit dequantization (a bitsandbytes custom op) opaque inside it.

    Returns:
        How many blocks were compiled.
    """
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        return 0
    blocks = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
    import torch._dynamo

    # The blocks differ only in constants like layer_idx; each may get its own guard entry.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 2 * len(blocks))
    torch._dynamo.config.accumulated_cache_size_limit = max(
        torch._dynamo.config.accumulated_cache_size_limit, 4 * len(blocks)
    )
    for block in blocks:
        block.compile()
    return len(blocks)


def causal_lm_loss(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor, chunk_size: int = 4096
) -> tuple[Tensor, int]:
    """Mean next-token cross-entropy over labelled positions, and the number of those positions.

    With a frozen output head (the QLoRA case) the head and cross-entropy run chunk by chunk
    (:func:`lightning_qlora.loss.causal_lm_loss`), so the fp32 logits of the whole batch never exist;
    they dominate memory with 128k-token vocabularies.
    """
    n = int((labels[:, 1:] != IGNORE_INDEX).sum())
    backbone, head = _split_head(model)
    weight = getattr(head, "weight", None)
    if (
        backbone is None
        or not isinstance(weight, Tensor)
        or weight.requires_grad
        or type(head) is not nn.Linear
    ):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
        )
        return (loss if n else logits.sum() * 0.0), n
    from .loss import causal_lm_loss as fused_loss

    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
    if n == 0:  # keeps the graph (and DDP's gradient sync) alive on a batch with no target
        return hidden.sum() * 0.0, 0
    loss = fused_loss(
        hidden, weight, labels, chunk_size if chunk_size > 0 else hidden.shape[0] * hidden.shape[1]
    )
    if head.bias is not None:  # rare; the fused loss has no bias term
        logits = head(hidden[:, :-1]).float()
        loss = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    return loss, n


def build_optimizer(params: Iterable[Tensor], cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg["name"]`` over ``params``."""
    name = str(cfg.get("name", "adamw")).lower()
    lr = float(cfg.get("lr", 2e-4))
    wd = float(cfg.get("weight_decay", 0.0))
    betas = tuple(float(b) for b in cfg.get("betas", (0.9, 0.999)))
    eps = float(cfg.get("eps", 1e-8))
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=wd)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=betas[0], weight_decay=wd)
    if name == "paged_adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=wd)
    raise ValueError(f"optimizer.name={name!r} is not supported; use one of {OPTIMIZERS}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any], total_steps: int) -> Any:
    """Linear warmup, then cosine or linear decay to ``min_lr_ratio * lr`` (or constant)."""
    name = str(cfg.get("scheduler", "cosine")).lower()
    if name not in SCHEDULERS:
        raise ValueError(f"optimizer.scheduler={name!r} is not supported; use one of {SCHEDULERS}")
    total = max(int(total_steps), 1) if 0 < total_steps < float("inf") else 1
    warmup = int(cfg.get("warmup_steps") or 0) or int(float(cfg.get("warmup_ratio") or 0.0) * total)
    floor = float(cfg.get("min_lr_ratio", 0.0))
    if name == "constant" and warmup == 0:
        return None

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if name == "constant":
            return 1.0
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if name == "cosine" else 1 - progress
        return floor + (1 - floor) * decay

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
