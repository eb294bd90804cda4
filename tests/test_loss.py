"""The chunked, fused cross-entropy against torch's own, value and gradient."""

import pytest
import torch
import torch.nn.functional as F

from lightning_qlora.loss import linear_cross_entropy


def reference(hidden, weight, labels):
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("chunk", [7, 64, 4096])
def test_value_and_gradient_match_cross_entropy(dtype, tol, chunk):
    torch.manual_seed(0)
    hidden = torch.randn(3, 33, 48, dtype=dtype, requires_grad=True)
    weight = torch.randn(301, 48, dtype=dtype) * 0.2
    labels = torch.randint(0, 301, (3, 33))
    labels[0, :10] = -100  # a masked prompt
    ours = linear_cross_entropy(hidden, weight, labels, chunk_tokens=chunk)
    (grad_ours,) = torch.autograd.grad(ours * 3.0, hidden)
    ref = reference(hidden, weight, labels)
    (grad_ref,) = torch.autograd.grad(ref * 3.0, hidden)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)
    rel = (grad_ours.float() - grad_ref.float()).norm() / grad_ref.float().norm()
    assert rel < tol


def test_all_labels_ignored_gives_zero_not_nan():
    hidden = torch.randn(1, 5, 8, requires_grad=True)
    loss = linear_cross_entropy(hidden, torch.randn(11, 8), torch.full((1, 5), -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(hidden.grad == 0)


def test_a_trainable_head_is_refused():
    with pytest.raises(ValueError, match="needs a frozen output head"):
        linear_cross_entropy(
            torch.randn(1, 4, 8), torch.randn(10, 8, requires_grad=True), torch.zeros(1, 4, dtype=torch.long)
        )


def test_the_shipped_module_under_the_plugin_takes_the_chunked_path():
    """Built under the plugin's init context the head is a ``DeferredLinear``: it must still take the
    chunked path (an exact type test once sent it to full fp32 logits: 3x the memory on a 1B model)."""
    from tiny import TINY

    from lightning_qlora import LoRAConfig, QLoRAPrecision, QuantConfig
    from lightning_qlora.module import CausalLMModule

    module = CausalLMModule(from_config={"model_type": "llama", **TINY})
    plugin = QLoRAPrecision(quant=QuantConfig(compute_dtype="float32"), lora=LoRAConfig())
    with plugin.module_init_context():
        module.configure_model()
    head_calls = []
    module.model.lm_head.register_forward_hook(lambda *args: head_calls.append(1))
    ids = torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    loss, n = module._loss({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    loss.backward()
    assert n == 2 * 15 and head_calls == []  # the head's full logits were never computed
    logits = module.model(input_ids=ids).logits[:, :-1].float()
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
