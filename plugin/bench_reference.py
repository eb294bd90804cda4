"""The benchmark's reference: PEFT LoRA on a transformers model quantized by bitsandbytes, as its users run it.

Modes:
    peft       ``BitsAndBytesConfig`` (NF4, double quant, bf16 compute) + ``prepare_model_for_kbit_training``
               + PEFT LoRA, under bf16 autocast as the HF Trainer runs it with ``bf16=True``
    peft_noac  the same without autocast
    peft16     PEFT LoRA on the bf16 model under autocast (16-bit LoRA, the reference's ceiling)

A 4-bit checkpoint (the 70b's) is loaded as transformers loads any ``...-bnb-4bit`` checkpoint: its
config.json carries the quantization settings, ``from_pretrained`` places the packed weights as they are.

More than one GPU: this process is one rank that ``torchrun`` started.

* ``ddp``: the PEFT model in plain ``torch.nn.parallel.DistributedDataParallel``
  (``find_unused_parameters=False``, as the HF Trainer does with gradient checkpointing).
* ``fsdp``: FSDP-QLoRA as HF documents it, i.e. what ``Trainer`` + accelerate set up for a PEFT model
  (``transformers.distributed.fsdp.update_fsdp_plugin_peft``): torch FSDP1 ``FullyShardedDataParallel``
  with PEFT's ``fsdp_auto_wrap_policy`` (each decoder layer a unit, each trainable LoRA leaf a unit of
  its own, so no unit mixes frozen and trainable weights), the 4-bit weights stored in bf16
  (``bnb_4bit_quant_storage=torch.bfloat16``) and a bf16 ``MixedPrecision`` (param, reduce and buffer
  dtype = the storage dtype), accelerate's defaults otherwise (``FULL_SHARD``, ``use_orig_params=False``,
  backward prefetch, limited all-gathers). ``prepare_model_for_kbit_training`` is not called: its fp32
  upcast of the norms and embeddings would break FSDP's one dtype per unit (TRL skips it for sharded
  QLoRA for that reason); gradient checkpointing is enabled as for ``peft16``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from .bench_common import (
    LORA,
    LR,
    MODELS,
    GradientTraffic,
    Result,
    batches,
    combine_ranks,
    job_start,
    make_result,
    peak_allocated,
    reset_peak,
    set_grad_bytes,
    sync,
    trainable_bytes,
)

QUANTIZED_MODES = ("peft", "peft_noac")


def run_peft(
    model: str,
    directory: Path,
    device: torch.device,
    steps: int,
    warmup: int,
    mode: str,
    batch: int = 0,
    devices: int = 1,
    strategy: str = "ddp",
) -> Result | None:
    """The reference, on one device or as one ``torchrun`` rank under torch DDP or FSDP1 (see the module
    docstring).

    Returns:
        The row (on rank 0: the ranks combined), None on the other ranks.
    """
    rank, local = 0, 0
    fsdp = devices > 1 and strategy == "fsdp"
    if devices > 1:
        import torch.distributed as dist

        local = int(os.environ["LOCAL_RANK"])
        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank = dist.get_rank()
    reset_peak(device)
    t0 = time.perf_counter()
    lm = load_reference(model, directory, device, mode, fsdp)
    traffic = GradientTraffic()
    step_model: Any = lm
    counted = 0  # the trainable bytes a step reduces, where no collective is seen to measure them
    if devices > 1 and not fsdp:
        device_ids = [local] if device.type == "cuda" else None
        step_model = torch.nn.parallel.DistributedDataParallel(
            lm, device_ids=device_ids, find_unused_parameters=False
        )
        step_model.register_comm_hook(traffic, GradientTraffic.hook)
        counted = trainable_bytes(lm)
    elif fsdp:
        counted = trainable_bytes(lm, torch.bfloat16)  # FSDP reduces in the MixedPrecision reduce dtype
        step_model = wrap_fsdp1(lm, device)
        traffic.count_reduce_scatters()
    sync(device)
    load = {"s": time.perf_counter() - t0, "peak": peak_allocated(device)}
    reset_peak(device)
    # Built on the wrapped model: FSDP1 (use_orig_params=False) trains its flat parameters.
    optimizer = torch.optim.AdamW([p for p in step_model.parameters() if p.requires_grad], lr=LR)
    autocast = mode in ("peft", "peft16")
    times: list[float] = []
    losses: list[float] = []
    first_step_s = None
    for ids in batches(model, warmup + steps, device, batch, seed=rank):
        sync(device)
        start = time.perf_counter()
        traffic.bytes = 0
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = step_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - start)
        traffic.step_done()
        if first_step_s is None:
            first_step_s = time.time() - job_start()
        losses.append(loss.item())
    result = make_result(model, mode, times[warmup:], losses, load, device, batch, first_step_s)
    result.checkpointing = "full"
    if devices > 1:
        result.strategy = strategy
        set_grad_bytes(result, traffic, counted)
    return combine_ranks(result, devices)


def load_reference(model: str, directory: Path, device: torch.device, mode: str, fsdp: bool = False) -> Any:
    """The PEFT model of ``mode`` on ``device``, with gradient checkpointing, in train mode.

    Raises:
        ValueError: FSDP asked for on a 4-bit checkpoint, whose packed weights are stored as uint8: FSDP1
            needs them in the compute dtype (``bnb_4bit_quant_storage``), fixed when it was quantized.
    """
    import transformers
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    four_bit = bool(MODELS[model].get("four_bit"))
    if fsdp and four_bit:
        raise ValueError(
            f"--strategy fsdp: the reference cannot shard {model}'s 4-bit checkpoint (uint8 storage; FSDP1 "
            "needs bnb_4bit_quant_storage=bfloat16 at quantization); use --strategy ddp for the reference"
        )
    kwargs: dict[str, Any] = dict(
        dtype=torch.bfloat16,
        attn_implementation="sdpa",
        device_map={"": device.index or 0} if device.type == "cuda" else "cpu",
    )
    quantized = mode in QUANTIZED_MODES
    if quantized and not four_bit:  # a 4-bit checkpoint's config.json carries its own settings
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            # FSDP1 flattens a unit's tensors into one of a single dtype: the packed weights join the norms.
            bnb_4bit_quant_storage=torch.bfloat16 if fsdp else torch.uint8,
        )
    lm = transformers.AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    if quantized and not fsdp:
        lm = prepare_model_for_kbit_training(lm, use_gradient_checkpointing=True)
    else:
        lm.gradient_checkpointing_enable()
        lm.enable_input_require_grads()
    lm.config.use_cache = False
    lm = get_peft_model(
        lm,
        LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    lm.train()
    return lm


def wrap_fsdp1(lm: Any, device: torch.device) -> Any:
    """``lm`` in FSDP1 as ``Trainer`` + accelerate wrap a PEFT (Q)LoRA model (see the module docstring)."""
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision, ShardingStrategy

    bf16 = torch.bfloat16
    return FullyShardedDataParallel(
        lm,
        auto_wrap_policy=fsdp_auto_wrap_policy(lm),
        sharding_strategy=ShardingStrategy.FULL_SHARD,
        mixed_precision=MixedPrecision(param_dtype=bf16, reduce_dtype=bf16, buffer_dtype=bf16),
        device_id=device,
        use_orig_params=False,
        limit_all_gathers=True,
    )
