"""The 4-bit layer against bitsandbytes itself: storage, forward, backward, bad settings."""

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch
from torch import nn

from lightning_qlora import Linear4bit, QuantConfig
from lightning_qlora.nf4 import quantize_linears, weight_bytes_by_dtype

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _quantized_layer(in_f, out_f, config, bias=True, device="cpu", seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(in_f, out_f, bias=bias)
    layer = Linear4bit.from_linear(linear, config).to(device)
    return linear, layer


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [32, 64, 128])
def test_weight_is_params4bit_with_the_configured_format(quant_type, double_quant, blocksize):
    config = QuantConfig(quant_type=quant_type, double_quant=double_quant, blocksize=blocksize)
    _, layer = _quantized_layer(128, 48, config)
    w = layer.weight
    assert isinstance(w, bnb.nn.Params4bit) and w.bnb_quantized
    assert w.dtype == torch.uint8 and w.numel() == 128 * 48 // 2
    assert w.quant_state.quant_type == quant_type
    assert w.quant_state.blocksize == blocksize
    assert w.quant_state.nested is double_quant
    assert w.quant_state.dtype == torch.bfloat16
    assert not w.requires_grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_equals_bitsandbytes_dequantized_matmul(device, dtype):
    config = QuantConfig(compute_dtype=dtype)
    _, layer = _quantized_layer(256, 96, config, device=device)
    x = torch.randn(2, 5, 256, dtype=dtype, device=device)
    reference = x @ bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state).t() + layer.bias
    torch.testing.assert_close(layer(x), reference, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("shape", [(64, 32), (128, 256), (320, 192)])
def test_input_gradient_equals_autograd_through_the_dequantized_weight(device, dtype, tol, shape):
    in_f, out_f = shape
    _, layer = _quantized_layer(in_f, out_f, QuantConfig(compute_dtype=dtype, blocksize=32), device=device)
    weight = bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state).detach()
    x = torch.randn(3, 7, in_f, dtype=dtype, device=device, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    grad = torch.randn(3, 7, out_f, dtype=dtype, device=device)
    layer(x).backward(grad)
    (x_ref @ weight.t() + layer.bias).backward(grad)
    rel = (x.grad.float() - x_ref.grad.float()).norm() / x_ref.grad.float().norm()
    assert rel < tol
    assert layer.weight.grad is None


def test_weights_quantize_when_moved_to_a_device_not_before():
    linear = nn.Linear(64, 64)
    layer = Linear4bit.from_linear(linear, QuantConfig())
    assert not layer.quantized and layer.weight.dtype == torch.bfloat16
    layer.to("cpu")
    assert layer.quantized and layer.weight.dtype == torch.uint8


@pytest.mark.parametrize("storage", ["uint8", "bfloat16"])
def test_dtype_casts_leave_the_packed_codes_alone(storage):
    # bfloat16 storage (for FSDP) holds packed bytes in a float tensor: a cast would scramble them.
    _, layer = _quantized_layer(64, 32, QuantConfig(quant_storage=storage))
    before = bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state).clone()
    layer.half()
    layer.to(torch.float32)
    assert (
        isinstance(layer.weight, bnb.nn.Params4bit)
        and layer.weight.dtype == QuantConfig(quant_storage=storage).quant_storage
    )
    assert torch.equal(bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state), before)
    assert layer.bias.dtype == torch.float32, "the cast still applies to everything else"


def test_quantize_linears_skips_the_head_and_counts_bytes():
    model = nn.Sequential()
    model.add_module("up", nn.Linear(128, 256))
    model.add_module("down", nn.Linear(256, 128))
    model.add_module("lm_head", nn.Linear(128, 512, bias=False))
    names = quantize_linears(model, QuantConfig())
    assert names == ["up", "down"]
    assert isinstance(model.lm_head, nn.Linear)
    model.to("cpu")
    sizes = weight_bytes_by_dtype(model)
    # 4.127 bits per weight at block 64 with double quant (absmax 8-bit + fp32 per 256 blocks)
    bits = 8 * sizes["nf4"] / (2 * 128 * 256)
    assert 4.0 < bits < 4.2


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"quant_type": "int4"}, "quant.quant_type='int4' is not supported; use one of ('nf4', 'fp4')"),
        ({"blocksize": 16}, "quant.blocksize=16 is not supported by bitsandbytes"),
        ({"blocksize": 100}, "use one of (32, 64, 128, 256, 512, 1024, 2048, 4096)"),
        ({"compute_dtype": "float99"}, "quant.compute_dtype='float99' is not a dtype"),
        ({"quant_storage": "int32"}, "quant.quant_storage='int32' is not a dtype"),
    ],
)
def test_bad_quant_settings_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        QuantConfig(**kwargs)


def test_block_larger_than_a_layers_input_is_refused():
    # bitsandbytes 0.50.2 on CPU returns wrong values for such a layer: it must never be quantized.
    model = nn.Sequential(nn.Linear(128, 64), nn.Linear(64, 32))
    with pytest.raises(
        ValueError, match=r"quant.blocksize=256 is larger than the input width \(128\) of layer '0'"
    ):
        quantize_linears(model, QuantConfig(blocksize=256))
    assert isinstance(model[0], nn.Linear), "nothing is converted when one layer is refused"


def test_a_16bit_weight_loaded_into_a_quantized_layer_is_quantized_again():
    """Quantize-on-load replaces the weight: the old quantization state must not survive it (it made the
    layer look quantized with a 16-bit weight, and its forward fail)."""
    torch.manual_seed(0)
    config = QuantConfig(compute_dtype=torch.float32)
    layer = Linear4bit.from_linear(torch.nn.Linear(128, 64, bias=False), config).quantize_("cpu")
    new = torch.randn(64, 128)
    layer.load_state_dict({"weight": new})
    x = torch.randn(3, 128)
    out = layer(x)  # quantizes the new weight where it lies
    assert layer.quantized and layer.weight.dtype == torch.uint8
    reference = Linear4bit.from_linear(torch.nn.Linear(128, 64, bias=False), config)
    reference.load_state_dict({"weight": new})
    assert torch.equal(out, reference(x))
