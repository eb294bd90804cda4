"""torch.compile through 4-bit layers (traced: the dequantization in plain torch ops; else one opaque op) against
the eager path."""

import math

import pytest
import torch
import transformers
from tiny import tiny_qlora_llama
from torch import nn

from lightning_qlora import Linear4bit, LoRAConfig, LoRALinear, QLoRAPrecision, QuantConfig
from lightning_qlora.blocks import compile_blocks, set_activation_checkpointing
from lightning_qlora.loss import linear_cross_entropy
from lightning_qlora.nf4_matmul import (
    dequantize,
    dequantize_packed,
    dequantize_traced,
    packed_weight,
    traceable,
)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_packed_tensors_dequantize_exactly_like_bitsandbytes(quant_type, double_quant):
    config = QuantConfig(quant_type=quant_type, double_quant=double_quant, compute_dtype=torch.float32)
    layer = Linear4bit.from_linear(nn.Linear(128, 96), config).to("cpu")
    spec, tensors = packed_weight(layer.weight)
    assert all(type(t) is torch.Tensor for t in tensors), "no Params4bit reaches a compiled graph"
    assert torch.equal(dequantize_packed(spec, tensors), dequantize(layer.weight))
    assert layer.frozen_weight() is layer.weight, "eager mode keeps the Params4bit path"


