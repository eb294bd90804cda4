"""Adapters in PEFT's format, loading PEFT's adapters, merged 16-bit export - checked against real peft."""

from __future__ import annotations

import json

import lightning as L
import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from tiny import save_tiny_llama
from torch.utils.data import DataLoader

from lightning_qlora import LoRAConfig, QLoRAPrecision, QuantConfig
from lightning_qlora.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    load_adapter,
    merge_adapter,
    save_adapter,
)
from lightning_qlora.callbacks import AdapterCheckpoint
from lightning_qlora.export import export_merged, load_model
from lightning_qlora.export import main as export_main
from lightning_qlora.lora import lora_layers

VOCAB = 272  # the byte tokenizer's 262 ids fit
# float32 compute everywhere logits are compared tightly: the only difference left is the arithmetic order.
FP32 = QuantConfig(compute_dtype=torch.float32)  # nf4, double quant, blocksize 64 = transformers' defaults
BNB = dict(
    load_in_4bit=True,
    bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True,
    bnb_4bit_compute_dtype=torch.float32,
)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> str:
    """A tiny random Llama + byte tokenizer, saved with save_pretrained."""
    path = tmp_path_factory.mktemp("base")
    save_tiny_llama(path, tokenizer=True, vocab_size=VOCAB, max_position_embeddings=64)
    return str(path)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def converted(base_dir: str, r: int = 4, alpha: float = 8, targets="all-linear", quant=FP32, **lora):
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    plugin = QLoRAPrecision(quant=quant, lora=LoRAConfig(r=r, alpha=alpha, target_modules=targets, **lora))
    plugin.convert_module(model)
    return model.to("cpu"), plugin


def train_steps(model, tokens, steps: int = 5) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(input_ids=tokens, labels=tokens).loss.backward()
        opt.step()
        opt.zero_grad()


@torch.no_grad()
def logits(model, tokens) -> torch.Tensor:
    return model(input_ids=tokens).logits.float()


