"""QLoRAPrecision inside real Lightning Trainer runs, on the user's own LightningModules."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import lightning as L
import pytest
import torch
import transformers
from ddp_worker import ConfigureModelLM
from tiny import save_tiny_llama
from torch import nn
from torch.utils.data import DataLoader

from lightning_qlora import LoRAConfig, LoRALinear, QLoRAPrecision, QuantConfig
from lightning_qlora.nf4 import DeferredLinear, Linear4bit

VOCAB = 96
FP32 = QuantConfig(compute_dtype=torch.float32, blocksize=32)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    """A tiny random Llama saved with save_pretrained: the real loading path for every test."""
    path = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_llama(path, vocab_size=VOCAB, max_position_embeddings=64)
    return str(path)


class CausalLM(L.LightningModule):
    """What a user already has: an HF model, `self.parameters()` given to the optimizer."""

    def __init__(self, path: str, lr: float = 3e-3):
        super().__init__()
        self.model = transformers.AutoModelForCausalLM.from_pretrained(path)
        self.lr = lr
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch, labels=batch).loss
        self.losses.append(loss.item())
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class MLP(L.LightningModule):
    """A plain PyTorch model with nn.Linear layers and no HF anywhere."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1))
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x).squeeze(-1).float(), y.float())
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def token_loader(n_batches: int = 4, batch_size: int = 4, seq: int = 24) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    # a learnable pattern: each row counts up from a random start
    starts = torch.randint(0, VOCAB, (n_batches * batch_size, 1), generator=g)
    data = (starts + torch.arange(seq)) % VOCAB
    return DataLoader(data, batch_size=batch_size)


def trainer(tmp_path=None, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def test_hf_model_trains_only_adapters_and_loss_falls(llama_dir):
    model = CausalLM(llama_dir, lr=1e-2)
    plugin = QLoRAPrecision(quant=FP32, lora=LoRAConfig(r=4, alpha=8))
    trainer(plugins=[plugin], max_steps=16, max_epochs=-1).fit(model, token_loader())
    before = {n: p.data.clone() for n, p in model.named_parameters() if isinstance(p, bnb.nn.Params4bit)}
    assert len(before) == 2 * 7, "q,k,v,o,gate,up,down in both layers are 4-bit"
    assert sum(model.losses[-3:]) / 3 < sum(model.losses[:3]) / 3 - 0.3
    trainer(plugins=[plugin], max_steps=3).fit(model, token_loader())
    for name, param in model.named_parameters():
        if name in before:
            assert torch.equal(param.data, before[name]), f"{name} changed in training"


def test_adapters_are_the_only_trainable_parameters_and_count_r_in_plus_out(llama_dir):
    model = CausalLM(llama_dir)
    plugin = QLoRAPrecision(quant=FP32, lora=LoRAConfig(r=4))
    plugin.convert_module(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 14
    expected = sum(4 * (m.in_features + m.out_features) for m in layers)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert isinstance(model.model.lm_head, nn.Linear), "the output head stays 16-bit"
    assert model.model.model.embed_tokens.weight.dtype == torch.float32 == plugin.dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_zero_reproduces_the_quantized_base_exactly(llama_dir, dtype):
    ids = torch.randint(0, VOCAB, (2, 16))
    config = QuantConfig(compute_dtype=dtype, blocksize=32)
    base = transformers.AutoModelForCausalLM.from_pretrained(llama_dir)
    from lightning_qlora.nf4 import quantize_linears

    quantize_linears(base, config)
    for param in base.parameters():  # buffers (rotary frequencies) keep their fp32, as in the plugin
        param.data = param.data.to(dtype)
    base.to("cpu")
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir)
    QLoRAPrecision(quant=config, lora=LoRAConfig(r=8)).convert_module(model).to("cpu")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)


def test_a_plain_pytorch_model_trains(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g)
    y = x[:, :4].sum(-1)
    loader = DataLoader(list(zip(x, y, strict=True)), batch_size=16)
    torch.manual_seed(0)
    model = MLP()
    plugin = QLoRAPrecision(quant=FP32, lora=LoRAConfig(r=4, alpha=16, target_modules=["net.0", "net.2"]))
    trainer(plugins=[plugin], max_epochs=8).fit(model, loader)
    assert isinstance(model.net[0].base_layer, Linear4bit)
    assert isinstance(model.net[4], Linear4bit), "layers without adapters are quantized and frozen too"
    assert model.losses[-1] < model.losses[0]


def test_sixteen_bit_lora_is_the_same_plugin_without_quantization(llama_dir):
    model = CausalLM(llama_dir)
    plugin = QLoRAPrecision(quant=None, lora=LoRAConfig(r=4), compute_dtype="float32")
    trainer(plugins=[plugin], max_steps=6).fit(model, token_loader())
    q_proj = model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer) is nn.Linear and not q_proj.base_layer.weight.requires_grad
    assert not any(isinstance(p, bnb.nn.Params4bit) for p in model.parameters())
    assert plugin.precision == "16bit-lora-float32" and QLoRAPrecision().precision == "nf4-lora-bfloat16"
    assert model.losses[-1] < model.losses[0]


