"""``CausalLMModule``: a LightningModule that fine-tunes any transformers causal LM.

The model is built in ``configure_model`` so the Trainer's init contexts apply: with
:class:`~lightning_qlora.QLoRAPrecision` its linear layers are staged on the host and quantized
layer by layer as the model moves to the accelerator (a 7B model never exists there in 16-bit).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from .blocks import compile_blocks, graph_breaks, set_activation_checkpointing, uncompiled_calls
from .loss import IGNORE_INDEX, causal_lm_loss
from .memory import CHECKPOINTING, Shapes, choose_checkpointing, over_budget
from .messages import say
from .optim import OptimizerConfig, build_optimizer, build_scheduler
from .sharding import is_sharded


@dataclass
class ModelConfig:
    """Which model to fine-tune and how to run it. Also the Hydra schema of the ``model`` group.

    Args:
        name_or_path: hub id or local directory of a saved model (16-bit, or a bitsandbytes 4-bit
            checkpoint); when set, it is what loads (``from_config`` applies only when it is null).
        from_config: with ``name_or_path`` null, build from this config with random weights: a dict of config kwargs
            with ``model_type``, or a path to a ``config.json`` or a model directory (see
            :func:`build_hf_config`).
        tokenizer: ``None``: the model's own; ``"byte"``: the offline byte-level tokenizer; or a
            hub id / directory.
        activation_checkpointing: which decoder layers recompute their activations in the backward
            (non-reentrant checkpointing) instead of keeping them: ``none`` (fastest, most memory),
            ``full`` (every layer), ``every_n_layers`` (one layer in ``checkpoint_every_n_layers``),
            ``offload`` (every layer, its saved input held in pinned host memory), or ``auto`` (the
            fastest of these whose estimated peak fits ``max_memory_gib``; see
            :mod:`lightning_qlora.memory`, decided from the first batch's shape).
        checkpoint_every_n_layers: with ``every_n_layers``: checkpoint layers 0, n, 2n, ...
        max_memory_gib: the GPU memory budget (``torch.cuda.max_memory_allocated``): ``auto`` chooses for
            it, and with any setting a first step that measures more is warned about in one line.
        attn_implementation: passed to transformers (``sdpa``, ``eager``, ``flash_attention_2``).
        trust_remote_code: passed to transformers.
        revision: hub revision.
        loss_chunk_size: tokens per chunk of the output head + cross-entropy, so the fp32 logits of
            the whole batch never exist at once (0 = one chunk).
        compile: ``torch.compile`` each decoder block (``true``/``false``). ``"auto"`` compiles on
            CUDA and stays eager elsewhere (compiling on a CPU costs more than it saves on short
            runs). Inside a compiled block a 4-bit layer and its adapter are traced: the dequantization is
            plain torch ops (``nf4_matmul.dequantize_traced``), fused into one kernel (a weight whose last block
            is cut short stays one opaque op over bitsandbytes).
    """

    name_or_path: str | None = None
    from_config: Any = None
    tokenizer: str | None = None
    activation_checkpointing: str = "none"
    checkpoint_every_n_layers: int = 2
    max_memory_gib: float | None = None
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    revision: str | None = None
    loss_chunk_size: int = 2048
    compile: Any = "auto"

    def __post_init__(self) -> None:
        if self.activation_checkpointing not in CHECKPOINTING:
            raise ValueError(
                f"model.activation_checkpointing={self.activation_checkpointing!r} is not supported; "
                f"use one of {CHECKPOINTING}"
            )
        if isinstance(self.checkpoint_every_n_layers, bool) or self.checkpoint_every_n_layers < 1:
            raise ValueError(
                f"model.checkpoint_every_n_layers={self.checkpoint_every_n_layers!r} must be a positive integer"
            )
        if self.activation_checkpointing == "auto" and not self.max_memory_gib:
            raise ValueError(
                "model.activation_checkpointing=auto needs model.max_memory_gib (the GPU memory budget, GiB)"
            )
        if self.max_memory_gib is not None and not self.max_memory_gib > 0:
            raise ValueError(f"model.max_memory_gib={self.max_memory_gib!r} must be positive")
        if self.compile not in (True, False, "auto"):
            raise ValueError(f"model.compile={self.compile!r} must be true, false or auto")
        if isinstance(self.loss_chunk_size, bool) or self.loss_chunk_size < 0:
            raise ValueError(f"model.loss_chunk_size={self.loss_chunk_size!r} must be >= 0 (0: one chunk)")

    @property
    def display_name(self) -> str:
        """The model's name in logs: its path or hub id, else its config's source."""
        if self.name_or_path:
            return str(self.name_or_path)
        if isinstance(self.from_config, Mapping):
            return f"{self.from_config.get('model_type', 'model')}(from_config)"
        return str(self.from_config)


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
        config: the model settings (:class:`ModelConfig`); built from ``model_settings`` if not given,
            so ``CausalLMModule(name_or_path="...", activation_checkpointing="full")`` works too
            (``gradient_checkpointing=True`` is read as ``activation_checkpointing="full"``).
        optimizer: :class:`~lightning_qlora.optim.OptimizerConfig` or a dict of its fields.
        seed: seeds the random weights of a ``from_config`` model.
        config_overrides: attributes set on the model config (vocab size, special token ids, ...).
    """

    def __init__(
        self,
        config: ModelConfig | Mapping[str, Any] | None = None,
        optimizer: OptimizerConfig | Mapping[str, Any] | None = None,
        seed: int = 42,
        config_overrides: Mapping[str, Any] | None = None,
        **model_settings: Any,
    ) -> None:
        super().__init__()
        if "gradient_checkpointing" in model_settings:  # the transformers name users know
            full = model_settings.pop("gradient_checkpointing")
            model_settings.setdefault("activation_checkpointing", "full" if full else "none")
        if config is None:
            config = ModelConfig(**model_settings)
        elif isinstance(config, Mapping):  # hparams of a checkpoint
            config = ModelConfig(**{**config, **model_settings})
        elif model_settings:
            config = dataclasses.replace(config, **model_settings)
        if config.name_or_path is None and config.from_config is None:
            raise ValueError("set model.name_or_path (hub id or local path) or model.from_config")
        if isinstance(optimizer, Mapping):
            optimizer = OptimizerConfig(**optimizer)
        self.config = config
        self.optimizer_config = optimizer or OptimizerConfig()
        self.seed = seed
        self.config_overrides = dict(config_overrides or {})
        # Plain values, so the checkpoint rebuilds this module. The resolved Hydra config is logged by
        # RunSummary; Lightning's own hparams logging would repeat it.
        self.save_hyperparameters(
            {
                "config": dataclasses.asdict(config),
                "optimizer": dataclasses.asdict(self.optimizer_config),
                "seed": seed,
                "config_overrides": self.config_overrides,
            },
            logger=False,
        )
        self.model: nn.Module | None = None
        self.checkpointing_estimate: Any = None  # what activation_checkpointing=auto chose, and why

    @property
    def model_name(self) -> str:
        return self.config.display_name

    def cpu(self) -> CausalLMModule:
        """Moves the module to the host, unless Lightning's strategy teardown asks.

        Lightning's single-device and DDP strategies call ``cpu()`` when fit, validate or test ends (also
        after an exception), to free the GPU. For a 4-bit base that copies every weight into host memory:
        38 GiB for a 70B model, measured, at the end of a run that loaded with ~5 GiB, and before the final
        adapters are written. That call leaves the model where it trained (and says so); any other call
        (yours, at any time) moves it.
        """
        caller = sys._getframe(1)
        if caller.f_code.co_name == "teardown" and isinstance(caller.f_locals.get("self"), Strategy):
            device = next((p.device for p in self.parameters()), torch.device("cpu"))
            if device.type != "cpu":
                rank_zero_info(
                    f"lightning-qlora: the model stays on {device} after the run (moving a 4-bit base to the host "
                    "copies all of it into host memory); call module.cpu() to move it"
                )
            return self
        return super().cpu()

    def configure_model(self) -> None:
        if self.model is not None:  # called again by trainer.validate/test after fit
            return
        from transformers import AutoModelForCausalLM

        c = self.config
        kwargs: dict[str, Any] = {"trust_remote_code": c.trust_remote_code}
        if c.attn_implementation:
            kwargs["attn_implementation"] = c.attn_implementation
        if c.from_config is not None and not c.name_or_path:
            hf_config = build_hf_config(c.from_config, self.config_overrides)
            torch.manual_seed(self.seed)
            model = AutoModelForCausalLM.from_config(hf_config, **kwargs)
        else:
            from .checkpoint4bit_load import load_pretrained

            # A 16-bit checkpoint loads on the host in the plugin's compute dtype (the default dtype inside its
            # init context) and each linear weight is quantized on its way to the accelerator; a bitsandbytes
            # 4-bit one goes into the plugin's 4-bit layers as it is, straight onto the root device.
            model = load_pretrained(
                c.name_or_path,
                dtype=torch.get_default_dtype(),
                revision=c.revision,
                trust_remote_code=c.trust_remote_code,
                attn_implementation=c.attn_implementation,
                plugin=self._trainer.precision_plugin if self._trainer is not None else None,
            )
            for key, value in self.config_overrides.items():
                if key != "vocab_size":
                    setattr(model.config, key, value)
        # "auto" needs the batch's shape: full until the first batch decides.
        mode = "full" if c.activation_checkpointing == "auto" else c.activation_checkpointing
        set_activation_checkpointing(model, mode, c.checkpoint_every_n_layers)
        model.config.use_cache = False  # the KV cache is useless in training and costs memory
        model.train()  # from_pretrained returns eval mode (dropout off); Lightning toggles modes itself
        self.model = model

    def on_fit_start(self) -> None:
        # Here, after QLoRAPrecision converted the model and the Trainer moved (quantized) it: compile
        # must see the final layers.
        wanted = self.config.compile is True or (self.config.compile == "auto" and self.device.type == "cuda")
        if wanted and not getattr(self.model, "_blocks_compiled", False):
            compile_blocks(self.model)
            self.model._blocks_compiled = True

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # After the first step, once: it holds the run's peak (the next steps repeat it), and the blocks have
        # compiled, forward and backward.
        if getattr(self, "_first_step_told", False):
            return
        self._first_step_told = True
        if self._trainer is not None and not self.trainer.is_global_zero:
            return
        if self.config.max_memory_gib and self.device.type == "cuda":
            message = over_budget(
                torch.cuda.max_memory_allocated(self.device),
                self.config.max_memory_gib,
                self.checkpointing_estimate,
            )
            if message:
                say(message)
        # Blocks that did not compile whole run the code between graph pieces eagerly, slower, and nothing
        # else would show it.
        if getattr(self.model, "_blocks_compiled", False):
            count, first = graph_breaks()
            if count:  # dynamo counts per process: a break in the user's own compiled code is counted too
                say(
                    f"warning: torch.compile broke its graphs at {count} place(s) in this run (first: {first}); "
                    "code between the pieces runs eagerly, slower. model.compile=false turns compiling the "
                    "decoder blocks off"
                )
            # A block whose recompile limit was reached before this step (by calls that each compiled anew)
            # runs the training step uncompiled.
            count, first = uncompiled_calls()
            if count:
                say(
                    f"warning: torch.compile gave up {count} time(s) in this run and ran the code eagerly "
                    f"(first: {first}); code that compiles anew on each call (TORCH_LOGS=recompiles names it) "
                    "can run under torch.compiler.set_stance('force_eager'); model.compile=false turns "
                    "compiling the blocks off"
                )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.config.activation_checkpointing == "auto" and self.checkpointing_estimate is None:
            self.checkpointing_estimate = self._choose_checkpointing(batch["input_ids"].shape)
            est = self.checkpointing_estimate
            set_activation_checkpointing(self.model, est.checkpointing, est.every_n_layers)

    def _choose_checkpointing(self, shape: Any) -> Any:
        plugin = self.trainer.precision_plugin if self._trainer is not None else None
        return plan_checkpointing(
            self.config,
            self.model.config,
            int(shape[0]),
            int(shape[1]),
            plugin,
            dtype_bytes=next(p for p in self.model.parameters() if p.is_floating_point()).element_size(),
            compiled=bool(getattr(self.model, "_blocks_compiled", False)),
            devices=self.trainer.world_size if self._trainer is not None else 1,
            sharded=is_sharded(self.model),
        )

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def _loss(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, int]:
        labels = batch.get("labels")
        if labels is None:
            labels = batch["input_ids"].masked_fill(batch.get("attention_mask", 1) == 0, IGNORE_INDEX)
        return causal_lm_loss(
            self.model, batch["input_ids"], batch.get("attention_mask"), labels, self.config.loss_chunk_size
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
        optimizer = build_optimizer(params, self.optimizer_config)
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1
        scheduler = build_scheduler(optimizer, self.optimizer_config, total)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def plan_checkpointing(
    config: ModelConfig,
    hf_config: Any,
    batch: int,
    seq: int,
    plugin: Any = None,
    dtype_bytes: int = 2,
    compiled: bool = False,
    devices: int = 1,
    sharded: bool = False,
) -> Any:
    """The fastest checkpointing whose estimated peak fits ``config.max_memory_gib`` (an ``Estimate``).

    ``devices`` and ``sharded``: the estimate is per GPU, and under FSDP the weights, adapters and optimizer
    state divide among ``devices`` GPUs.

    The pre-flight calls it with the data's batch and ``max_length`` (eager, the larger estimate), so a
    budget that cannot be met stops the run before anything loads; the module calls it again at the
    first batch with the batch's real shape.

    Raises:
        ValueError: not even offloaded checkpointing fits; the message has the estimate by part.
    """
    quant, lora = getattr(plugin, "quant", None), getattr(plugin, "lora", None)
    return choose_checkpointing(
        float(config.max_memory_gib),
        Shapes.from_hf(hf_config),
        batch,
        seq,
        lora_r=lora.r if lora is not None else 16,
        quantized=plugin is None or quant is not None,
        blocksize=quant.blocksize if quant is not None else 64,
        double_quant=quant.double_quant if quant is not None else True,
        dtype_bytes=dtype_bytes,
        loss_chunk=config.loss_chunk_size,
        compiled=compiled,
        devices=devices,
        strategy="fsdp" if sharded else "ddp",
    )
