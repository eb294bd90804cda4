"""Activation checkpointing modes and the memory estimate behind ``activation_checkpointing=auto``.

The activations a step keeps are measured for real on the CPU with autograd's saved-tensor hooks
(every tensor the backward will read), and held against :mod:`lightning_qlora.memory`'s model.
"""

from __future__ import annotations

import pytest
import torch
from tiny import TINY

from lightning_qlora import LoRAConfig, QLoRAPrecision, QuantConfig
from lightning_qlora.anatomy import decoder_layers
from lightning_qlora.blocks import block_checkpointing, set_activation_checkpointing
from lightning_qlora.memory import (
    GIB,
    Shapes,
    activation_bytes_per_token,
    choose_checkpointing,
    estimate,
    over_budget,
)
from lightning_qlora.module import CausalLMModule

LAYERS, BATCH, SEQ = 4, 2, 64


def _module(dtype: str = "float32", **settings) -> CausalLMModule:
    module = CausalLMModule(
        from_config={"model_type": "llama", **TINY, "num_hidden_layers": LAYERS}, **settings
    )
    plugin = QLoRAPrecision(quant=QuantConfig(compute_dtype=dtype), lora=LoRAConfig(r=4))
    with plugin.module_init_context():
        module.configure_model()
    module.model.train()
    return module


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, TINY["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _saved_bytes(module: CausalLMModule) -> int:
    """Bytes of the distinct tensors autograd saves for the backward of one loss."""
    saved: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))] = (
            t.numel() * t.element_size()
        )
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module._loss(_batch())
    return sum(saved.values())


@pytest.mark.parametrize("dtype,bytes_", [("float32", 4), ("bfloat16", 2)])
def test_the_estimate_of_kept_activations_matches_what_autograd_saves(dtype, bytes_):
    module = _module(dtype)
    shapes = Shapes.from_hf(module.model.config)
    per_token = activation_bytes_per_token(shapes, bytes_)
    measured = {}
    for mode in ("none", "full"):
        set_activation_checkpointing(module.model, mode)
        measured[mode] = _saved_bytes(module) / (BATCH * SEQ * LAYERS)
    # What a non-checkpointed layer keeps, per token: the model within 10% of the measurement.
    kept = measured["none"] - measured["full"] + per_token["checkpointed"]
    assert kept == pytest.approx(per_token["none"], rel=0.10)
    assert measured["full"] < 0.2 * measured["none"]


def test_every_n_layers_checkpoints_layers_0_n_2n():
    module = _module()
    layers = decoder_layers(module.model)
    set_activation_checkpointing(module.model, "every_n_layers", 2)
    assert [block_checkpointing(layer) for layer in layers] == ["recompute", "none", "recompute", "none"]
    set_activation_checkpointing(module.model, "offload")
    assert [block_checkpointing(layer) for layer in layers] == ["offload"] * LAYERS
    set_activation_checkpointing(module.model, "full")
    assert [block_checkpointing(layer) for layer in layers] == ["recompute"] * LAYERS
    set_activation_checkpointing(module.model, "none")
    assert [block_checkpointing(layer) for layer in layers] == ["none"] * LAYERS
    assert not any(layer.gradient_checkpointing for layer in layers), "transformers' own flag stays off"


@pytest.mark.parametrize("mode", ["full", "every_n_layers", "offload"])
def test_every_mode_gives_the_gradients_of_no_checkpointing(mode):
    grads = {}
    for m in ("none", mode):
        torch.manual_seed(0)
        module = _module()
        set_activation_checkpointing(module.model, m, 3)
        loss, _ = module._loss(_batch())
        loss.backward()
        grads[m] = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
    assert grads[mode].keys() == grads["none"].keys()
    for name, grad in grads["none"].items():
        torch.testing.assert_close(grads[mode][name], grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["full", "offload"])
