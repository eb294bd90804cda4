"""One declaration per setting: the Hydra schema of each plugin group is the dataclass the run builds,
and every option of every config group composes into values that reach the built objects."""

from __future__ import annotations

import dataclasses
from importlib import resources

import pytest
import yaml
from conftest import micro_overrides
from omegaconf import OmegaConf

from lightning_qlora import builders as B
from lightning_qlora.config import TrainConfig, schema_keys
from lightning_qlora.data import DataConfig
from lightning_qlora.lora import LoRAConfig
from lightning_qlora.module import ModelConfig
from lightning_qlora.nf4 import QuantConfig
from lightning_qlora.optim import OptimizerConfig

PLUGIN_GROUPS = {
    "quant": QuantConfig,
    "lora": LoRAConfig,
    "model": ModelConfig,
    "data": DataConfig,
    "optimizer": OptimizerConfig,
}


def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


@pytest.mark.parametrize("group", sorted(PLUGIN_GROUPS))
def test_each_plugin_group_schema_is_the_dataclass_it_builds(group):
    assert {f.name: f for f in dataclasses.fields(TrainConfig)}[group].type == PLUGIN_GROUPS[group].__name__
    assert schema_keys(group) == _fields(PLUGIN_GROUPS[group])


# A non-default value for every field of every plugin group; the test checks each reaches the built object.
NON_DEFAULTS = {
    "quant": {
        "enabled": None,  # checked separately: false turns the plugin into 16-bit LoRA
        "quant_type": "fp4",
        "double_quant": False,
        "blocksize": 128,
        "compute_dtype": "float32",
        "quant_storage": "float32",
        "skip_modules": ["lm_head", "gate_proj"],
    },
    "lora": {
        "r": 5,
        "alpha": 7.0,
        "dropout": 0.25,
        "target_modules": ["q_proj", "v_proj"],
        "exclude_modules": ["v_proj"],
        "use_rslora": True,
    },
    "optimizer": {
        "name": "sgd",
        "lr": 0.125,
        "weight_decay": 0.5,
        "betas": [0.8, 0.9],
        "eps": 1e-6,
        "scheduler": "linear",
        "warmup_steps": 3,
        "warmup_ratio": 0.25,
        "min_lr_ratio": 0.5,
    },
    "model": {
        "name_or_path": "my/model",
        "from_config": None,  # the micro config is needed to build anything offline
        "tokenizer": None,  # byte, as the micro run sets it
        "activation_checkpointing": "every_n_layers",
        "checkpoint_every_n_layers": 3,
        "max_memory_gib": 7.5,
        "attn_implementation": "eager",
        "trust_remote_code": True,
        "revision": "v1",
        "loss_chunk_size": 17,
        "compile": False,
    },
    "data": {
        "path": None,  # the shipped data: nothing to download
        "name": None,
        "format": "instruction",
        "train_split": "train",
        "val_split": None,
        "val_fraction": 0.2,
        "max_length": 48,
        "on_overlong": "drop",
        "train_on_prompt": True,
        "packing": True,
        "batch_size": 3,
        "num_workers": 0,
        "prompt_template": "alpaca",
        "text_field": "body",
        "max_samples": 40,
        "seed": 7,
        "cache_dir": None,
    },
}


def _override(key: str, value: object) -> str:
    return f"{key}=[{','.join(map(str, value))}]" if isinstance(value, list) else f"{key}={value}"


def test_the_non_default_table_covers_every_field():
    for group, values in NON_DEFAULTS.items():
        assert list(values) == _fields(PLUGIN_GROUPS[group]), group


def test_every_setting_of_every_plugin_group_reaches_the_object_it_builds(compose, tmp_path):
    given = {g: {k: v for k, v in vals.items() if v is not None} for g, vals in NON_DEFAULTS.items()}
    overrides = micro_overrides(output_dir=tmp_path) + [
        _override(f"{g}.{k}", v) for g, vals in given.items() for k, v in vals.items()
    ]
    cfg = compose("default", overrides)
    plugin = B.build_plugin(cfg)
    tokenizer = B.build_tokenizer(cfg)
    datamodule = B.build_datamodule(cfg, tokenizer)
    module = B.build_module(cfg, tokenizer)
    built = {
        "quant": plugin.quant.to_dict(),
        "lora": plugin.lora.to_dict(),
        "optimizer": dataclasses.asdict(module.optimizer_config),
        "model": dataclasses.asdict(module.config),
        "data": dataclasses.asdict(datamodule.config),
    }
    for group, values in given.items():
        assert set(built[group]) == set(_fields(PLUGIN_GROUPS[group])), group
        for key, value in values.items():
            assert built[group][key] == value, f"{group}.{key}: built {built[group][key]!r}, given {value!r}"


def test_quant_enabled_false_builds_the_16_bit_plugin_with_the_groups_compute_dtype(compose):
    cfg = compose("default", ["quant=none", "quant.compute_dtype=float16", "output_dir=/tmp/unused"])
    plugin = B.build_plugin(cfg)
    assert plugin.quant is None and str(plugin.dtype) == "torch.float16"


def _options() -> list[tuple[str, str]]:
    conf = resources.files("lightning_qlora.conf")
    return sorted(
        (group.name, option.name[: -len(".yaml")])
        for group in conf.iterdir()
        if group.is_dir() and not group.name.startswith("__")
        for option in group.iterdir()
        if option.name.endswith(".yaml")
    )


def test_every_group_has_options():
    groups = {g for g, _ in _options()}
    assert groups == {
        "callbacks",
        "data",
        "debug",
        "logger",
        "lora",
        "model",
        "optimizer",
        "quant",
        "trainer",
    }


@pytest.mark.parametrize("group,option", _options())
def test_every_group_option_composes_and_its_values_arrive(compose, group, option):
    text = (resources.files("lightning_qlora.conf") / group / f"{option}.yaml").read_text()
    values = yaml.safe_load(text) or {}
    values.pop("defaults", None)  # Hydra's composition order (trainer=fsdp extends trainer=ddp), not a value
    required = {"model": "model.name_or_path=/some/model", "data": "data.path=my.jsonl"}
    extra = [required[group]] if "???" in text else []
    cfg = compose("default", [f"{group}={option}", "output_dir=/tmp/unused", *extra])
    global_package = text.lstrip().startswith("# @package _global_")
    node = cfg if global_package else cfg[group]
    # The recipe's own values win over a group option's (a debug option, listed after it, wins over both).
    recipe = yaml.safe_load((resources.files("lightning_qlora.recipes") / "default.yaml").read_text())
    set_by_recipe = {k for k, _ in _flatten(recipe if global_package else recipe.get(group) or {})}
    if group == "debug":
        set_by_recipe = set()
    for key, value in _flatten(values):
        if key in set_by_recipe:
            continue
        got = OmegaConf.select(node, key, throw_on_missing=False)
        if isinstance(value, str) and ("${" in value or value == "???"):
            continue
        assert got == value or OmegaConf.to_container(got) == value, f"{group}={option}: {key}"
    if group in PLUGIN_GROUPS:
        B.typed(cfg[group])  # the dataclass accepts the option's values
    if group in ("quant", "lora"):
        B.build_plugin(cfg)


def _flatten(values: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for key, value in values.items():
        if isinstance(value, dict) and key != "from_config":
            out += _flatten(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out