class RecordLosses(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


def test_resume_from_checkpoint_reproduces_the_uninterrupted_run(llama_dir, tmp_path):
    plugin_args = dict(quant=FP32, lora=LoRAConfig(r=4, alpha=8))
    full = RecordLosses()
    torch.manual_seed(0)
    trainer(tmp_path / "full", plugins=[QLoRAPrecision(**plugin_args)], callbacks=[full], max_epochs=4).fit(
        CausalLM(llama_dir), token_loader(n_batches=3)
    )

    first = RecordLosses()
    ckpt_dir = tmp_path / "ckpt"
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_last=True)
    torch.manual_seed(0)
    trainer(
        tmp_path / "part",
        plugins=[QLoRAPrecision(**plugin_args)],
        callbacks=[first, checkpoint],
        max_epochs=2,
        enable_checkpointing=True,
    ).fit(CausalLM(llama_dir), token_loader(n_batches=3))
    ckpt = ckpt_dir / "last.ckpt"

    second = RecordLosses()
    resumed = trainer(
        tmp_path / "resume", plugins=[QLoRAPrecision(**plugin_args)], callbacks=[second], max_epochs=4
    )
    with resumed.init_module():  # a new process rebuilds the 4-bit base from its source like this
        fresh = CausalLM(llama_dir)
    resumed.fit(fresh, token_loader(n_batches=3), ckpt_path=ckpt)
    assert len(first.losses) == 6 and len(second.losses) == 6
    torch.testing.assert_close(first.losses + second.losses, full.losses, rtol=1e-5, atol=1e-6)

    saved = torch.load(ckpt, weights_only=False)
    assert all(".lora_A." in k or ".lora_B." in k for k in saved["state_dict"])
    assert (
        saved["QLoRAPrecision"]["lora"]["r"] == 4 and saved["QLoRAPrecision"]["quant"]["quant_type"] == "nf4"
    )
    full_bytes = sum(os.path.getsize(os.path.join(llama_dir, f)) for f in os.listdir(llama_dir))
    print(
        f"checkpoint {os.path.getsize(ckpt) / 1e3:.0f} kB (adapters + AdamW state) vs model {full_bytes / 1e3:.0f} kB"
    )
    assert len(saved["state_dict"]) == 2 * 14


def test_resume_with_other_lora_settings_is_refused(llama_dir, tmp_path):
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(
        tmp_path,
        plugins=[QLoRAPrecision(quant=FP32, lora=LoRAConfig(r=4))],
        callbacks=[checkpoint],
        max_steps=1,
        enable_checkpointing=True,
    ).fit(CausalLM(llama_dir), token_loader(1))
    other = trainer(tmp_path, plugins=[QLoRAPrecision(quant=FP32, lora=LoRAConfig(r=8))], max_steps=2)
    with other.init_module():
        model = ConfigureModelLM(llama_dir)
    with pytest.raises(ValueError, match=r"lora.r: checkpoint 4, plugin 8"):
        other.fit(model, token_loader(1), ckpt_path=tmp_path / "last.ckpt")


class EmptyInitMLP(MLP):
    pass


def test_empty_init_builds_on_meta_and_quantizes_while_loading():
    torch.manual_seed(0)
    reference = MLP()
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    plugin = QLoRAPrecision(quant=FP32, lora=LoRAConfig(r=4))
    t = trainer(plugins=[plugin], max_steps=1)
    with t.init_module(empty_init=True):
        model = EmptyInitMLP()
    first = model.net[0].base_layer  # converted as soon as it was built
    assert isinstance(first, Linear4bit) and first.weight.device.type == "meta"
    assert not any(p.device.type == "cpu" for p in first.parameters()), "no 16-bit weight allocated"
    for layer in (model.net[0], model.net[2], model.net[4]):  # adapters are initialised, not left empty
        assert torch.all(layer.lora_B.weight == 0)
        assert 0 < layer.lora_A.weight.abs().max() <= 1 / layer.in_features**0.5
    model.load_state_dict(state)  # a plain 16-bit state dict: quantized layer by layer as it loads
    assert isinstance(first.weight, bnb.nn.Params4bit) and first.weight.bnb_quantized
    assert first.weight.device.type == "cpu"
    # The same weights converted the ordinary way give the same function.
    QLoRAPrecision(quant=FP32, lora=LoRAConfig(r=4)).convert_module(reference).to("cpu")
    model.net[0].lora_A.weight.data.copy_(reference.net[0].lora_A.weight)
    x = torch.randn(5, 32)
    with torch.no_grad():
        assert torch.equal(model.net(x), reference.net(x))
    assert torch.nn.Linear is nn.modules.linear.Linear and torch.nn.Linear is not DeferredLinear


