"""The plain-tensor path that torch.compile traces through 4-bit layers, against the eager path."""

import pytest
import torch
import transformers
from tiny import tiny_llama_config
from torch import nn

from lightning_qlora import Linear4bit, LoRAConfig, LoRALinear, QLoRAPrecision, QuantConfig
from lightning_qlora.loss import causal_lm_loss
from lightning_qlora.module import compile_blocks
from lightning_qlora.nf4 import dequantize, dequantize_packed, packed_weight


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_packed_tensors_dequantize_exactly_like_bitsandbytes(quant_type, double_quant):
    config = QuantConfig(quant_type=quant_type, double_quant=double_quant, compute_dtype=torch.float32)
    layer = Linear4bit.from_linear(nn.Linear(128, 96), config).to("cpu")
    spec, tensors = packed_weight(layer.weight)
    assert all(type(t) is torch.Tensor for t in tensors), "no Params4bit reaches a compiled graph"
    assert torch.equal(dequantize_packed(spec, tensors), dequantize(layer.weight))
    assert layer.frozen_weight() == (None, (layer.weight,)), "eager mode keeps the Params4bit path"


def test_a_compiled_lora_layer_matches_eager_outputs_and_gradients():
    torch.manual_seed(0)
    base = Linear4bit.from_linear(nn.Linear(64, 48), QuantConfig(compute_dtype=torch.float32, blocksize=32))
    layer = LoRALinear(base.to("cpu"), r=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(3, 5, 64, requires_grad=True)
    eager = layer(x)
    grads = torch.autograd.grad(eager.sum(), (x, layer.lora_A.weight, layer.lora_B.weight))
    compiled = torch.compile(layer)(x)
    compiled_grads = torch.autograd.grad(compiled.sum(), (x, layer.lora_A.weight, layer.lora_B.weight))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for got, want in zip(compiled_grads, grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _train(compiled: bool, steps: int = 3) -> list[float]:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_llama_config())
    QLoRAPrecision(
        quant=QuantConfig(compute_dtype=torch.float32, blocksize=32), lora=LoRAConfig(r=4)
    ).convert_module(model).to("cpu")
    if compiled:
        assert compile_blocks(model) == 2
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        hidden = model.model(input_ids=ids).last_hidden_state
        loss = causal_lm_loss(hidden, model.lm_head.weight, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_compiled_4bit_blocks_train_like_eager():
    eager, compiled = _train(False), _train(True)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    assert eager[-1] < eager[0]
