"""Bitsandbytes 4-bit checkpoints in transformers' format, both ways, against real transformers and PEFT.

transformers 5 quantizes to 4-bit on a CPU with bitsandbytes' CPU backend, so every file here is
written by the real library (or by ours and read back by it). Logits are compared in train mode:
in eval mode bitsandbytes' own Linear4bit repacks its weights for an AVX512-BF16 CPU kernel on
hosts that have one, which computes differently; with dropout 0 both modes compute one function.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import peft
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from tiny import save_tiny_llama, tiny_llama_config
from torch.utils.data import DataLoader

from lightning_qlora import CausalLMModule, LoRAConfig, QLoRAPrecision, QuantConfig
from lightning_qlora.adapters import save_adapter
from lightning_qlora.checkpoint4bit import read_4bit_checkpoint
from lightning_qlora.checkpoint4bit_check import checkpoint_quant, preflight_checkpoint
from lightning_qlora.checkpoint4bit_load import load_pretrained
from lightning_qlora.checkpoint4bit_write import save_4bit_checkpoint, write_random_4bit_checkpoint
from lightning_qlora.data import build_byte_tokenizer
from lightning_qlora.lora import lora_layers
from lightning_qlora.nf4 import Linear4bit, named_linears
from lightning_qlora.nf4_matmul import dequantize

VOCAB = 272  # the byte tokenizer's 262 ids fit
BIN = Path(sys.executable).parent


def bnb_config(dtype: torch.dtype = torch.float32, **overrides) -> transformers.BitsAndBytesConfig:
    settings = dict(bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    return transformers.BitsAndBytesConfig(load_in_4bit=True, **{**settings, **overrides})


def hf_4bit(path, **kwargs) -> transformers.PreTrainedModel:
    """transformers' own 4-bit model (bitsandbytes on CPU), in train mode (see the module docstring)."""
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu", **kwargs).train()


def plugin(dtype: torch.dtype = torch.float32, **quant) -> QLoRAPrecision:
    return QLoRAPrecision(quant=QuantConfig(compute_dtype=dtype, **quant), lora=LoRAConfig(r=4, alpha=8))


def ours(path, precision: QLoRAPrecision, **kwargs) -> torch.nn.Module:
    with precision.module_init_context():
        return load_pretrained(path, plugin=precision, progress=False, **kwargs).train()


@torch.no_grad()
def logits(model, tokens) -> torch.Tensor:
    return model(input_ids=tokens).logits


def packed_in_file(directory) -> dict[str, torch.Tensor]:
    """Every quantized layer's packed bytes, as the checkpoint holds them."""
    ckpt = read_4bit_checkpoint(directory)
    out = {}
    for layer, keys in ckpt.layers.items():
        with safe_open(str(ckpt.tensors[keys[0]].file), framework="pt") as f:
            out[layer] = f.get_tensor(layer + ".weight")
    return out


def packed_in_model(model) -> dict[str, torch.Tensor]:
    return {
        n.replace(".base_layer", ""): m.weight.data.view(torch.uint8).reshape(-1, 1)
        for n, m in named_linears(model)
        if isinstance(m, Linear4bit)
    }