def test_init_module_without_empty_init_keeps_16bit_weights_off_the_accelerator():
    plugin = QLoRAPrecision(quant=FP32)
    with trainer(plugins=[plugin]).init_module():
        model = MLP()
    layer = model.net[0].base_layer
    assert isinstance(layer, Linear4bit) and not layer.quantized
    assert layer.weight.device.type == "cpu" and layer.weight.abs().sum() > 0  # initialised, staged on host


def test_configure_model_is_converted(llama_dir):
    model = ConfigureModelLM(llama_dir)
    trainer(plugins=[QLoRAPrecision(quant=FP32)], max_steps=2).fit(model, token_loader(1))
    assert isinstance(model.model.model.layers[1].mlp.down_proj.base_layer, Linear4bit)


class NoLinear(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 3)


@pytest.mark.parametrize(
    "make_plugin,make_model,message",
    [
        (
            lambda: QLoRAPrecision(lora=LoRAConfig(target_modules=["query", "value"])),
            MLP,
            r"lora.target_modules=\['query', 'value'\] matches no linear layer of MLP",
        ),
        (lambda: QLoRAPrecision(lora=LoRAConfig(target_modules="net\\.9")), MLP, "matches no linear layer"),
        (
            lambda: QLoRAPrecision(lora=LoRAConfig(target_modules="net[")),
            MLP,
            "is not a valid regular expression",
        ),
        (lambda: QLoRAPrecision(), NoLinear, "NoLinear has no nn.Linear layers"),
        (
            lambda: QLoRAPrecision(quant=QuantConfig(blocksize=64)),
            MLP,
            r"quant.blocksize=64 is larger than the input width \(32\) of layer 'net.0'",
        ),
    ],
)
def test_bad_settings_fail_at_conversion_with_one_message(make_plugin, make_model, message):
    with pytest.raises(ValueError, match=message):
        make_plugin().convert_module(make_model())


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"r": 0}, r"lora.r=0 must be a positive integer"),
        ({"r": -4}, r"lora.r=-4 must be a positive integer"),
        ({"dropout": 1.0}, r"lora.dropout=1.0 must be in \[0, 1\)"),
        ({"target_modules": []}, "lora.target_modules is empty"),
    ],
)
def test_bad_lora_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRAConfig(**kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fit_quantizes_on_the_gpu_and_trains(llama_dir):
    seen = {}

    class Where(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            weight = pl_module.model.model.layers[0].self_attn.q_proj.base_layer.weight
            seen.update(
                device=weight.device.type, state=weight.quant_state.absmax.device.type, q=weight.bnb_quantized
            )

    model = CausalLM(llama_dir, lr=1e-2)
    plugin = QLoRAPrecision(quant=QuantConfig(), lora=LoRAConfig(r=8))
    trainer(plugins=[plugin], accelerator="cuda", max_steps=16, callbacks=[Where()]).fit(
        model, token_loader()
    )
    assert seen == {"device": "cuda", "state": "cuda", "q": True}
    assert sum(model.losses[-3:]) < sum(model.losses[:3])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_empty_init_never_holds_the_16bit_model_on_the_gpu():
    hidden = 2048
    torch.manual_seed(0)
    layers = [nn.Linear(hidden, hidden, bias=False) for _ in range(8)]
    state = {f"net.{i}.weight": layer.weight.data.to(torch.bfloat16) for i, layer in enumerate(layers)}
    del layers

    class Big(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(*[nn.Linear(hidden, hidden, bias=False) for _ in range(8)])

    plugin = QLoRAPrecision(quant=QuantConfig(), lora=LoRAConfig(r=8))
    t = trainer(plugins=[plugin], accelerator="cuda")
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with t.init_module(empty_init=True):
        model = Big()
    model.load_state_dict(state)
    peak = torch.cuda.max_memory_allocated() - base
    one_layer = hidden * hidden * 2
    bases = [m.base_layer for m in model.net]
    four_bit_total = sum(b.weight.numel() * 4.2 / 8 * 2 for b in bases)  # numel of packed data is already / 2
    assert peak <= four_bit_total + 2 * one_layer, (peak, four_bit_total, one_layer)
    assert all(b.weight.device.type == "cuda" and b.weight.bnb_quantized for b in bases)


@pytest.mark.slow
def test_ddp_on_cpu_keeps_the_adapters_of_both_ranks_identical(llama_dir):
    worker = Path(__file__).with_name("ddp_worker.py")
    proc = subprocess.run(
        [sys.executable, str(worker), llama_dir], capture_output=True, text=True, timeout=300
    )
    sums = dict(line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("RANK "))
    assert set(sums) == {"0", "1"}, proc.stderr[-2000:]
    assert sums["0"] == sums["1"] and float(sums["0"]) > 0, (
        "gradients were all-reduced and the adapters trained"
    )
