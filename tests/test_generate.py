"""Generation: the reusable function on a converted 4-bit model, and the console script (16-bit or 4-bit base)."""

from __future__ import annotations

import json

import peft
import pytest
import torch
import transformers
from tiny import save_tiny_llama

from lightning_qlora import LoRAConfig, QLoRAPrecision, QuantConfig
from lightning_qlora.adapters import save_adapter
from lightning_qlora.data import build_byte_tokenizer
from lightning_qlora.export import export_merged, load_model
from lightning_qlora.generate import generate, main, read_prompts
from lightning_qlora.nf4 import Linear4bit, named_linears
from lightning_qlora.quantize import quantize_checkpoint

VOCAB = 272


@torch.no_grad()
def logits(model, tokens) -> torch.Tensor:
    return model(input_ids=tokens).logits


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama + byte tokenizer on disk, a converted model with a trained adapter, and that adapter."""
    base = tmp_path_factory.mktemp("base")
    save_tiny_llama(base, tokenizer=True, vocab_size=VOCAB)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    plugin = QLoRAPrecision(quant=QuantConfig(compute_dtype=torch.float32), lora=LoRAConfig(r=4))
    plugin.convert_module(model)
    tokens = torch.randint(6, VOCAB, (4, 16))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(input_ids=tokens, labels=tokens).loss.backward()
        opt.step()
        opt.zero_grad()
    adapter = tmp_path_factory.mktemp("adapter")
    save_adapter(model, adapter, precision=plugin)
    return str(base), model, str(adapter)


def test_generate_on_a_converted_4bit_model(setup):
    _, model, _ = setup
    tok = build_byte_tokenizer()
    model.train()
    prompts = ["Hello", "A much longer prompt, padded on the left"]
    greedy = generate(model, tok, prompts, max_new_tokens=8, greedy=True)
    assert len(greedy) == 2 and all(isinstance(t, str) and t for t in greedy)
    assert generate(model, tok, prompts, max_new_tokens=8, greedy=True) == greedy
    # Batched = one at a time: left padding does not change a prompt's completion.
    assert generate(model, tok, prompts[1], max_new_tokens=8, greedy=True) == greedy[1:]
    sampled = generate(model, tok, prompts, max_new_tokens=8, seed=1, top_k=20)
    assert generate(model, tok, prompts, max_new_tokens=8, seed=1, top_k=20) == sampled
    assert model.training and tok.padding_side == "right"  # restored
    with pytest.raises(ValueError, match="temperature"):
        generate(model, tok, "x", temperature=0)


def test_cli_with_adapter_matches_the_merged_model(setup, tmp_path, capsys):
    base, _, adapter = setup
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hello"}) + "\n" + json.dumps("Once upon a time") + "\n")
    assert read_prompts(prompts) == ["Hello", "Once upon a time"]
    out = tmp_path / "out.jsonl"
    common = ["--prompts-file", str(prompts), "--max-new-tokens", "6", "--greedy", "--device", "cpu"]
    assert main(["--model", base, "--adapter", adapter, *common, "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["Hello", "Once upon a time"] and all(r["completion"] for r in rows)
    assert "### Hello" in capsys.readouterr().out

    merged = export_merged(base, adapter, tmp_path / "merged", dtype="fp32")
    assert main(["--model", str(merged), *common, "--output", str(tmp_path / "merged.jsonl")]) == 0
    merged_rows = [json.loads(line) for line in (tmp_path / "merged.jsonl").read_text().splitlines()]
    assert merged_rows == rows


def test_cli_single_prompt_chat_and_errors(setup, tmp_path, capsys):
    base, _, adapter = setup
    args = ["--model", base, "--adapter", adapter, "--prompt", "Hi", "--max-new-tokens", "4", "--chat"]
    assert main([*args, "--tokenizer", "byte", "--quant", "nf4"]) == 0
    assert capsys.readouterr().out.strip("\n") != ""
    assert main(["--model", base, "--adapter", str(tmp_path), "--prompt", "Hi"]) == 2
    assert "has no adapter_config.json" in capsys.readouterr().err


# ------------------------------------------------------------------------------- from a 4-bit base


@pytest.fixture(scope="module")
def base4(setup, tmp_path_factory):
    """``setup``'s base as lightning-qlora-quantize writes it, quantized as the adapter was trained (float32)."""
    base, _, _ = setup
    out = tmp_path_factory.mktemp("base4") / "nf4"
    quantize_checkpoint(base, out, QuantConfig(compute_dtype=torch.float32), progress=False)
    return str(out)


@torch.no_grad()
def greedy_ids(model, prompt_ids: torch.Tensor) -> torch.Tensor:
    return model.generate(input_ids=prompt_ids, max_new_tokens=8, do_sample=False, pad_token_id=0)


def test_cli_from_a_4bit_base_generates_what_the_16bit_base_it_was_made_from_generates(
    setup, base4, tmp_path, capsys
):
    """Same NF4 bytes, same arithmetic: exactly the same logits, so the same completions."""
    base, _, adapter = setup
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello\nOnce upon a time\n")
    common = ["--adapter", adapter, "--prompts-file", str(prompts), "--max-new-tokens", "8", "--greedy"]
    common += ["--device", "cpu", "--no-progress"]
    assert main(["--model", base, *common, "--output", str(tmp_path / "16.jsonl")]) == 0
    assert main(["--model", base4, *common, "--output", str(tmp_path / "4.jsonl")]) == 0
    assert (tmp_path / "4.jsonl").read_text() == (tmp_path / "16.jsonl").read_text()

    from_4bit, from_16bit = load_model(base4, adapter), load_model(base, adapter)
    packed = {n: m.weight.data for n, m in named_linears(from_4bit) if isinstance(m, Linear4bit)}
    assert len(packed) == 14
    assert all(torch.equal(m.weight.data, packed[n]) for n, m in named_linears(from_16bit) if n in packed)
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    assert torch.equal(logits(from_4bit, tokens), logits(from_16bit, tokens))


def test_4bit_base_with_adapter_matches_transformers_and_peft(setup, base4):
    """transformers' own 4-bit model of the same directory + PeftModel.from_pretrained, on CPU. Train mode:
    in eval mode bitsandbytes repacks weights for a bf16 CPU kernel (see test_adapters). Logits to 1e-5
    (measured 0: the same bytes and matmuls, the adapter added in another order); greedy tokens equal."""
    _, _, adapter = setup
    theirs = transformers.AutoModelForCausalLM.from_pretrained(base4, device_map="cpu", dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(theirs, adapter).train()
    ours = load_model(base4, adapter)
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(logits(ours, tokens), logits(peft_model, tokens), atol=1e-5, rtol=1e-5)
    prompt = tokens[:, :6]
    assert torch.equal(greedy_ids(ours, prompt), greedy_ids(peft_model, prompt))
