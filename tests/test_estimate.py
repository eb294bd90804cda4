"""``lightning-qlora-estimate`` and the arithmetic behind it, held against real models and real steps.

The weight rows are checked against the bytes bitsandbytes really makes (``nf4.weight_bytes_by_dtype`` of
a quantized model), the adapter row against what AdamW really holds after a step, and the activations
are measured on the CPU with autograd's saved tensors in ``tests/test_checkpointing.py``. The peak of a
whole step is not measured on the CPU: torch keeps no peak counter for host allocations and a process's
RSS is mostly its libraries, so that comparison is the GPU test at the end
(``torch.cuda.max_memory_allocated`` of a real training run of the Llama-3.2-1B shapes).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import micro_overrides
from tiny import TINY

from lightning_qlora import LoRAConfig, QLoRAPrecision, QuantConfig
from lightning_qlora.bench import MODELS
from lightning_qlora.builders import compose_recipe
from lightning_qlora.data import build_byte_tokenizer
from lightning_qlora.estimate import CUDA_CONTEXT_GIB, main, will_fit
from lightning_qlora.hf_config import meta_model
from lightning_qlora.memory import (
    ACTIVATIONS,
    ADAPTERS,
    CONSTANTS,
    DENSE,
    GATHERED,
    GIB,
    LINEAR16,
    PACKED,
    TRANSIENT,
    Shapes,
    Weights,
    count_weights,
    estimate,
)
from lightning_qlora.module import CausalLMModule
from lightning_qlora.nf4 import Linear4bit, weight_bytes_by_dtype

ROWS = (
    "4-bit weights (packed)",
    "quantization constants (absmax)",
    "embeddings and head (+ norms)",
    "adapters + grads + optimizer state",
    "activations (checkpointing: none)",
    "largest transient",
    "allocator slack (x1.05)",
    "total",
)


@pytest.fixture(scope="module")
def llama_1b_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Llama-3.2-1B architecture as a model directory holding config.json only: no weights at all."""
    path = tmp_path_factory.mktemp("llama-1b-config")
    transformers.LlamaConfig(**MODELS["1b"]["config"]).save_pretrained(path)
    return path


def _1b(llama_1b_dir: Path, *extra: str) -> list[str]:
    return [
        "--config-name",
        "llama32_1b_alpaca",
        f"model.name_or_path={llama_1b_dir}",
        "data.batch_size=4",
        "data.max_length=2048",
        *extra,
    ]


def _quantized_tiny(dtype: str = "bfloat16", **quant) -> tuple[CausalLMModule, QLoRAPrecision]:
    """The tiny Llama converted by the plugin and quantized by bitsandbytes, on the CPU."""
    module = CausalLMModule(from_config={"model_type": "llama", **TINY})
    plugin = QLoRAPrecision(quant=QuantConfig(compute_dtype=dtype, **quant), lora=LoRAConfig(r=4))
    with plugin.module_init_context():
        module.configure_model()
    for layer in module.modules():
        if isinstance(layer, Linear4bit):
            layer.quantize_("cpu")
    return module, plugin


# ------------------------------------------------------------------------------------------ the CLI


def test_the_cli_prints_every_row_and_fits_the_micro_recipe(capsys):
    assert main(["--gpu-gib", "8", *micro_overrides()]) == 0
    out = capsys.readouterr().out
    for row in ROWS:
        assert row in out, row
    assert "fits a 8 GiB GPU: yes" in out
    assert re.search(r"largest data\.batch_size at data\.max_length=64: \d+", out)
    assert re.search(r"largest data\.max_length at data\.batch_size=8: \d+", out)


def test_a_run_that_does_not_fit_exits_2_with_one_line_saying_what_to_change(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lightning_qlora.estimate", "--gpu-gib", str(CUDA_CONTEXT_GIB + 0.0001),
         *micro_overrides()],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lightning-qlora: error: does not fit a 0.5001 GiB GPU")
    assert "Traceback" not in result.stderr
    assert "fits a 0.5001 GiB GPU: no" in result.stdout


def test_the_advice_names_the_largest_batch_that_fits(llama_1b_dir, capsys):
    cfg = compose_recipe("llama32_1b_alpaca", _1b(llama_1b_dir, "data.batch_size=64")[2:])
    fit = will_fit(cfg, 24)
    assert not fit.fits and 1 <= fit.max_batch < 64
    with pytest.raises(SystemExit) as exit_:
        main(["--gpu-gib", "24", *_1b(llama_1b_dir, "data.batch_size=64")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"lower data.batch_size to {fit.max_batch}" in err[0]


def test_a_leaner_checkpointing_is_offered_before_a_smaller_batch(llama_1b_dir, capsys):
    eager = _1b(llama_1b_dir, "data.batch_size=16", "model.activation_checkpointing=none")
    with pytest.raises(SystemExit):
        main(["--gpu-gib", "24", *eager])
    err = capsys.readouterr().err
    assert "set model.activation_checkpointing=" in err
    assert err.index("activation_checkpointing") < err.index("lower data.batch_size")


def test_without_a_gpu_the_gpu_size_is_required():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device gives the default --gpu-gib")
    with pytest.raises(SystemExit) as exit_:
        main(micro_overrides())
    assert exit_.value.code == 2


def test_a_hub_id_that_cannot_be_fetched_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the same answer with or without a network: nothing is fetched
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "--gpu-gib",
                "24",
                "--config-name",
                "llama32_1b_alpaca",
                "model.name_or_path=lightning-qlora/no-such",
            ]
        )
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert (
        "model.name_or_path='lightning-qlora/no-such' is a hub id" in err[0] and "model.from_config" in err[0]
    )