def _compiled(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """``module`` compiled as one graph through AOT autograd with inductor's partitioner, its output, and what
    the compiled graphs show: the ops the forward and backward call (the autograd functions inlined; the
    backward's once a backward ran) and the shapes of what the forward saves for the backward."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition  # inductor's

    seen: dict = {"ops": set(), "saved": []}

    def compiler(forward: bool):
        def compile_graph(gm, example_inputs):
            seen["ops"] |= {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
            if forward:  # a forward graph returns the output, then what it saves
                (output,) = [n for n in gm.graph.nodes if n.op == "output"]
                vals = [v.meta.get("val") for v in output.args[0][1:] if isinstance(v, torch.fx.Node)]
                seen["saved"] += [tuple(v.shape) for v in vals if isinstance(v, torch.Tensor)]
            return gm.forward

        return compile_graph

    backend = aot_autograd(
        fw_compiler=compiler(True),
        bw_compiler=compiler(False),
        partition_fn=min_cut_rematerialization_partition,
    )
    torch._dynamo.reset()
    return torch.compile(module, backend=backend, fullgraph=True)(x), seen


def test_a_weight_in_partial_blocks_compiles_as_one_opaque_op_with_its_own_gradient():
    """The fallback for what dequantize_traced does not take (a last block cut short: 150 weights, blocks of
    64), plain and under an adapter."""
    config = QuantConfig(compute_dtype=torch.float32, blocksize=64)
    base = Linear4bit.from_linear(nn.Linear(50, 3), config).to("cpu")
    spec, tensors = packed_weight(base.weight)
    assert not traceable(spec, tensors)
    x = torch.randn(2, 3, 50, requires_grad=True)
    torch.library.opcheck(torch.ops.lightning_qlora.dequantize_matmul, (x, list(tensors), *spec, True))
    adapted = LoRALinear(base, r=2, alpha=4)
    nn.init.normal_(adapted.lora_B.weight, std=0.1)
    for layer in (base, adapted):
        eager = layer(x)
        want = torch.autograd.grad(eager.sum(), x)[0]
        out, seen = _compiled(layer, x)
        got = torch.autograd.grad(out.sum(), x)[0]
        assert "lightning_qlora.dequantize_matmul.default" in seen["ops"], seen["ops"]
        assert not any("bitsandbytes" in t for t in seen["ops"]), (
            "bitsandbytes' ops stay inside the opaque op"
        )
        torch.testing.assert_close(out, eager)
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize(
    "shape,blocksize", [((96, 512), 32), ((96, 512), 256), ((48, 96), 64), ((160, 24), 32)]
)
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_traced_dequantization_is_bitsandbytes_to_the_bit(
    quant_type, double_quant, shape, blocksize, storage
):
    """Both spellings (forward, backward) of the torch-ops dequantization equal bitsandbytes' own, in fp32, bf16
    and fp16, for rows that fill blocks and rows that cross them, the bytes stored as uint8 or viewed as bf16
    (FSDP's storage)."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        config = QuantConfig(
            quant_type=quant_type, double_quant=double_quant, blocksize=blocksize, compute_dtype=dtype
        )
        layer = Linear4bit.from_linear(nn.Linear(shape[1], shape[0]), config).to("cpu")
        want = dequantize(layer.weight)
        if storage != torch.uint8:
            layer.view_storage(storage)
        spec, table, packed = layer.packed()
        assert traceable(spec, packed) and packed[0].dtype == storage
        for backward in (False, True):
            got = dequantize_traced(spec, table, packed, backward=backward)
            assert got.dtype == want.dtype and torch.equal(got, want), (dtype, backward)


@pytest.mark.parametrize("adapter", [True, False], ids=["lora", "plain"])
def test_compiled_4bit_layers_are_traced_and_save_no_16bit_weight(adapter):
    """Under torch.compile a 4-bit layer (with its adapter) is plain torch ops in forward and backward: no
    bitsandbytes call, no opaque dequantization, one graph; the same outputs and gradients as eager; and the
    compiled forward saves nothing the size of the weight (the backward dequantizes again). An adapter's sums
    with the base product run in place through one opaque op."""
    torch.manual_seed(0)
    base = Linear4bit.from_linear(nn.Linear(64, 48), QuantConfig(compute_dtype=torch.float32, blocksize=32))
    layer = LoRALinear(base.to("cpu"), r=4, alpha=8) if adapter else base.to("cpu")
    if adapter:
        nn.init.normal_(layer.lora_B.weight, std=0.1)
    params = [p for p in layer.parameters() if p.requires_grad]
    x = torch.randn(3, 5, 64, requires_grad=True)
    eager = layer(x)
    want = torch.autograd.grad(eager.sum(), (x, *params))
    compiled, seen = _compiled(layer, x)
    got = torch.autograd.grad(compiled.sum(), (x, *params))
    ops = seen["ops"]
    assert any("aten.index" in t for t in ops) and any("index_select" in t for t in ops), (
        ops
    )  # both passes seen
    assert not any("bitsandbytes" in t or "dequantize_matmul" in t for t in ops), ops
    # Compiled, an addmm copies its whole input before adding to it: in place, the sums have none.
    assert not any("addmm" in t for t in ops), ops
    sums = [t for t in ops if "lightning_qlora" in t]
    assert sums == (["lightning_qlora.low_rank_plus_matmul.default"] if adapter else []), ops
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert seen["saved"] and not any(math.prod(shape) >= 48 * 64 for shape in seen["saved"]), seen["saved"]


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_a_compiled_16bit_lora_layer_sums_in_place(bias):
    """A frozen 16-bit base with an adapter, compiled: its sums go through the in-place op (no addmm, whose
    copy of the output the op avoids), with eager's outputs and gradients."""
    torch.manual_seed(0)
    base = nn.Linear(64, 48, bias=bias).requires_grad_(False)
    layer = LoRALinear(base, r=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    params = [layer.lora_A.weight, layer.lora_B.weight]
    x = torch.randn(3, 5, 64, requires_grad=True)
    eager = layer(x)
    want = torch.autograd.grad(eager.sum(), (x, *params))
    compiled, seen = _compiled(layer, x)
    got = torch.autograd.grad(compiled.sum(), (x, *params))
    assert not any("addmm" in t for t in seen["ops"]), seen["ops"]
    assert "lightning_qlora.low_rank_plus_matmul.default" in seen["ops"], seen["ops"]
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_the_in_place_sum_op_is_registered_soundly():
    """``torch.library.opcheck``: schema, fake tensor (shapes, strides, dtype), autograd registration, and AOT
    dispatch with dynamic shapes, on the shapes a LoRA layer gives it (forward and input gradient)."""
    from lightning_qlora.lora import low_rank_plus_matmul

    g = torch.Generator().manual_seed(0)
    low, up = torch.randn(12, 4, generator=g), torch.randn(4, 48, generator=g)
    x, w = torch.randn(12, 64, generator=g), torch.randn(64, 48, generator=g)
    torch.library.opcheck(low_rank_plus_matmul, (low, up, x, w))
    torch.library.opcheck(low_rank_plus_matmul, (low, up, x, torch.randn(48, 64, generator=g).t()))
    torch.testing.assert_close(low_rank_plus_matmul(low, up, x, w), low @ up + x @ w)


@pytest.mark.parametrize("dropout", [False, True], ids=["same-input", "dropout-input"])
def test_the_traced_lora_function_gives_the_exact_gradients(dropout):
    """``_PackedLinearWithLoRA`` against autograd through the same arithmetic, in float64, with the adapter's
    input the layer's own (``xd=None``) or a dropout's output."""
    from lightning_qlora.lora import _PackedLinearWithLoRA

    torch.manual_seed(0)
    base = Linear4bit.from_linear(nn.Linear(64, 48), QuantConfig(compute_dtype=torch.float32, blocksize=32))
    spec, table, packed = base.to("cpu").packed()
    x = torch.randn(3, 5, 64, dtype=torch.float64, requires_grad=True)
    xd = torch.randn(3, 5, 64, dtype=torch.float64, requires_grad=True) if dropout else None
    a = torch.randn(4, 64, dtype=torch.float64, requires_grad=True)
    b = torch.randn(48, 4, dtype=torch.float64, requires_grad=True)
    inputs = (x, a, b) + ((xd,) if dropout else ())
    out = _PackedLinearWithLoRA.apply(x, xd, a, b, 2.0, spec, table, *packed)
    got = torch.autograd.grad(out.square().sum(), inputs)
    w = dequantize(base.weight).double()
    want_out = x @ w.t() + ((x if xd is None else xd) @ a.t()) @ b.t() * 2.0
    want = torch.autograd.grad(want_out.square().sum(), inputs)
    torch.testing.assert_close(out, want_out)
    for g, w_ in zip(got, want, strict=True):
        torch.testing.assert_close(g, w_)


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


def _train(compiled: bool, quantized: bool = True, steps: int = 3, **config: int) -> list[float]:
    """Losses of a few steps; compiled, the blocks must compile whole (a graph break runs code eagerly)."""
    from torch._dynamo.utils import counters

    model = tiny_qlora_llama(quantized, **config)
    if compiled:
        torch._dynamo.reset()
        counters.clear()
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
    if compiled:
        assert not counters["graph_break"], dict(counters["graph_break"])
    return losses


@pytest.mark.slow
@pytest.mark.parametrize(
    "quantized, intermediate",
    [(True, 128), (True, 160), (False, 128)],
    ids=["4bit", "4bit-nested-block-cut-short", "16bit"],
)
def test_compiled_blocks_train_like_eager_without_a_graph_break(quantized, intermediate):
    """The 16-bit base once broke every compiled block at each adapted layer (one tensor given twice to an
    autograd function), so its layers ran eagerly between graph pieces, silently. With 160 x 64 weights in
    blocks of 32, the 320 absmax fill one nested block of 256 and part of another: compiled, the nested
    absmax once came out unset past the first block (inductor's indexing by ``arange(n) // 256``), and the
    losses were NaN from the first step."""
    eager = _train(False, quantized, intermediate_size=intermediate)
    compiled = _train(True, quantized, intermediate_size=intermediate)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    assert eager[-1] < eager[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_traced_dequantization_matches_the_cuda_kernels():
    """bitsandbytes' CUDA kernels hard-code their tables: the traced dequantization equals them to the bit
    eagerly, and compiled with inductor's eager numerics. By default Triton contracts the nested absmax's
    ``a * b + c`` into one fused multiply-add, which rounds once where bitsandbytes' two kernels round twice:
    the block's absmax can differ by one unit in the last place, and the value (a code's table value times
    that absmax, rounded again) by two. On an H200: 18 of 4,194,304 float16 values apart, ~0.5% of float32
    ones, by up to 2 units."""
    import torch._inductor.config as inductor_config

    # Inductor versions without the setting (it turns Triton's fp fusion off) check the default compile only.
    eager_numerics_settings = (
        (True, False) if hasattr(inductor_config, "emulate_precision_casts") else (False,)
    )
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}

    for quant_type in ("nf4", "fp4"):
        for double_quant in (True, False):
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                torch.manual_seed(0)
                config = QuantConfig(quant_type=quant_type, double_quant=double_quant, compute_dtype=dtype)
                layer = Linear4bit.from_linear(nn.Linear(4096, 1024), config).cuda()
                spec, table, packed = layer.packed()
                want = dequantize(layer.weight)
                for backward in (False, True):
                    assert torch.equal(dequantize_traced(spec, table, packed, backward=backward), want)
                case = (quant_type, double_quant, dtype)
                for backward in (False, True):
                    for eager_numerics in eager_numerics_settings:
                        torch._dynamo.reset()  # a compile per case, not the cache's eager fallback after 8
                        settings = {"emulate_precision_casts": True} if eager_numerics else {}
                        with inductor_config.patch(settings):
                            got = torch.compile(dequantize_traced, fullgraph=True)(
                                spec, table, packed, backward
                            )
                        if eager_numerics:
                            assert torch.equal(got, want), (case, backward)
                        else:  # same signs, at most two units in the last place apart
                            assert torch.equal(got.sign(), want.sign()), (case, backward)
                            apart = (got.view(bits[dtype]).int() - want.view(bits[dtype]).int()).abs()
                            apart[got == want] = 0  # fp4's -0 code: -0.0 against +0.0 is no difference
                            assert apart.max().item() <= 2, (case, backward, apart.max().item())


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
        # the app's wiring, not transformers' (it differs by release)
        set_activation_checkpointing(model, "full")
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
        # bf16 compute, bitsandbytes' kernel and cuBLAS (eager) vs compiled kernels: close, not bitwise
        assert (got - want).norm() <= 0.02 * want.norm() + 1e-6, name


@pytest.mark.slow
@pytest.mark.parametrize("case", ["whole", "split", "samples", "limit"])
def test_the_app_says_when_its_compiled_blocks_do_not_compile_whole(case, capfd):
    """A graph break inside a compiled block (``split``: a user's hook that forces one) runs the code between
    the pieces eagerly, and a block dynamo gave up on (``limit``: its recompile limit reached before the
    training step, as a forward with a KV cache through the blocks did) runs eagerly whole: after the first
    step the module says so in one line, and stays quiet otherwise. ``samples``: the app's samples before
    training are generated eagerly (with a KV cache every layer and length was a graph of its own: on the
    4-layer default they filled the limit and training ran uncompiled) and compile nothing."""
    import lightning as L
    from tiny import TINY

    from lightning_qlora.anatomy import decoder_layers
    from lightning_qlora.callbacks import SampleGeneration
    from lightning_qlora.data import build_byte_tokenizer
    from lightning_qlora.module import CausalLMModule

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    plugin = QLoRAPrecision(quant=QuantConfig(compute_dtype="float32", blocksize=32), lora=LoRAConfig(r=4))
    config = {"model_type": "llama", **TINY, "vocab_size": 272}  # the byte tokenizer's 262 ids fit
    module = CausalLMModule(from_config=config, compile=True)
    with plugin.module_init_context():
        module.configure_model()
    if case == "split":
        decoder_layers(module.model)[0].mlp.register_forward_pre_hook(lambda *_: torch._dynamo.graph_break())
    graphs_before_training = []

    class BeforeTraining(L.Callback):
        def on_train_start(self, trainer, pl_module):  # after the samples (the callbacks run in order)
            graphs_before_training.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
            if case == "limit":  # the blocks compiled once (the first block's graph) and no more
                torch._dynamo.config.recompile_limit = 1

    samples = SampleGeneration(build_byte_tokenizer(), ["Hi", "A longer prompt"], max_new_tokens=6)
    ids = torch.randint(0, 272, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    limit = torch._dynamo.config.recompile_limit
    try:
        trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, plugins=[plugin],
                            callbacks=[samples, BeforeTraining()] if case == "samples" else [BeforeTraining()])  # fmt: skip
        trainer.fit(module, torch.utils.data.DataLoader([batch], batch_size=None))
    finally:
        torch._dynamo.config.recompile_limit = limit
    assert module.model._blocks_compiled
    err = capfd.readouterr().err.splitlines()
    broke = [line for line in err if "torch.compile broke its graphs" in line]
    gave_up = [line for line in err if "torch.compile gave up" in line]
    assert len(broke) == (1 if case == "split" else 0), broke
    assert len(gave_up) == (1 if case == "limit" else 0), gave_up
    for line in broke + gave_up:
        assert line.startswith("lightning-qlora: warning:") and "model.compile=false" in line
    if case == "limit":
        assert "recompile limit" in gave_up[0] and "force_eager" in gave_up[0], gave_up[0]
    if case == "samples":
        assert len(samples.before) == 2 and all(isinstance(text, str) for text in samples.before)
        assert graphs_before_training == [0], "the samples compiled graphs of their own"
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2, "the training step compiled"
