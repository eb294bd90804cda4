"""Adapters in PEFT's format, loading PEFT's adapters, merged export (from a 16-bit or a 4-bit base) - checked
against real peft and transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
from lightning_qlora.checkpoint4bit import read_4bit_checkpoint
from lightning_qlora.checkpoint4bit_write import write_random_4bit_checkpoint
from lightning_qlora.export import export_merged, load_model
from lightning_qlora.export import main as export_main
from lightning_qlora.lora import lora_layers
from lightning_qlora.quantize import quantize_checkpoint

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


# ---- merged export from a 4-bit base (a lightning-qlora-quantize output or a ...-bnb-4bit repo)


@pytest.fixture(scope="module")
def base4(base_dir, tmp_path_factory) -> str:
    """``base_dir`` quantized by lightning-qlora-quantize with the adapter's settings (nf4, float32 compute)."""
    out = tmp_path_factory.mktemp("base4") / "nf4"
    quantize_checkpoint(base_dir, out, FP32, progress=False)
    return str(out)


def tensors_in(directory) -> dict[str, torch.Tensor]:
    """Every tensor of a saved model, read back from its safetensors shards."""
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def test_merged_export_from_a_4bit_base_is_the_16bit_base_export_and_loads_in_plain_transformers(
    trained, base_dir, base4, tokens, tmp_path, capsys
):
    """The 4-bit base holds the bytes training quantized, so its export is the 16-bit base's export bit for bit,
    in float32 and in bfloat16. Plain transformers computes our adapted model's logits from it: fp32 to 1e-5
    (only the order of the sum differs: W + B @ A * s vs x @ W + (x @ A) @ B * s; measured ~2e-7), bf16 within
    the rounding of the merged weights (3e-2, as for the 16-bit base)."""
    _, _, directory = trained
    ours4 = logits(load_model(base4, directory), tokens)
    assert torch.equal(ours4, logits(load_model(base_dir, directory), tokens))
    for dtype, flag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        out = tmp_path / flag
        args = ["--base", base4, "--adapter", directory, "--out", str(out), "--dtype", flag]
        assert export_main([*args, "--max-shard-size", "100KB", "--no-progress"]) == 0
        said = capsys.readouterr().out
        assert "the 4-bit base (nf4) dequantized, the adapter added (W + B @ A * scaling)" in said
        assert (
            len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").exists()
        )
        assert {"tokenizer.json", "generation_config.json"} <= {p.name for p in out.iterdir()}
        config = json.load(open(out / "config.json"))
        assert "quantization_config" not in config and config["dtype"] == str(dtype).removeprefix("torch.")
        from_16bit = export_merged(base_dir, directory, tmp_path / f"{flag}-16", dtype=flag)
        mine, reference = tensors_in(out), tensors_in(from_16bit)
        assert mine.keys() == reference.keys() and all(torch.equal(mine[k], reference[k]) for k in mine)
        plain = transformers.AutoModelForCausalLM.from_pretrained(out)
        assert plain.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(logits(plain, tokens), ours4, atol=tol, rtol=0 if tol > 1e-5 else tol)


def test_merged_export_from_a_4bit_base_can_be_requantized(
    trained, base_dir, base4, tokens, tmp_path, capsys
):
    """--quantize: the merged float32 weights quantized again with the base's settings; the very bytes
    lightning-qlora-quantize makes from the merged 16-bit export, and those the 16-bit base's --quantize
    export makes. transformers loads it as a 4-bit model computing what ours computes (exactly, train mode);
    against the adapted model it is one more 4-bit rounding away (measured 5e-2 on logits up to 0.7; 0.2
    asserted)."""
    _, _, directory = trained
    out = tmp_path / "requantized"
    args = ["--base", base4, "--adapter", directory, "--out", str(out), "--dtype", "fp32", "--quantize"]
    assert export_main([*args, "--no-progress"]) == 0
    assert "then re-quantized to nf4 (lossy: a second 4-bit rounding)" in capsys.readouterr().out
    config = json.load(open(out / "config.json"))["quantization_config"]
    assert config["bnb_4bit_quant_type"] == "nf4" and config["llm_int8_skip_modules"] == ["lm_head"]
    assert read_4bit_checkpoint(out).layers.keys() == read_4bit_checkpoint(base4).layers.keys()

    merged = export_merged(base4, directory, tmp_path / "merged32", dtype="fp32")
    quantize_checkpoint(merged, tmp_path / "quantized", FP32, progress=False)
    from_16bit = export_merged(base_dir, directory, tmp_path / "from16", dtype="fp32", quantize=True)
    mine = tensors_in(out)
    for other in (tensors_in(tmp_path / "quantized"), tensors_in(from_16bit)):
        assert mine.keys() == other.keys() and all(torch.equal(mine[k], other[k]) for k in mine)

    ours = logits(load_model(out), tokens)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu").train()
    assert torch.equal(logits(theirs, tokens), ours)
    adapted = logits(load_model(base4, directory), tokens)
    assert not torch.equal(ours, adapted)
    torch.testing.assert_close(ours, adapted, atol=0.2, rtol=0)