def test_a_4bit_checkpoint_is_estimated_from_its_config_json_alone(tmp_path, capsys):
    config = transformers.LlamaConfig(**TINY)
    config.quantization_config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True
    ).to_dict()
    config.save_pretrained(tmp_path)
    assert main(["--gpu-gib", "8", *micro_overrides(model__name_or_path=tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "a bitsandbytes 4-bit checkpoint" in out and "fits a 8 GiB GPU: yes" in out


def test_a_model_built_from_a_config_takes_the_tokenizers_vocabulary(compose):
    fit = will_fit(compose("default", micro_overrides()), 8)
    assert fit.setup.shapes.vocab == len(build_byte_tokenizer())


# ------------------------------------------------------------------------------------------ the arithmetic


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("storage", ["uint8", "bfloat16"])
def test_the_weight_rows_are_the_bytes_bitsandbytes_makes(double_quant, storage):
    module, plugin = _quantized_tiny(double_quant=double_quant, quant_storage=storage)
    measured = weight_bytes_by_dtype(module)
    counted = count_weights(meta_model(module.model.config, plugin))
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert counted.packed + counted.constants == measured["nf4"]
    assert counted.adapters == trainable
    assert counted.dense == sum(measured.values()) - measured["nf4"] - 4 * trainable  # + fp32 RoPE buffers
    # the shape-only arithmetic (what activation_checkpointing=auto uses) counts the same 4-bit bytes
    shaped = Weights.from_shapes(Shapes.from_hf(module.model.config), 4, True, 64, double_quant, 2)
    assert (shaped.packed, shaped.constants, shaped.adapters) == (
        counted.packed,
        counted.constants,
        trainable,
    )


def test_the_adapter_row_is_what_adamw_holds_after_a_real_step():
    module, plugin = _quantized_tiny("float32")
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    ids = torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    loss, _ = module._loss({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    loss.backward()
    optimizer.step()
    held = sum(p.nbytes + p.grad.nbytes for p in params)
    held += sum(
        t.nbytes for s in optimizer.state.values() for t in s.values() if t.shape == s["exp_avg"].shape
    )
    weights = count_weights(meta_model(module.model.config, plugin))
    est = estimate(Shapes.from_hf(module.model.config), 2, 16, weights=weights, dtype_bytes=4)
    assert est.parts[ADAPTERS] == held == sum(p.numel() for p in params) * (4 + 4 + 8)


def test_the_counted_weights_of_the_7b_agree_with_its_shapes():
    config = transformers.LlamaConfig(**MODELS["7b"]["config"])
    plugin = QLoRAPrecision(quant=QuantConfig(), lora=LoRAConfig(r=16))
    counted = count_weights(meta_model(config, plugin))
    shaped = Weights.from_shapes(Shapes.from_hf(config), lora_r=16)
    assert (counted.packed, counted.constants, counted.adapters, counted.largest_quantized) == (
        shaped.packed,
        shaped.constants,
        shaped.adapters,
        shaped.largest_quantized,
    )
    assert counted.dense == pytest.approx(shaped.dense, rel=1e-4)  # + the RoPE tables, a few KiB


def test_the_largest_batch_and_length_are_where_the_estimate_crosses_the_gpu(compose, llama_1b_dir):
    cfg = compose("llama32_1b_alpaca", _1b(llama_1b_dir)[2:])
    fit = will_fit(cfg, 24)
    s, usable = fit.setup, fit.usable_gib * GIB
    assert fit.fits and fit.max_batch > s.batch and fit.max_seq > s.seq

    def total(batch: int, seq: int) -> float:
        return s.step(batch, seq, fit.usable_gib)[0].total

    assert total(fit.max_batch, s.seq) <= usable < total(fit.max_batch + 1, s.seq)
    assert total(s.batch, fit.max_seq) <= usable < total(s.batch, fit.max_seq + 1)


def test_fsdp_divides_weights_adapters_and_optimizer_state_but_not_constants_or_activations(
    compose, llama_1b_dir
):
    cfg = compose("llama32_1b_alpaca", _1b(llama_1b_dir)[2:])
    one = will_fit(cfg, 80, devices=1, strategy="fsdp").estimate.parts
    two = will_fit(cfg, 80, devices=2, strategy="fsdp").estimate.parts
    for key in (PACKED, DENSE, ADAPTERS):
        assert two[key] == pytest.approx(one[key] / 2)
    head = 128256 * 2048 * 2  # Llama-3.2-1B ties its head: under FSDP2Strategy it gets its own bf16 copy
    assert one[DENSE] == pytest.approx(will_fit(cfg, 80).estimate.parts[DENSE] + head)
    for key in (CONSTANTS, ACTIVATIONS, TRANSIENT):
        assert two[key] == one[key]
    assert GATHERED in two and GATHERED not in one  # the embeddings and head, and the layers being computed
    ddp = will_fit(cfg, 80, devices=2, strategy="ddp").estimate.parts
    assert ddp[ADAPTERS] == pytest.approx(one[ADAPTERS] * 5 / 4)  # + DDP's bucket copy of the gradients


def test_auto_names_the_setting_it_picks_and_a_budget_above_the_gpu_is_caught(compose, llama_1b_dir):
    auto = ["model.activation_checkpointing=auto", "data.batch_size=8"]
    fit = will_fit(compose("llama32_1b_alpaca", _1b(llama_1b_dir, *auto, "model.max_memory_gib=20")[2:]), 24)
    assert fit.fits and "activation_checkpointing=auto chose" in fit.table()
    assert fit.estimate.total <= 20 * GIB
    big_batch = [*auto, "data.batch_size=16", "model.max_memory_gib=100"]
    big = will_fit(compose("llama32_1b_alpaca", _1b(llama_1b_dir, *big_batch)[2:]), 24)
    assert not big.fits and "set model.max_memory_gib=23.5 " in big.advice


def test_an_auto_budget_no_setting_meets_stops_the_run_and_says_so(compose, llama_1b_dir):
    tight = ["model.activation_checkpointing=auto", "model.max_memory_gib=2", "data.batch_size=8"]
    fit = will_fit(compose("llama32_1b_alpaca", _1b(llama_1b_dir, *tight)[2:]), 24)
    assert not fit.fits and not fit.budget_met
    assert "model.max_memory_gib=2 cannot be met" in fit.advice and "model.max_memory_gib=23.5 " in fit.advice
    assert "finds no setting under model.max_memory_gib=2" in fit.table()


def test_16bit_lora_has_no_4bit_rows(compose):
    parts = will_fit(compose("default", micro_overrides(quant="none")), 8).estimate.parts
    assert LINEAR16 in parts and PACKED not in parts and CONSTANTS not in parts


def test_gpus_and_strategy_default_to_the_trainer_settings(compose, llama_1b_dir):
    ddp = will_fit(
        compose("llama32_1b_alpaca", _1b(llama_1b_dir, "trainer.devices=2", "trainer.num_nodes=2")[2:]), 80
    )
    assert (ddp.setup.devices, ddp.setup.strategy) == (4, "ddp")
    fsdp = will_fit(
        compose("llama32_1b_alpaca", _1b(llama_1b_dir, "trainer.devices=2", "trainer.strategy=fsdp2")[2:]), 80
    )
    assert (fsdp.setup.devices, fsdp.setup.strategy) == (2, "fsdp")


# ------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_the_estimate_is_within_10_percent_of_a_real_training_run_of_the_1b(tmp_path):
    from lightning_qlora.bench import prepare_checkpoint

    checkpoint = tmp_path / "1b"
    prepare_checkpoint("1b", checkpoint, torch.device("cuda", 0))
    torch.cuda.empty_cache()
    overrides = [f"model.name_or_path={checkpoint}", "model.tokenizer=byte", "model.activation_checkpointing=full",
                 "data=tiny_instruct", "data.max_length=2048", "data.packing=true", "data.batch_size=4",
                 "trainer.max_steps=6", "trainer.val_check_interval=null", "trainer.limit_val_batches=0",
                 "trainer.accumulate_grad_batches=1", "logger=csv", "callbacks.checkpoint=false",
                 "save_adapter=false"]  # fmt: skip
    predicted = will_fit(compose_recipe("llama32_1b_alpaca", overrides)).estimate.total / GIB
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    app = subprocess.run(
        [sys.executable, "-m", "lightning_qlora.train", "--config-name", "llama32_1b_alpaca", *overrides,
         f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert app.returncode == 0, app.stderr[-2000:]
    measured = float(re.search(r"peak GPU memory ([0-9.]+) GiB", app.stdout).group(1))
    assert predicted == pytest.approx(measured, rel=0.10), (
        f"estimated {predicted:.2f} GiB, measured {measured}"
    )


def test_under_fsdp_the_transient_covers_the_adapters_gathered_for_saving():
    """Saving gathers every adapter whole on every rank between steps: with short sequences and a large rank
    that is the largest transient, and the estimate names it."""
    shapes = Shapes(hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, head_dim=128, vocab=32000,
                    tied=False)  # fmt: skip
    weights = Weights.from_shapes(shapes, lora_r=256)
    est = estimate(shapes, 1, 16, lora_r=256, devices=4, strategy="fsdp")
    assert est.parts[TRANSIENT] == pytest.approx(weights.adapters * 4 * 3 / 4)
    assert est.transient == "the adapters gathered for saving"
    assert estimate(shapes, 1, 16, lora_r=256).transient != "the adapters gathered for saving"
