"""torch.compile through 4-bit layers (their matmul one opaque op over plain tensors) against the eager path."""

import pytest
import torch
import transformers
from tiny import tiny_llama_config
from torch import nn

from lightning_qlora import Linear4bit, LoRAConfig, LoRALinear, QLoRAPrecision, QuantConfig
from lightning_qlora.loss import linear_cross_entropy
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
    assert layer.frozen_weight() is layer.weight, "eager mode keeps the Params4bit path"


def test_the_compiled_4bit_matmul_is_one_opaque_op_with_its_own_gradient():
    config = QuantConfig(compute_dtype=torch.float32, blocksize=32)
    layer = Linear4bit.from_linear(nn.Linear(64, 48), config).to("cpu")
    spec, tensors = packed_weight(layer.weight)
    x = torch.randn(2, 3, 64, requires_grad=True)
    torch.library.opcheck(torch.ops.lightning_qlora.dequantize_matmul, (x, list(tensors), *spec, True))
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    out = torch.compile(layer, backend=backend)(x)
    targets = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    assert any("lightning_qlora.dequantize_matmul" in t for t in targets), targets
    assert not any("bitsandbytes" in t for t in targets), "bitsandbytes' ops stay inside the opaque op"
    (grad,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(grad, torch.ones(2, 3, 48) @ dequantize(layer.weight))


@pytest.mark.parametrize("dropout", [False, True])
def test_the_compiled_4bit_lora_matmul_is_one_opaque_op_with_its_own_gradients(dropout):
    """Base and adapter in one op under torch.compile (the adapter's sum accumulated by the GEMM): opcheck's
    schema, fake-tensor and autograd checks, and the graph calls it, not a separate adapter product."""
    config = QuantConfig(compute_dtype=torch.float32, blocksize=32)
    layer = LoRALinear(Linear4bit.from_linear(nn.Linear(64, 48), config).to("cpu"), r=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    spec, tensors = packed_weight(layer.base_layer.weight)
    x = torch.randn(2, 3, 64, requires_grad=True)
    xd = torch.randn(2, 3, 64, requires_grad=True) if dropout else None
    a, b = (p.detach().requires_grad_() for p in (layer.lora_A.weight, layer.lora_B.weight))
    torch.library.opcheck(
        torch.ops.lightning_qlora.dequantize_matmul_lora, (x, xd, a, b, 2.0, list(tensors), *spec)
    )
    out, xa = torch.ops.lightning_qlora.dequantize_matmul_lora(x, xd, a, b, 2.0, list(tensors), *spec)
    w = dequantize(layer.base_layer.weight)
    xs = x if xd is None else xd
    torch.testing.assert_close(out, x @ w.t() + (xs @ a.t()) @ b.t() * 2.0)
    torch.testing.assert_close(xa, (xs @ a.t()).reshape(6, 4))
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(layer, backend=backend)(x)
    targets = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    assert any("lightning_qlora.dequantize_matmul_lora" in t for t in targets), targets
    assert not any(t.endswith("dequantize_matmul.default") for t in targets), targets


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
        loss = linear_cross_entropy(hidden, model.lm_head.weight, ids)
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_compiled_4bit_blocks_give_the_eager_gradients():
    """On CUDA, bitsandbytes' ops traced by torch.compile once gave gradients 1e5x too large."""
    config = transformers.LlamaConfig(
        vocab_size=4096, hidden_size=1024, intermediate_size=4096, num_hidden_layers=2,
        num_attention_heads=16, num_key_value_heads=4, head_dim=64,
    )  # fmt: skip
    ids = torch.randint(0, 4096, (2, 512), generator=torch.Generator().manual_seed(1)).cuda()

    def grads(compiled: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        QLoRAPrecision(lora=LoRAConfig(r=16, alpha=32)).convert_module(model).cuda()
        for layer in model.modules():
            if isinstance(layer, LoRALinear):
                nn.init.normal_(layer.lora_B.weight, std=0.02)  # so A gets a gradient too
        if compiled:
            compile_blocks(model)
        loss = linear_cross_entropy(model.model(input_ids=ids).last_hidden_state, model.lm_head.weight, ids)
        loss.backward()
        return {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}

    eager, compiled = grads(False), grads(True)
    assert eager.keys() == compiled.keys() and len(eager) == 2 * 7 * 2
    for name, want in eager.items():
        got = compiled[name]
        assert torch.isfinite(got).all(), name
        # bf16 compute, fused (eager) vs composed (compiled) adapter sums: close, not bitwise
        assert (got - want).norm() <= 0.02 * want.norm() + 1e-6, name
