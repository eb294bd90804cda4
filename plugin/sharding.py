"""FSDP for QLoRA: Lightning's ``ModelParallelStrategy`` (FSDP2, ``fully_shard``) sharding each decoder layer.

Why FSDP2 rather than Lightning's ``FSDPStrategy`` (FSDP1): FSDP2 shards every parameter on its own
(a DTensor per parameter), so a layer's packed 4-bit bytes (viewed as the compute dtype first: torch 2.11's
FSDP2 shards floating tensors only), its 16-bit norms and its float32 adapters shard side by side, frozen next to trainable, with no flat parameter that needs one dtype and
one ``requires_grad``. Under FSDP1 the 4-bit bytes must be stored in the compute dtype
(``quant_storage``) and the adapters wrapped in units of their own. FSDP2 also composes with
``torch.compile`` per block, and Lightning's ``FSDPStrategy`` accepts no precision plugin but its own.

The packed bytes are what is sharded; each layer keeps its quantization constants (absmax, and the
nested ones under double quantization: 1/16 to 1/64 of the packed bytes) whole, on every GPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.strategies.model_parallel import _has_dtensor_modules, _materialize_distributed_module
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.fabric.utilities.rank_zero import rank_zero_info
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torch.distributed.constants import default_pg_timeout
from typing_extensions import override

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from torch.distributed.device_mesh import DeviceMesh


STATE_DICT_TYPES = ("sharded", "full")
WRAPS = ("decoder_layer", "model")


@dataclass
class FSDPConfig:
    """How :class:`FSDP2Strategy` shards. Also the Hydra schema of ``trainer.fsdp`` (``trainer=fsdp``).

    Args:
        reshard_after_forward: ``True`` frees each layer's gathered weights after its forward and
            gathers them again for the backward (FSDP1's ``FULL_SHARD``); ``False`` keeps them until the
            backward (``SHARD_GRAD_OP``: less communication, more memory).
        cpu_offload: shards and the optimizer step in host memory. Refused for now: gathering the
            adapters for saving, the module's device and the memory estimate all assume GPU-resident
            shards, and the setting has not run on a GPU.
        state_dict_type: ``"sharded"`` writes a checkpoint folder with one file per rank (resumable
            with any number of GPUs); ``"full"`` gathers one file on rank zero.
        wrap: ``"decoder_layer"`` shards each decoder layer as a unit (gathered one at a time);
            ``"model"`` shards the whole model as one unit (gathered whole: for small models only).
    """

    reshard_after_forward: bool = True
    cpu_offload: bool = False
    state_dict_type: str = "sharded"
    wrap: str = "decoder_layer"

    def __post_init__(self) -> None:
        if self.state_dict_type not in STATE_DICT_TYPES:
            raise ValueError(
                f"trainer.fsdp.state_dict_type={self.state_dict_type!r} is not supported; use one of "
                f"{STATE_DICT_TYPES}"
            )
        if self.cpu_offload:
            raise ValueError(
                "trainer.fsdp.cpu_offload=true is not supported yet (not verified on GPUs: saving, the module's "
                "device and the memory estimate assume the shards on the GPU); shard over more GPUs "
                "(trainer.devices) instead, and see lightning-qlora-estimate for what fits"
            )
        if self.wrap not in WRAPS:
            raise ValueError(f"trainer.fsdp.wrap={self.wrap!r} is not supported; use one of {WRAPS}")


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallel for a QLoRA (or 16-bit LoRA) model, built on Lightning's ``ModelParallelStrategy``.

    The LightningModule needs no sharding code: after the precision plugin converted the model, each
    decoder layer in turn is moved to the GPU (which quantizes its 4-bit weights there, one layer in
    16-bit at a time) and sharded with ``fully_shard``; the rest (embeddings, final norm, head) is
    sharded last. A module whose ``configure_model`` already applied ``fully_shard`` is left as it is.
    ``Trainer(strategy="fsdp2")`` names it once ``lightning_qlora`` is imported.

    Args:
        config: the sharding settings (:class:`FSDPConfig`); or give them as keyword arguments.
        process_group_backend: ``nccl`` on GPUs and ``gloo`` on CPUs by default.
        timeout: for collectives.
        **settings: :class:`FSDPConfig` fields, e.g. ``FSDP2Strategy(reshard_after_forward=False)``.
    """

    strategy_name = "fsdp2"

    def __init__(
        self,
        config: FSDPConfig | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        **settings: Any,
    ) -> None:
        if config is not None and settings:
            raise ValueError(f"FSDP2Strategy: give config or its fields ({sorted(settings)}), not both")
        self.config = config if config is not None else FSDPConfig(**settings)
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=self.config.state_dict_type == "sharded",
            process_group_backend=process_group_backend,
            timeout=timeout,
        )

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(cls.strategy_name, cls, description="FSDP2 (fully_shard) for QLoRA models")

    @override
    def setup_environment(self) -> None:
        # Every rank shards (no tensor parallelism): the data-parallel size is the world size.
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        assert self.model is not None and self.accelerator is not None
        self.accelerator.setup(trainer)
        _materialize_distributed_module(self.model, self.root_device)
        self.model = self.precision_plugin.convert_module(self.model)
        if not _has_dtensor_modules(self.model):
            shard_model(self.model, self.device_mesh["data_parallel"], self.root_device, self.config)
        self.model_to_device()  # buffers and anything left outside the shards
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)