def test_the_recompute_runs_under_the_default_dtype_of_its_forward(mode):
    """The plugin sets the default dtype around the forward, and around the backward, where checkpointing
    recomputes each layer: under another default dtype a compiled block recompiled there and saved another
    number of tensors than in its forward (a ``CheckpointError`` with DDP on 2 H200s)."""
    plugin = QLoRAPrecision(quant=QuantConfig(compute_dtype="bfloat16"), lora=LoRAConfig(r=4))
    module = _module()
    set_activation_checkpointing(module.model, mode)
    seen: list[torch.dtype] = []
    for layer in decoder_layers(module.model):
        layer.mlp.register_forward_pre_hook(lambda *_: seen.append(torch.get_default_dtype()))
    with plugin.forward_context():
        loss, _ = module._loss(_batch())
    assert len(seen) == LAYERS and torch.get_default_dtype() == torch.float32
    plugin.backward(loss, module, None)
    assert torch.get_default_dtype() == torch.float32
    assert seen == [torch.bfloat16] * 2 * LAYERS
    assert all(p.grad is not None for p in module.parameters() if p.requires_grad)


def test_gradient_checkpointing_true_still_means_full():
    module = CausalLMModule(from_config={"model_type": "llama", **TINY}, gradient_checkpointing=True)
    assert module.config.activation_checkpointing == "full"


LLAMA_1B = Shapes(
    hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, head_dim=64, vocab=128256, tied=True
)


def test_auto_picks_the_fastest_setting_that_fits_and_refuses_an_impossible_budget():
    big = choose_checkpointing(80, LLAMA_1B, 4, 2048)
    assert big.checkpointing == "none"
    tight = choose_checkpointing(6, LLAMA_1B, 4, 2048)
    assert tight.checkpointing in ("full", "offload", "every_n_layers") and tight.total <= 6 * GIB
    # a larger budget never picks a slower (more checkpointed) setting
    order = [estimate(LLAMA_1B, 4, 2048, checkpointing=m).total for m in ("none", "full", "offload")]
    assert order[0] > order[1] > order[2]
    with pytest.raises(ValueError, match=r"model.max_memory_gib=1 is too small .* GiB needed"):
        choose_checkpointing(1, LLAMA_1B, 4, 2048)


def test_a_measured_peak_over_the_budget_is_said_with_the_estimate():
    """The budget chose from an estimate; a step measuring more (the estimate missed) is named in one line."""
    est = choose_checkpointing(6, LLAMA_1B, 4, 2048)
    assert over_budget(int(5.9 * GIB), 6, est) is None
    message = over_budget(int(26.08 * GIB), 6, est)
    assert message.startswith(
        "warning: the first step's peak GPU memory is 26.08 GiB, over model.max_memory_gib=6"
    )
    assert f"(estimated {est.total / GIB:.2f} GiB for {est.mode})" in message and "\n" not in message
    assert "estimated" not in over_budget(int(7 * GIB), 6)  # a fixed setting: no estimate to name


def test_auto_decides_at_the_first_batch_from_its_shape():
    import lightning as L

    module = _module(activation_checkpointing="auto", max_memory_gib=64)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        plugins=[QLoRAPrecision(quant=QuantConfig(compute_dtype="float32"), lora=LoRAConfig(r=4))])  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader([_batch()], batch_size=None))
    assert module.checkpointing_estimate.checkpointing == "none"  # 64 GiB is plenty for the tiny model
    assert [block_checkpointing(layer) for layer in decoder_layers(module.model)] == ["none"] * LAYERS


def test_auto_without_a_budget_is_refused():
    with pytest.raises(ValueError, match="model.max_memory_gib"):
        CausalLMModule(from_config={"model_type": "llama", **TINY}, activation_checkpointing="auto")


def test_auto_plans_per_gpu_under_fsdp():
    """Under FSDP the weights, adapters and optimizer state divide among the GPUs: the same budget buys
    more kept activations than on one GPU (7B shapes, 2 x 2048, a 16 GiB budget: one GPU recomputes every
    layer, each of 2 sharded GPUs keeps half of them)."""
    import transformers

    from lightning_qlora.module import ModelConfig, plan_checkpointing

    hf = transformers.LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000,
    )  # fmt: skip
    config = ModelConfig(name_or_path="x", activation_checkpointing="auto", max_memory_gib=16.0)
    plugin = QLoRAPrecision(lora=LoRAConfig(r=16))
    one = plan_checkpointing(config, hf, 2, 2048, plugin)
    two = plan_checkpointing(config, hf, 2, 2048, plugin, devices=2, sharded=True)
    assert (one.checkpointing, two.checkpointing, two.every_n_layers) == ("full", "every_n_layers", 2)
    assert one.total > 6 * GIB and two.total <= 16 * GIB
