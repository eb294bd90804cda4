"""Every recipe composes and its objects instantiate (hub models built from a micro config, nothing downloaded)."""

from __future__ import annotations

import pytest
import torch
from conftest import micro_overrides
from omegaconf import OmegaConf

from lightning_qlora import builders as B
from lightning_qlora.config import recipes
from lightning_qlora.lora import LoRALinear
from lightning_qlora.nf4 import Linear4bit

RECIPES = recipes()
HUB_RECIPES = {
    "llama32_1b_alpaca": ("meta-llama/Llama-3.2-1B", "tatsu-lab/alpaca"),
    "llama2_7b_alpaca": ("meta-llama/Llama-2-7b-hf", "tatsu-lab/alpaca"),
    "llama3_8b_alpaca": ("meta-llama/Meta-Llama-3-8B", "tatsu-lab/alpaca"),
    "llama3_8b_chat": ("meta-llama/Meta-Llama-3-8B-Instruct", "HuggingFaceH4/ultrachat_200k"),
    "mistral7b_alpaca": ("mistralai/Mistral-7B-v0.1", "tatsu-lab/alpaca"),
    "qwen25_7b_chat": ("Qwen/Qwen2.5-7B-Instruct", "HuggingFaceH4/ultrachat_200k"),
}


def test_the_shipped_recipes_are_the_expected_ones():
    assert set(RECIPES) == {"default", *HUB_RECIPES}


@pytest.mark.parametrize("name", sorted(HUB_RECIPES))
def test_hub_recipe_names_the_model_and_data_users_type(compose, name):
    cfg = compose(name, ["output_dir=/tmp/unused"])
    model, data = HUB_RECIPES[name]
    assert cfg.model.name_or_path == model and cfg.model.from_config is None
    assert cfg.data.path == data
    assert cfg.quant.enabled and cfg.quant.quant_type == "nf4" and cfg.quant.double_quant
    assert cfg.quant.compute_dtype == "bfloat16" and cfg.trainer.accelerator == "gpu"
    assert cfg.logger.kind == "wandb"
    assert "${" not in OmegaConf.to_yaml(OmegaConf.to_container(cfg, resolve=True))


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_instantiates_with_a_micro_model(compose, name, tmp_path):
    # A micro model from a config instead of the recipe's hub model: model.name_or_path=null, since a
    # path, when given, wins over from_config. The recipe's model name is checked in the test above.
    overrides = [
        *micro_overrides(output_dir=tmp_path),
        "data.path=null",
        "logger=none",
        "trainer.accelerator=cpu",
    ]
    cfg = compose(name, overrides)
    assert cfg.model.name_or_path is None and B.builds_from_config(cfg)
    plugin = B.build_plugin(cfg)
    assert plugin.lora.r == cfg.lora.r and plugin.quant.double_quant == cfg.quant.double_quant
    tokenizer = B.build_tokenizer(cfg)
    datamodule = B.build_datamodule(cfg, tokenizer)
    module = B.build_module(cfg, tokenizer)
    assert module.model_name == "llama(from_config)"
    with plugin.module_init_context():
        module.configure_model()
    layers = [m for m in module.modules() if isinstance(m, LoRALinear)]
    assert layers and all(isinstance(m.base_layer, Linear4bit) for m in layers)
    assert module.model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    callbacks = B.build_callbacks(cfg, str(tmp_path), tokenizer, datamodule)
    trainer = B.build_trainer(cfg, plugin, None, callbacks)
    assert trainer.precision_plugin is plugin and trainer.max_steps == cfg.trainer.max_steps
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    n_trainable = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert n_trainable == sum(p.numel() for p in module.parameters() if p.requires_grad) > 0


def test_overrides_reach_the_objects(compose):
    cfg = compose(
        "default",
        [
            "lora.r=32",
            "quant.blocksize=128",
            "trainer.max_steps=200",
            "data.max_length=1024",
            "output_dir=/tmp/unused",
        ],
    )
    plugin = B.build_plugin(cfg)
    assert (plugin.lora.r, plugin.quant.blocksize) == (32, 128)
    assert cfg.trainer.max_steps == 200 and cfg.data.max_length == 1024


def test_quantized_model_matches_the_unquantized_one_closely(compose, tmp_path):
    cfg = compose("default", [*micro_overrides(output_dir=tmp_path), "logger=none"])
    tokenizer = B.build_tokenizer(cfg)
    plugin = B.build_plugin(cfg)
    module = B.build_module(cfg, tokenizer)
    with plugin.module_init_context():
        module.configure_model()
    ref = B.build_module(cfg, tokenizer)
    ref.configure_model()  # same seed, no plugin: the 32-bit model
    ids = torch.randint(0, len(tokenizer), (2, 12))
    with torch.no_grad():
        out, want = module(ids).logits, ref(ids).logits
    assert (out - want).abs().max() < 0.25 * want.abs().max()