def shard_model(model: nn.Module, mesh: DeviceMesh, device: torch.device, config: FSDPConfig) -> int:
    """``fully_shard`` each decoder layer of ``model`` (moving it to ``device`` first), then the rest.

    Moving a layer quantizes its 4-bit weights on ``device`` and sharding it frees all but this rank's
    share, so a GPU never holds more than its shards plus one layer.

    Returns:
        How many units were sharded before the root: decoder layers, and the embedding and head.
    """
    from torch.distributed.fsdp import fully_shard

    from .anatomy import decoder_layers

    kwargs: dict[str, Any] = {
        "mesh": mesh,
        "reshard_after_forward": config.reshard_after_forward,
    }
    layers = decoder_layers(model) if config.wrap == "decoder_layer" else []
    viewed = 0
    for layer in layers:
        layer.to(device)
        viewed += _float_storage(layer)
        fully_shard(layer, **kwargs)
    # Sharding the LightningModule itself would change its class: its children with parameters are the roots.
    roots = [c for c in (model.children() if _is_lightning_module(model) else [model]) if _has_parameters(c)]
    # The input embedding and the output head as units of their own: FSDP2 keeps the root unit gathered
    # from forward to backward, and these two are the large part of it (1 GB for a 32k vocabulary at width
    # 8192); as units they are gathered only around their own use, and the loss can call the head chunk by
    # chunk instead of materialising the full-vocabulary logits.
    untied = 0
    for root in roots if layers else []:
        ends = [getattr(root, f, lambda: None)() for f in ("get_input_embeddings", "get_output_embeddings")]
        ends = [m for m in ends if isinstance(m, nn.Module) and _has_parameters(m)]
        if len(ends) == 2 and ends[0].weight is ends[1].weight and not ends[0].weight.requires_grad:
            untied += _untie(*ends)
        if len(ends) == 2 and ends[0].weight is not ends[1].weight:
            for end in ends:
                end.to(device)
                fully_shard(end, **kwargs)
                layers.append(end)
    # The rest (final norm; embeddings and head when wrap=model or the embedding trains) as the root unit.
    inside_layers = {id(m) for layer in layers for m in layer.modules()}
    for root in roots:
        for module in root.modules():  # the sharded units are placed already
            if id(module) not in inside_layers:
                module._apply(lambda t: t.to(device), recurse=False)
                viewed += _float_storage(module, recurse=False)
        fully_shard(root, **kwargs)
    if untied:
        rank_zero_info(
            f"lightning-qlora: FSDP2 shards the frozen output head apart from the embedding it was tied to (a copy of "
            f"the same values, {untied / 2**20:.0f} MiB before sharding) so the loss can gather it on its own"
        )
    if viewed:
        rank_zero_info(
            "lightning-qlora: FSDP2 shards the 4-bit weights held as their compute dtype (quant.quant_storage: "
            "the same bytes, viewed), not uint8"
        )
    return len(layers)


@torch.no_grad()
def _untie(embedding: nn.Module, head: nn.Module) -> int:
    """Gives a frozen head tied to the embedding its own copy of the weight (FSDP2 cannot shard one parameter
    in two units); returns the bytes copied. The copy is made where the weight is (the host, before the
    layers move), so the GPU holds one whole copy at a time while each is moved and sharded. Both stay
    frozen, so they hold the same values (unless the embedding is unfrozen or resized afterwards)."""
    head.weight = nn.Parameter(embedding.weight.detach().clone(), requires_grad=False)
    return head.weight.numel() * head.weight.element_size()


def _float_storage(module: nn.Module, recurse: bool = True) -> int:
    """Views uint8 packed 4-bit weights as their compute dtype (the same bytes; bitsandbytes' ``quant_storage``);
    returns how many it viewed.

    torch 2.11's FSDP2 wraps each shard in a parameter that requires grad before freezing it, which an
    integer tensor refuses; a floating view shards on every torch, and one dtype per unit keeps each
    all-gather a single copy.
    """
    from .nf4 import Linear4bit

    viewed = 0
    for layer in module.modules() if recurse else [module]:
        if isinstance(layer, Linear4bit) and layer.quantized and not layer.weight.is_floating_point():
            layer.view_storage(layer.compute_dtype)
            viewed += 1
    return viewed


def _has_parameters(module: nn.Module) -> bool:
    return next(iter(module.parameters()), None) is not None


def _is_lightning_module(module: nn.Module) -> bool:
    from lightning.pytorch import LightningModule

    return isinstance(module, LightningModule)


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole value of a parameter: a sharded DTensor gathered (a collective: every rank calls it)."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def is_sharded(module: nn.Module) -> bool:
    """True when any parameter of ``module`` is a DTensor (FSDP2)."""
    return _has_dtensor_modules(module)


@contextmanager
def gathered_adapters(model: nn.Module) -> Iterator[None]:
    """Every adapter weight of ``model`` whole on every rank while the block runs; a no-op unless sharded.

    A collective: every rank enters it (Lightning calls the hooks that save on every rank), and then
    the rank that writes (rank zero) sees the same adapters a single-GPU run would hold.
    """
    if not is_sharded(model):
        yield
        return
    from .lora import lora_layers

    swapped = []
    for layer in lora_layers(model).values():
        for part in (layer.lora_A, layer.lora_B):
            sharded = part.weight
            part.weight = nn.Parameter(full_tensor(sharded.detach()), requires_grad=False)
            swapped.append((part, sharded))
    try:
        yield
    finally:
        for part, sharded in swapped:
            part.weight = sharded
