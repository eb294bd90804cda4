"""The LoRA layer over a 4-bit base against plain autograd on bitsandbytes' dequantized weight."""

import math

import bitsandbytes.functional as bnbF
import pytest
import torch
from torch import nn

from lightning_qlora import Linear4bit, LoRAConfig, LoRALinear, QuantConfig
from lightning_qlora.adapters import merge_adapter
from lightning_qlora.lora import find_targets

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_layer(in_f, out_f, dtype, device, r=8, alpha=16, dropout=0.0, bias=True):
    torch.manual_seed(0)
    base = Linear4bit.from_linear(
        nn.Linear(in_f, out_f, bias=bias), QuantConfig(compute_dtype=dtype, blocksize=32)
    )
    layer = LoRALinear(base.to(device), r=r, alpha=alpha, dropout=dropout).to(device)
    nn.init.normal_(layer.lora_B.weight, std=0.1)  # B = 0 would hide errors in the B path
    return layer


def reference(layer, x):
    """The same function with every weight spelled out and autograd doing the rest."""
    weight = bnbF.dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state).detach()
    out = x @ weight.t()
    if layer.base_layer.bias is not None:
        out = out + layer.base_layer.bias
    a = layer.lora_A.weight.to(x.dtype)
    b = layer.lora_B.weight.to(x.dtype)
    return out + (layer.lora_dropout(x) @ a.t()) @ b.t() * layer.scaling


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape", [(64, 32), (96, 160), (256, 64)])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_outputs_and_gradients_match_autograd_reference(device, dtype, tol, shape, dropout):
    layer = make_layer(*shape, dtype=dtype, device=device, dropout=dropout)
    x = torch.randn(4, 9, shape[0], dtype=dtype, device=device, requires_grad=True)
    grad = torch.randn(4, 9, shape[1], dtype=dtype, device=device)

    torch.manual_seed(1)  # same dropout mask in both
    out = layer(x)
    gx, ga, gb = torch.autograd.grad(out, (x, layer.lora_A.weight, layer.lora_B.weight), grad)
    torch.manual_seed(1)
    ref = reference(layer, x)
    rx, ra, rb = torch.autograd.grad(ref, (x, layer.lora_A.weight, layer.lora_B.weight), grad)

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    assert rel(out, ref) < tol
    assert rel(gx, rx) < tol and rel(ga, ra) < tol and rel(gb, rb) < tol
    assert ga.dtype == gb.dtype == torch.float32, "adapters keep fp32 master weights"


def test_init_is_kaiming_a_and_zero_b_and_rslora_scaling():
    base = nn.Linear(64, 32)
    layer = LoRALinear(base, r=16, alpha=32)
    assert torch.all(layer.lora_B.weight == 0) and layer.lora_A.weight.abs().max() <= 1 / math.sqrt(64) + 1e-6
    assert layer.scaling == 2.0
    assert LoRALinear(base, r=16, alpha=32, use_rslora=True).scaling == 8.0
    assert LoRAConfig(r=16, alpha=32, use_rslora=True).scaling == 8.0


def test_target_selection_by_all_linear_names_and_regex():
    model = nn.ModuleDict(
        {
            "attn": nn.ModuleDict({"q_proj": nn.Linear(8, 8), "v_proj": nn.Linear(8, 8)}),
            "mlp": nn.ModuleDict({"up_proj": nn.Linear(8, 8)}),
            "lm_head": nn.Linear(8, 8),
        }
    )
    assert find_targets(model, LoRAConfig()) == ["attn.q_proj", "attn.v_proj", "mlp.up_proj"]
    assert find_targets(model, LoRAConfig(target_modules=["q_proj", "up_proj"])) == [
        "attn.q_proj",
        "mlp.up_proj",
    ]
    assert find_targets(model, LoRAConfig(target_modules=r"attn\..*")) == ["attn.q_proj", "attn.v_proj"]
    assert find_targets(model, LoRAConfig(exclude_modules=["v_proj"])) == ["attn.q_proj", "mlp.up_proj"]


def test_merge_folds_the_adapter_into_a_16bit_linear():
    layer = make_layer(64, 48, dtype=torch.float32, device="cpu")
    model = nn.Sequential(layer)
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = layer(x)
        merge_adapter(model)
        merged = model[0]
        assert type(merged) is nn.Linear and merged.weight.dtype == torch.float32
        torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-5)