def same_bytes(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """The same layers quantized, to the same packed bytes."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def base16(tmp_path_factory) -> Path:
    """A tiny random Llama in float32 with the byte tokenizer, sharded (40 KB) like a large model."""
    path = tmp_path_factory.mktemp("base16")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_llama_config(vocab_size=VOCAB))
    model.save_pretrained(path, max_shard_size="40KB")
    build_byte_tokenizer().save_pretrained(path)
    return path


def write_hub_4bit(tmp_path_factory, dtype: torch.dtype, tied: bool) -> Path:
    """What a ``...-bnb-4bit`` hub repo is: transformers' save_pretrained of its own 4-bit model."""
    src = tmp_path_factory.mktemp("src16")
    save_tiny_llama(src, vocab_size=VOCAB, tie_word_embeddings=tied)
    path = tmp_path_factory.mktemp("hub4bit")
    hf_4bit(src, quantization_config=bnb_config(dtype), dtype=dtype).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hub4bit(tmp_path_factory) -> Path:
    """float32 weights and compute, untied head."""
    return write_hub_4bit(tmp_path_factory, torch.float32, tied=False)


@pytest.fixture(scope="module")
def hub4bit_bf16_tied(tmp_path_factory) -> Path:
    """bfloat16 weights and compute, head tied to the embeddings (as Llama 3.2 1B)."""
    return write_hub_4bit(tmp_path_factory, torch.bfloat16, tied=True)


@pytest.mark.parametrize("which", ["fp32", "bf16-tied"])
def test_transformers_4bit_checkpoint_loads_as_it_is_and_computes_what_transformers_computes(
    request, tokens, which
):
    """Exact equality, measured max |diff| = 0 in float32 and bfloat16: the same packed bytes, the same
    quant state (the double-quant offset is kept in float32, not rounded to the init context's dtype),
    the same bitsandbytes dequantization and the same matmul; LoRA B = 0 adds exact zeros."""
    path = request.getfixturevalue("hub4bit" if which == "fp32" else "hub4bit_bf16_tied")
    dtype = torch.float32 if which == "fp32" else torch.bfloat16
    model = ours(path, plugin(dtype))
    file = packed_in_file(path)
    assert len(file) == 14  # 7 projections x 2 layers; the head stays 16-bit
    assert same_bytes(packed_in_model(model), file)
    assert all(isinstance(layer.base_layer, Linear4bit) for layer in lora_layers(model).values())
    expected = logits(hf_4bit(path), tokens)
    got = logits(model, tokens)
    assert got.dtype == dtype
    assert torch.equal(got, expected)
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight


def trainer(precision: QLoRAPrecision, steps: int = 3) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        plugins=[precision],
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


@pytest.mark.parametrize("which", ["fp32", "bf16-tied"])
def test_causal_lm_module_loads_a_4bit_checkpoint_in_a_trainer_and_trains(request, tokens, which):
    """The real path: CausalLMModule(name_or_path=4-bit dir) under QLoRAPrecision in a Lightning Trainer."""
    path = request.getfixturevalue("hub4bit" if which == "fp32" else "hub4bit_bf16_tied")
    dtype = torch.float32 if which == "fp32" else torch.bfloat16
    module = CausalLMModule(name_or_path=str(path), compile=False)
    run = trainer(plugin(dtype))
    predicted = run.predict(module, DataLoader(list(tokens), batch_size=2))
    assert same_bytes(packed_in_model(module.model), packed_in_file(path))
    assert torch.equal(predicted[0].logits, logits(hf_4bit(path), tokens))
    batches = DataLoader([{"input_ids": t, "labels": t} for t in tokens.repeat(3, 1)], batch_size=2)
    run.fit(module, batches)
    assert all(layer.lora_B.weight.abs().sum() > 0 for layer in lora_layers(module.model).values())
    assert same_bytes(packed_in_model(module.model), packed_in_file(path))  # the base stays frozen


def test_causal_lm_module_refuses_settings_that_contradict_the_checkpoint(hub4bit):
    module = CausalLMModule(name_or_path=str(hub4bit), compile=False)
    with pytest.raises(ValueError, match=r"quant.quant_type: checkpoint nf4, plugin fp4"):
        trainer(plugin(quant_type="fp4")).predict(module, DataLoader([torch.zeros(4, dtype=torch.long)]))


@pytest.mark.parametrize(
    ("quant", "message"),
    [
        (dict(quant_type="fp4"), "quant.quant_type: checkpoint nf4, plugin fp4"),
        (dict(blocksize=32), "set quant.blocksize=64"),
        (dict(double_quant=False), "set quant.double_quant=true"),
        (dict(skip_modules=["lm_head", "down_proj"]), "quant.skip_modules=[lm_head]"),
        (dict(skip_modules=[]), "16-bit in the checkpoint, quantized by quant.skip_modules: ['lm_head']"),
        (dict(enabled=False), "quant=none asks for 16-bit base weights"),
    ],
)
def test_settings_that_contradict_the_checkpoint_are_refused_in_one_line(hub4bit, quant, message):
    """At load, and in a preflight that reads no weights (the same message)."""
    path = hub4bit
    with pytest.raises(ValueError) as err:
        ours(path, plugin(**quant))
    text = str(err.value)
    assert "\n" not in text and message in text and f"model.name_or_path='{path}'" in text
    with pytest.raises(ValueError) as early:
        preflight_checkpoint(path, plugin(**quant).quant)
    assert str(early.value) == text


def test_checkpoint_quant_gives_the_settings_that_match_it(hub4bit, base16, tokens, tmp_path):
    """What export or generation would build their plugin with; a skip list unlike ours round-trips too."""
    assert checkpoint_quant(hub4bit).to_dict() == plugin().quant.to_dict()
    model = ours(base16, plugin(quant_type="fp4", skip_modules=["lm_head", "down_proj"]))
    out = save_4bit_checkpoint(model, tmp_path / "odd")
    quant = checkpoint_quant(out)
    assert quant.quant_type == "fp4" and quant.skip_modules == ["down_proj", "lm_head"]
    again = ours(out, QLoRAPrecision(quant=quant, lora=LoRAConfig(r=4, alpha=8)))
    assert torch.equal(logits(again, tokens), logits(model, tokens))


def test_preflight_tells_the_kinds_apart_and_refuses_other_quantization_methods(hub4bit, base16, tmp_path):
    assert preflight_checkpoint(hub4bit, plugin().quant) == "bitsandbytes 4-bit"
    assert preflight_checkpoint(base16, plugin().quant) is None
    assert (
        preflight_checkpoint("some-org/some-model", plugin().quant) is None
    )  # a hub id: checked when it loads
    gptq = tmp_path / "gptq"
    gptq.mkdir()
    config = json.loads((base16 / "config.json").read_text())
    (gptq / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq"}}))
    for check in (lambda: preflight_checkpoint(gptq, plugin().quant), lambda: ours(gptq, plugin())):
        with pytest.raises(ValueError, match=r"is quantized with gptq; lightning-qlora trains from a 16-bit"):
            check()


def test_quant_storage_of_the_plugin_reinterprets_the_same_bytes(hub4bit, tokens):
    """FSDP wants packed weights in the compute dtype: the file's uint8 bytes, viewed, compute the same."""
    path = hub4bit
    model = ours(path, plugin(quant_storage="float32"))
    weight = model.model.layers[0].mlp.down_proj.base_layer.weight
    assert weight.dtype == torch.float32
    assert same_bytes(packed_in_model(model), packed_in_file(path))
    assert torch.equal(logits(model, tokens), logits(hf_4bit(path), tokens))


@pytest.mark.parametrize(
    "quant",
    [dict(), dict(quant_type="fp4", blocksize=32, double_quant=False)],
    ids=["nf4-64-double", "fp4-32-single"],
)
def test_our_written_base_loads_in_transformers_and_peft_puts_our_adapter_on_it(
    base16, tokens, tmp_path, quant
):
    """Base: exact (same bytes, same arithmetic; transformers reads the block size from each quant state).
    With the adapter: 1e-5, as in test_adapters: PEFT adds base and adapter in another order."""
    precision = plugin(**quant)
    model = ours(base16, precision)
    base_logits = logits(model, tokens)
    out = save_4bit_checkpoint(model, tmp_path / "base4", max_shard_size="40KB")
    assert (out / "model.safetensors.index.json").is_file()  # sharded like the source
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["bnb_4bit_quant_type"] == precision.quant.quant_type and qc["llm_int8_skip_modules"] == [
        "lm_head"
    ]
    assert qc["bnb_4bit_use_double_quant"] == precision.quant.double_quant
    theirs = hf_4bit(out)
    assert same_bytes(packed_in_model(model), packed_in_file(out))
    assert isinstance(theirs.model.layers[0].self_attn.q_proj, __import__("bitsandbytes").nn.Linear4bit)
    assert torch.equal(logits(theirs, tokens), base_logits)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(input_ids=tokens, labels=tokens).loss.backward()
        opt.step()
        opt.zero_grad()
    save_adapter(model, tmp_path / "adapter", precision=precision)
    peft_model = peft.PeftModel.from_pretrained(theirs, tmp_path / "adapter").train()
    expected = logits(model, tokens)
    assert not torch.allclose(expected, base_logits, atol=1e-3)  # the adapter matters
    torch.testing.assert_close(logits(peft_model, tokens), expected, atol=1e-5, rtol=1e-5)


def test_written_checkpoint_round_trips_through_our_loader(base16, tokens, tmp_path):
    model = ours(base16, plugin(torch.bfloat16))
    out = save_4bit_checkpoint(model, tmp_path / "base4")
    again = ours(out, plugin(torch.bfloat16))
    assert same_bytes(packed_in_model(again), packed_in_model(model))
    assert torch.equal(logits(again, tokens), logits(model, tokens))


def test_writing_into_a_non_empty_directory_is_refused_and_leaves_it_alone(base16, tmp_path):
    model = ours(base16, plugin())
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists and is not empty"):
        save_4bit_checkpoint(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_random_4bit_checkpoint_is_written_without_a_16bit_model_and_both_loaders_agree(
    tokens, tmp_path, tied
):
    quant = QuantConfig(compute_dtype=torch.float32)
    config = tiny_llama_config(vocab_size=VOCAB, tie_word_embeddings=tied, initializer_range=0.05)
    out = write_random_4bit_checkpoint(config, tmp_path / "rnd", quant=quant, seed=3, max_shard_size="20KB")
    ckpt = read_4bit_checkpoint(out)
    assert len(ckpt.layers) == 14 and len(ckpt.files) > 3
    assert ("lm_head.weight" in ckpt.tensors) is not tied
    theirs = hf_4bit(out)
    model = ours(out, plugin())
    assert torch.equal(logits(theirs, tokens), logits(model, tokens))
    # Initialised as transformers initialises this architecture: normal(0, initializer_range), norms at one.
    weight = dequantize(model.model.layers[1].mlp.down_proj.base_layer.weight)
    assert 0.04 < weight.std() < 0.06
    assert 0.04 < model.model.embed_tokens.weight.std() < 0.06
    assert torch.equal(model.model.norm.weight, torch.ones(64))
    again = write_random_4bit_checkpoint(config, tmp_path / "rnd2", quant=quant, seed=3, progress=False)
    assert same_bytes(packed_in_file(again), packed_in_file(out))  # seeded


# ------------------------------------------------------------------------------------------- the CLI


def test_quantize_cli_writes_a_checkpoint_shard_by_shard_that_both_loaders_read(base16, tokens, tmp_path):
    """The installed console script, as a user runs it."""
    out = tmp_path / "q4"
    run = subprocess.run(
        [str(BIN / "lightning-qlora-quantize"), "--model", str(base16), "--out", str(out)]
        + ["--compute-dtype", "float32", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "14 linear layers quantized" in run.stdout and "peak host memory" in run.stdout
    assert "layers 14/14" in run.stderr  # the progress bar: bytes and layers
    shards_in = json.loads((base16 / "model.safetensors.index.json").read_text())["weight_map"].values()
    shards_out = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values()
    assert len(set(shards_out)) == len(set(shards_in)) > 3  # one output shard per input shard
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
    # The bytes training makes from the 16-bit checkpoint (quantize-on-load), written down.
    trained_from_16bit = ours(base16, plugin()).to("cpu")
    assert same_bytes(packed_in_model(trained_from_16bit), packed_in_file(out))
    assert torch.equal(logits(ours(out, plugin()), tokens), logits(hf_4bit(out), tokens))


def bad_input(kind: str, tmp: Path, base: Path) -> list[str]:
    """The arguments of one bad invocation, with whatever it needs made under ``tmp``."""
    if kind == "missing":
        return ["--model", str(tmp / "missing"), "--out", str(tmp / "out")]
    if kind == "not-a-model":
        (tmp / "notes").mkdir()
        (tmp / "notes" / "readme.txt").write_text("not a model")
        return ["--model", str(tmp / "notes"), "--out", str(tmp / "out")]
    if kind == "no-weights":
        (tmp / "cfg").mkdir()
        (tmp / "cfg" / "config.json").write_text((base / "config.json").read_text())
        return ["--model", str(tmp / "cfg"), "--out", str(tmp / "out")]
    if kind == "already-4bit":
        hf_4bit(base, quantization_config=bnb_config()).save_pretrained(tmp / "hub4")
        return ["--model", str(tmp / "hub4"), "--out", str(tmp / "out")]
    if kind == "unwritable":  # under a file: not even root can create it
        (tmp / "file").write_text("x")
        return ["--model", str(base), "--out", str(tmp / "file" / "out")]
    if kind == "not-empty":
        (tmp / "full").mkdir()
        (tmp / "full" / "x").write_text("x")
        return ["--model", str(base), "--out", str(tmp / "full")]
    assert kind == "blocksize"
    return ["--model", str(base), "--out", str(tmp / "out"), "--blocksize", "128"]


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "--model='{tmp}/missing' is not a directory"),
        ("not-a-model", "--model='{tmp}/notes' has no config.json"),
        ("no-weights", "has no model.safetensors or model.safetensors.index.json"),
        ("already-4bit", "is already quantized (bitsandbytes 4-bit"),
        ("unwritable", "--out='{tmp}/file/out' cannot be written"),
        ("not-empty", "--out='{tmp}/full' already exists and is not empty"),
        ("blocksize", "--blocksize=128 is larger than the input width (64)"),
    ],
)
def test_quantize_cli_refuses_bad_input_in_one_line_with_exit_2(base16, tmp_path, capsys, kind, message):
    """main() in this process (the console script is ``sys.exit(main())``): one line, exit 2, nothing written."""
    from lightning_qlora.quantize import main

    args = bad_input(kind, tmp_path, base16)
    before = sorted(tmp_path.rglob("*"))
    capsys.readouterr()
    assert main([*args, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lightning-qlora-quantize: error: "), err
    assert message.format(tmp=tmp_path) in err[0]
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, no staging directory left


# ------------------------------------------------------ generate and export from a 4-bit base: bad input


@pytest.fixture(scope="module")
def adapter16(base16, tokens, tmp_path_factory) -> Path:
    """An adapter trained (nf4, float32 compute, all linear layers) on base16, as a run saves it."""
    precision = plugin()
    model = ours(base16, precision)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(input_ids=tokens, labels=tokens).loss.backward()
        opt.step()
        opt.zero_grad()
    return save_adapter(model, tmp_path_factory.mktemp("adapter16"), precision=precision)


def quantized(src: Path, out: Path, **quant) -> Path:
    from lightning_qlora.quantize import quantize_checkpoint

    quantize_checkpoint(src, out, QuantConfig(compute_dtype=torch.float32, **quant), progress=False)
    return out


def drop_tensor(directory: Path, key: str) -> None:
    """Rewrites the shard holding ``key`` (and the index) without it: a checkpoint that lost one entry."""
    from safetensors.torch import load_file

    index_file = directory / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = directory / index["weight_map"].pop(key)
    tensors = load_file(shard)
    del tensors[key]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index_file.write_text(json.dumps(index))


def bad_base(kind: str, tmp: Path, base16: Path, adapter: Path) -> tuple[Path, Path, list[str]]:
    """A bad 4-bit base (or adapter, or option) for generate/export: (base, adapter, extra args)."""
    layer = "model.layers.0.mlp.up_proj.weight"
    if kind == "other-format":
        return quantized(base16, tmp / "fp4", quant_type="fp4"), adapter, []
    if kind == "trained-16bit":
        shutil.copytree(adapter, tmp / "a16")
        saved = json.loads((tmp / "a16" / "qlora_config.json").read_text())
        (tmp / "a16" / "qlora_config.json").write_text(json.dumps({**saved, "quant": None}))
        return quantized(base16, tmp / "q4"), tmp / "a16", []
    if kind in ("other-shapes", "fewer-layers"):
        change = {"intermediate_size": 256} if kind == "other-shapes" else {"num_hidden_layers": 1}
        save_tiny_llama(tmp / "other16", vocab_size=VOCAB, **change)
        return quantized(tmp / "other16", tmp / "other4"), adapter, []
    if kind in ("no-quant-state", "no-absmax"):
        q4 = quantized(base16, tmp / "q4")
        drop_tensor(q4, layer + (".quant_state.bitsandbytes__nf4" if kind == "no-quant-state" else ".absmax"))
        return q4, adapter, []
    if kind == "gptq":
        shutil.copytree(base16, tmp / "gptq")
        config = json.loads((base16 / "config.json").read_text())
        (tmp / "gptq" / "config.json").write_text(
            json.dumps({**config, "quantization_config": {"quant_method": "gptq"}})
        )
        return tmp / "gptq", adapter, []
    if kind == "missing":
        return tmp / "missing", adapter, []
    q4 = quantized(base16, tmp / "q4")
    return q4, adapter, {"quant-none": ["--quant", "none"], "quant-fp4": ["--quant", "fp4"]}[kind]


BAD_BASES = {
    "other-format": "adapter '{adapter}' was trained on a base quantized otherwise (quant_type nf4 vs fp4, training "
    "vs checkpoint; its qlora_config.json) but {flag}='{base}' is a 4-bit checkpoint (fp4, blocksize 64, double "
    "quant on); give the 4-bit checkpoint it was trained on or its 16-bit base",
    "trained-16bit": "adapter '{adapter}' was trained on a 16-bit base (its qlora_config.json says quant none) but "
    "{flag}='{base}' is a 4-bit checkpoint (nf4,",
    "other-shapes": "adapter '{adapter}' does not fit {flag}='{base}': model.layers.0.mlp.down_proj is (64, 256) "
    "there, the adapter's lora_B @ lora_A is (64, 128); give the base model the adapter was trained on (its "
    "adapter_config.json names '{base16}')",
    "fewer-layers": "adapter '{adapter}' adapts model.layers.1.mlp.down_proj, which {flag}='{base}' has no "
    "weight for; give the base model the adapter was trained on",
    "no-quant-state": "{flag}='{base}' is incomplete: 4-bit layer model.layers.0.mlp.up_proj has ['absmax', "
    "'nested_absmax', 'nested_quant_map', 'quant_map'] but no model.layers.0.mlp.up_proj.weight.quant_state."
    "bitsandbytes__<type> entry (the quant state that says how to read them); re-save it",
    "no-absmax": "{flag}='{base}' is incomplete: 4-bit layer model.layers.0.mlp.up_proj lacks "
    "['model.layers.0.mlp.up_proj.weight.absmax']; re-save it (save_pretrained of the transformers 4-bit model) or "
    "make it again with lightning-qlora-quantize from the 16-bit model",
    "gptq": "{flag}='{base}' is quantized with gptq; give its 16-bit model or a bitsandbytes 4-bit checkpoint",
    "missing": "{flag}='{base}' does not exist",
    "quant-none": "{flag}='{base}' is a 4-bit checkpoint (nf4, blocksize 64, double quant on), but quant=none asks "
    "for a 16-bit base; drop it",
    "quant-fp4": "{flag}='{base}' is a 4-bit checkpoint (nf4, blocksize 64, double quant on), so quant=fp4 cannot "
    "apply; use quant=nf4 or auto",
}


@pytest.mark.parametrize("cli", ["generate", "export"])
@pytest.mark.parametrize("kind", list(BAD_BASES))
def test_generate_and_export_refuse_a_bad_4bit_base_in_one_line_with_exit_2(
    base16, adapter16, tmp_path, capsys, cli, kind
):
    """main() in this process (each console script is ``sys.exit(main())``); for export, nothing is written."""
    from lightning_qlora.export import main as export_main
    from lightning_qlora.generate import main as generate_main

    base, adapter, extra = bad_base(kind, tmp_path, base16, adapter16)
    if cli == "generate":
        flag, main = "--model", generate_main
        args = ["--model", str(base), "--adapter", str(adapter), "--prompt", "Hi", "--tokenizer", "byte"]
        args += ["--max-new-tokens", "2", "--device", "cpu", *extra]
    else:
        flag, main = "--base", export_main
        args = ["--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "out"), *extra]
    capsys.readouterr()
    assert main([*args, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"lightning-qlora-{cli}: error: "), err
    assert BAD_BASES[kind].format(flag=flag, base=base, adapter=adapter, base16=base16) in err[0]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_a_bad_4bit_base_is_refused_for_training_too(base16, tmp_path):
    """The same completeness checks guard training's loader and its preflight (they read no weights)."""
    q4 = quantized(base16, tmp_path / "q4")
    drop_tensor(q4, "model.layers.1.self_attn.k_proj.weight.nested_absmax")
    message = (
        r"is incomplete: 4-bit layer model.layers.1.self_attn.k_proj lacks \[.*k_proj.weight.nested_absmax'\]"
    )
    for check in (lambda: preflight_checkpoint(q4, plugin().quant), lambda: ours(q4, plugin())):
        with pytest.raises(ValueError, match=message):
            check()


def test_naming_the_4bit_base_type_applies_an_adapter_trained_on_another_format(
    base16, adapter16, tmp_path, capsys
):
    """The way out the refusal names: the adapter then runs on the checkpoint as it is."""
    from lightning_qlora.generate import main

    fp4 = quantized(base16, tmp_path / "fp4", quant_type="fp4")
    args = ["--model", str(fp4), "--adapter", str(adapter16), "--prompt", "Hi", "--tokenizer", "byte"]
    assert main([*args, "--max-new-tokens", "2", "--device", "cpu", "--greedy", "--quant", "fp4"]) == 0
    assert capsys.readouterr().out.strip()


def _write_16bit(path: Path, layers: int, shard_bytes: int) -> int:
    """A float32 Llama checkpoint (1024 wide, FFN 2048) written tensor by tensor into shards; returns its bytes."""
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=1024,
        intermediate_size=2048,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
    )
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(config)
    path.mkdir()
    config.save_pretrained(path)
    shards, current, size, total = [], {}, 0, 0
    gen = torch.Generator().manual_seed(0)
    for name, param in skeleton.named_parameters():
        if current and size + param.numel() * 4 > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = torch.randn(param.shape, generator=gen) * 0.02
        size += param.numel() * 4
        total += param.numel() * 4
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


_PEAK = """
import json, sys
import bitsandbytes.functional as F, torch, transformers.models.llama.modeling_llama
from lightning_qlora.host_memory import host_peak_rss
from lightning_qlora.quantize import main
F.quantize_4bit(torch.randn(256, 256, dtype=torch.bfloat16), quant_type="nf4")  # first-call setup, not data
base = host_peak_rss()
rc = main(sys.argv[1:] + ["--no-progress", "--device", "cpu"])
print(json.dumps({"rc": rc, "base": base, "growth": host_peak_rss() - base}))
"""


@pytest.mark.slow
def test_quantize_cli_host_memory_is_bounded_by_a_shard_and_a_layer_not_the_model(tmp_path):
    """Measured on a 2-core CPU host: peak RSS 53-54 MiB above the idle process for both a 2-layer (82 MiB)
    and an 8-layer (322 MiB) float32 checkpoint in 20 MiB shards: one mapped shard, the largest weight
    (8 MiB) with bitsandbytes' float32 temporaries while it quantizes it on the CPU, one output shard.
    Bound: the shard plus 12 times the largest weight, under half the larger model.

    glibc's adaptive mmap threshold is pinned, as in test_adapters' export test: left adaptive, freed
    weight-sized blocks stay in the heap and the same runs measured 76-102 MiB, the 8-layer one up to 26 MiB
    above the 2-layer one (a failure of the second bound that says nothing about the tool)."""
    shard = 20 * 2**20
    growth = {}
    for layers in (2, 8):
        total = _write_16bit(tmp_path / f"m{layers}", layers, shard)
        run = subprocess.run(
            [
                sys.executable,
                "-c",
                _PEAK,
                "--model",
                str(tmp_path / f"m{layers}"),
                "--out",
                str(tmp_path / f"q{layers}"),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"},
        )
        result = json.loads(run.stdout.strip().splitlines()[-1])
        assert result["rc"] == 0, run.stderr
        growth[layers] = (result["growth"], total)
    largest = 2048 * 1024 * 4
    (small, _), (big, big_total) = growth[2], growth[8]
    assert big < shard + 12 * largest < big_total / 2, growth
    assert abs(big - small) < 24 * 2**20, growth  # four times the model, the same peak


class PeakRSS:
    """Samples this process's resident memory every few milliseconds while the block runs.

    Sampling, not the kernel's high-water mark: that one cannot be reset on every kernel (gVisor), and
    a loader that held the model would hold it for the whole load, which sampling sees.
    """

    def __enter__(self) -> PeakRSS:
        import threading

        import psutil

        self.process, self.start, self.peak = psutil.Process(), 0, 0
        self.start = self.peak = self.process.memory_info().rss
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.done.wait(0.002):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        self.growth = self.peak - self.start


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_loader_puts_the_packed_bytes_on_the_gpu_and_never_a_16bit_weight(tmp_path):
    """A 0.5B-parameter Llama (2048 wide, 8 layers, 32k vocabulary) written at random on the GPU, then
    loaded onto it: the GPU holds the file's bytes plus the adapters (the 16-bit linear weights would
    add 0.75 GB), the host one shard plus one tensor. Logits against transformers' own 4-bit model on
    the same GPU in float32 (1e-4: the same dequantized weights, matrix products that may pick other
    cuBLAS kernels)."""
    config = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=256,
    )
    quant = QuantConfig(compute_dtype=torch.float32)
    shard = 64 * 2**20
    out = write_random_4bit_checkpoint(
        config, tmp_path / "rnd", device="cuda", quant=quant, max_shard_size=shard, progress=False
    )
    ckpt = read_4bit_checkpoint(out)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    precision = QLoRAPrecision(quant=quant, lora=LoRAConfig(r=16))
    with PeakRSS() as host, torch.device("cuda"), precision.module_init_context():
        model = load_pretrained(out, plugin=precision, progress=False).train()
    peak = torch.cuda.max_memory_allocated() - start
    adapters = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    linears16 = sum(
        m.in_features * m.out_features * 2 for _, m in named_linears(model) if isinstance(m, Linear4bit)
    )
    largest = max(t.nbytes for t in ckpt.tensors.values())
    # 16-bit embeddings and head are stored as float32 here (the compute dtype), so the file is ~0.7 GB.
    assert peak < ckpt.total_bytes + adapters + 32 * 2**20 < ckpt.total_bytes + linears16 / 4, (
        peak,
        linears16,
    )
    assert host.growth < 2 * shard + 2 * largest, host.growth
    assert all(p.device.type == "cuda" for p in model.parameters())
    on_gpu = {k: v.cpu() for k, v in packed_in_model(model).items()}
    assert same_bytes(on_gpu, packed_in_file(out))
    tokens = torch.randint(0, 32000, (2, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(out), device_map="cuda").train()
    torch.testing.assert_close(logits(model, tokens), logits(theirs, tokens), atol=1e-4, rtol=1e-4)