def bnb_base(base_dir: str):
    """transformers' own 4-bit loading path (bitsandbytes on CPU), as a PEFT user would build it."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        base_dir,
        quantization_config=transformers.BitsAndBytesConfig(**BNB),
        device_map="cpu",
        dtype=torch.float32,
    )


def adapter_checksum(model) -> list[torch.Tensor]:
    return [t.detach().clone() for layer in lora_layers(model).values() for t in layer.state_dict().values()]


@pytest.fixture(scope="module")
def trained(base_dir, tokens, tmp_path_factory):
    """A plugin-trained adapter (B != 0) on q/v/o only, its logits, and its saved directory."""
    model, plugin = converted(base_dir, targets=["q_proj", "v_proj", "o_proj"], use_rslora=True, r=4, alpha=6)
    train_steps(model, tokens)
    model.eval()
    assert all(layer.lora_B.weight.abs().sum() > 0 for layer in lora_layers(model).values())
    directory = tmp_path_factory.mktemp("adapter")
    save_adapter(model, directory, precision=plugin)
    return model, logits(model, tokens), str(directory)


def test_saved_adapter_is_peft_format(trained, base_dir):
    _, _, directory = trained
    cfg = json.load(open(f"{directory}/{ADAPTER_CONFIG}"))
    assert (
        cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 6 and cfg["use_rslora"] is True
    )
    assert cfg["target_modules"] == ["o_proj", "q_proj", "v_proj"]
    assert cfg["base_model_name_or_path"] == base_dir
    keys = load_file(f"{directory}/{ADAPTER_WEIGHTS}")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert len(keys) == 2 * 3 * 2  # A and B, three projections, two layers
    assert peft.LoraConfig.from_pretrained(directory).use_rslora


def test_peft_loads_our_adapter_onto_the_same_4bit_base(trained, base_dir, tokens):
    """Tolerance 1e-5: both quantize the same fp32 weights with bitsandbytes (packed bytes identical)
    and run fp32 matmuls. In train mode, because in eval mode bitsandbytes' own Linear4bit repacks
    weights for an AVX512-BF16 CPU kernel that computes in bf16 (measured ~2e-3 on logits ~1); with
    dropout 0 train mode computes the same function."""
    model, ours, directory = trained
    peft_model = peft.PeftModel.from_pretrained(bnb_base(base_dir), directory)
    ref = peft_model.base_model.model.model.layers[1].self_attn.k_proj.weight
    assert torch.equal(ref.data, model.model.layers[1].self_attn.k_proj.weight.data)
    peft_model.train()
    torch.testing.assert_close(logits(peft_model, tokens), ours, atol=1e-5, rtol=1e-5)
    peft_model.eval()  # bitsandbytes' bf16 CPU inference kernel
    torch.testing.assert_close(logits(peft_model, tokens), ours, atol=3e-2, rtol=0)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_load_adapter_reads_a_peft_adapter(base_dir, tokens, tmp_path, use_rslora):
    """PEFT's adapter on q/v (random A and B, alpha 16 vs our 8) into our all-linear model: the file's
    scaling wins and the layers it does not cover contribute nothing. Tolerance 1e-5 (fp32, see above)."""
    torch.manual_seed(2)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=False,
        use_rslora=use_rslora,
    )
    peft_model = peft.get_peft_model(bnb_base(base_dir), config)
    peft_model.save_pretrained(tmp_path)
    peft_model.train()
    expected = logits(peft_model, tokens)

    model, _ = converted(base_dir, r=4, alpha=8)
    train_steps(model, tokens, steps=1)  # non-zero adapters everywhere, to be replaced or zeroed
    loaded = load_adapter(model, tmp_path)
    assert len(loaded) == 4 and all(n.endswith(("q_proj", "v_proj")) for n in loaded)
    torch.testing.assert_close(logits(model, tokens), expected, atol=1e-5, rtol=1e-5)


def test_round_trip_through_load_model(trained, base_dir, tokens):
    _, ours, directory = trained
    model = load_model(base_dir, directory)  # quantization rebuilt from qlora_config.json
    torch.testing.assert_close(logits(model, tokens), ours, atol=1e-6, rtol=1e-6)


def test_merged_export_loads_in_plain_transformers(trained, base_dir, tokens, tmp_path):
    """fp32 export = dequantized base + B @ A * scale to 1e-5; the bf16 export within bf16 rounding
    of the weights (measured ~5e-3 on logits of magnitude ~1; asserted 3e-2)."""
    _, ours, directory = trained
    out32 = export_merged(base_dir, directory, tmp_path / "fp32", dtype="fp32")
    plain = transformers.AutoModelForCausalLM.from_pretrained(out32)
    torch.testing.assert_close(logits(plain, tokens), ours, atol=1e-5, rtol=1e-5)

    assert (
        export_main(
            [
                "--base",
                base_dir,
                "--adapter",
                directory,
                "--out",
                str(tmp_path / "bf16"),
                "--max-shard-size",
                "100KB",
            ]
        )
        == 0
    )
    out = tmp_path / "bf16"
    config = json.load(open(out / "config.json"))
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").exists()
    assert (out / "tokenizer.json").exists()
    plain = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert plain.dtype == torch.bfloat16
    assert all(type(m) is not peft.tuners.lora.Linear for m in plain.modules())
    torch.testing.assert_close(logits(plain, tokens), ours, atol=3e-2, rtol=0)


def test_merge_adapter_dequantizes_every_layer_and_restores_the_state_dict(base_dir, tokens):
    model, _ = converted(base_dir, targets=["q_proj"])  # k/v/o/mlp stay 4-bit without adapters
    train_steps(model, tokens, steps=2)
    model.eval()
    before = logits(model, tokens)
    merge_adapter(model)
    assert not lora_layers(model)
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))
    assert "model.layers.0.mlp.up_proj.weight" in model.state_dict()  # adapters-only hook removed
    torch.testing.assert_close(logits(model, tokens), before, atol=1e-5, rtol=1e-5)


def test_lightning_module_wrapper_and_adapter_checkpoint_callback(base_dir, tmp_path):
    class CausalLM(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    data = DataLoader(torch.randint(0, VOCAB, (8, 12)), batch_size=4)
    module = CausalLM()
    trainer = L.Trainer(
        plugins=[QLoRAPrecision(quant=FP32, lora=LoRAConfig(r=2, target_modules=["q_proj"]))],
        max_steps=2,
        callbacks=[AdapterCheckpoint(tmp_path / "adapters")],
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, data)
    final = tmp_path / "adapters" / "final"
    assert (tmp_path / "adapters" / "step-2").is_dir()
    keys = load_file(final / ADAPTER_WEIGHTS)  # keyed relative to the HF model, as PEFT expects
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight" in keys
    assert json.load(open(final / "qlora_config.json"))["lora"]["r"] == 2
    assert peft.LoraConfig.from_pretrained(final).target_modules == {"q_proj"}


# ---- bad input: a clear message, and the model unchanged ----


def _write_peft(tmp_path, base_dir, **config):
    torch.manual_seed(3)
    model = peft.get_peft_model(
        transformers.AutoModelForCausalLM.from_pretrained(base_dir),
        peft.LoraConfig(init_lora_weights=False, **config),
    )
    model.save_pretrained(tmp_path)
    return tmp_path


def _rename_keys(directory, old: str, new: str) -> None:
    weights = load_file(directory / ADAPTER_WEIGHTS)
    save_file({k.replace(old, new): v for k, v in weights.items()}, directory / ADAPTER_WEIGHTS)


def _edit_config(directory, **changes) -> None:
    cfg = json.load(open(directory / ADAPTER_CONFIG))
    cfg.update(changes)
    (directory / ADAPTER_CONFIG).write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda d, b: _write_peft(d, b, r=8, target_modules=["q_proj"]),
            "rank mismatch at 'base_model.model.model",
        ),
        (
            lambda d, b: (
                _write_peft(d, b, r=4, target_modules=["gate_proj", "q_proj"]),
                _rename_keys(d, "gate_proj", "foo_proj"),
            ),
            "'model.layers.0.mlp.foo_proj', which is not a LoRA layer",
        ),
        (lambda d, b: _write_peft(d, b, r=4, target_modules=["gate_proj"]), "which is not a LoRA layer"),
        (lambda d, b: None, "has no adapter_config.json"),
        (lambda d, b: (d / ADAPTER_CONFIG).write_text("{'r': 4,"), "is not valid JSON"),
        (
            lambda d, b: (_write_peft(d, b, r=4, target_modules=["q_proj"]), _edit_config(d, r="four")),
            "has r='four'",
        ),
        (
            lambda d, b: (
                _write_peft(d, b, r=4, target_modules=["q_proj"]),
                _edit_config(d, rank_pattern={"q_proj": 8}),
            ),
            "rank_pattern",
        ),
        (
            lambda d, b: (_write_peft(d, b, r=4, target_modules=["q_proj"]), (d / ADAPTER_WEIGHTS).unlink()),
            "no adapter_model.safetensors",
        ),
        (
            lambda d, b: (
                _write_peft(d, b, r=4, target_modules=["q_proj"]),
                (d / ADAPTER_WEIGHTS).write_bytes(b"junk"),
            ),
            "cannot read its weights",
        ),
    ],
    ids=[
        "rank",
        "unknown-layer",
        "not-adapted-here",
        "empty-dir",
        "bad-json",
        "bad-r",
        "rank-pattern",
        "no-weights",
        "bad-weights",
    ],
)
def test_bad_adapters_are_refused_and_load_nothing(base_dir, tokens, tmp_path, make, message):
    model, _ = converted(base_dir, r=4, targets=["q_proj", "v_proj"])
    train_steps(model, tokens, steps=1)
    before = adapter_checksum(model)
    scalings = [layer.scaling for layer in lora_layers(model).values()]
    make(tmp_path, base_dir)
    with pytest.raises(ValueError, match=message) as err:
        load_adapter(model, tmp_path)
    assert str(tmp_path) in str(err.value)
    after = adapter_checksum(model)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert scalings == [layer.scaling for layer in lora_layers(model).values()]


def test_an_unconverted_model_is_told_how_to_prepare(trained, base_dir):
    plain = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    with pytest.raises(ValueError, match="has no LoRA layers. Convert it first"):
        load_adapter(plain, trained[2])


def test_export_of_a_missing_adapter_fails_with_a_message(base_dir, tmp_path, capsys):
    assert (
        export_main(["--base", base_dir, "--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_export_merges_layer_by_layer_and_matches_the_cpu_export(trained, base_dir, tmp_path):
    """Seen on an H100: extra peak GPU memory ~one layer; weights within 1 bf16 ulp of the CPU export."""
    _, _, directory = trained
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    gpu = export_merged(base_dir, directory, tmp_path / "gpu", dtype="bf16", device="cuda")
    assert torch.cuda.max_memory_allocated() - start < 2**20  # a layer of the tiny model, not the model
    cpu = export_merged(base_dir, directory, tmp_path / "cpu", dtype="bf16", device="cpu")
    a = transformers.AutoModelForCausalLM.from_pretrained(gpu).state_dict()
    b = transformers.AutoModelForCausalLM.from_pretrained(cpu).state_dict()
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), atol=2e-3, rtol=1e-2)