_PEAK = """
import json, sys, threading
import psutil, torch, transformers.models.llama.modeling_llama
from lightning_qlora.export import main
from lightning_qlora.nf4 import QuantConfig, quantize_tensor
from lightning_qlora.nf4_matmul import dequantize
dequantize(quantize_tensor(torch.randn(256, 256), QuantConfig(), "cpu"))  # first-call setup, not data
process = psutil.Process()
start = peak = process.memory_info().rss
done = threading.Event()
def sample():
    global peak
    while not done.wait(0.001):
        peak = max(peak, process.memory_info().rss)
thread = threading.Thread(target=sample, daemon=True)
thread.start()
rc = main(sys.argv[1:] + ["--no-progress"])
done.set()
thread.join()
print(json.dumps({"rc": rc, "growth": peak - start}))
"""


def random_adapter(directory: Path, config: transformers.PretrainedConfig, r: int = 8) -> int:
    """A PEFT-format adapter with random A and B on every projection; returns its bytes."""
    from safetensors.torch import save_file

    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, layer in skeleton.named_modules():
        if name.endswith("_proj"):
            key = f"base_model.model.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, layer.in_features, generator=generator) / 100
            tensors[f"{key}.lora_B.weight"] = torch.randn(layer.out_features, r, generator=generator) / 100
    directory.mkdir()
    save_file(tensors, str(directory / ADAPTER_WEIGHTS))
    config_json = {"peft_type": "LORA", "r": r, "lora_alpha": 16, "target_modules": ["q_proj"]}
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config_json))
    return sum(t.numel() * 4 for t in tensors.values())


@pytest.mark.slow
def test_merged_export_from_a_4bit_base_holds_a_layer_and_a_shard_not_the_model(tmp_path):
    """Host memory of the export of an 8-layer, 1024-wide Llama (0.16 GB in bf16, 0.32 GB dequantized to
    float32), sampled with psutil every millisecond in a fresh process. Measured: 41 MB above the idle process,
    the same within 6 MB as for a 2-layer model: the adapter (4 MB), one 4 MB output shard held and
    serialized, and one layer (the largest is 8 MB in float32) dequantized, its update and its 16-bit copies.
    Bound: the adapter, three shards and five times the largest layer, under half the bf16 model.

    glibc's adaptive mmap threshold is pinned: otherwise it keeps freed layer-sized blocks in the heap and the
    same run peaks anywhere from 45 to 92 MB (measured), which is the allocator's caching, not what the export
    holds."""
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=1024,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
    )
    base = write_random_4bit_checkpoint(
        config, tmp_path / "base", quant=FP32, max_shard_size="16MB", progress=False
    )
    adapter_bytes = random_adapter(tmp_path / "adapter", config)
    shard, largest = 4 * 2**20, 2048 * 1024 * 4
    run = subprocess.run(
        [sys.executable, "-c", _PEAK, "--base", str(base), "--adapter", str(tmp_path / "adapter")]
        + ["--out", str(tmp_path / "merged"), "--max-shard-size", str(shard)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"},
    )
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["rc"] == 0, run.stderr
    model_bf16 = sum(t.numel() * 2 for t in tensors_in(tmp_path / "merged").values())
    assert model_bf16 > 160 * 10**6
    assert result["growth"] < adapter_bytes + 3 * shard + 5 * largest < model_bf16 / 2, result


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
