"""The application: the console script end to end, recipes from any cwd, multirun, local models, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import micro_overrides, write_jsonl
from safetensors.torch import load_file

from lightning_qlora import builders as B
from lightning_qlora import preflight as P
from lightning_qlora import train as T


def _adapter_files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()} if directory.is_dir() else set()


@pytest.mark.slow
def test_console_script_trains_the_default_recipe_and_writes_its_adapter(run_cli, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(*micro_overrides(**{"lora.r": 4, "trainer.max_steps": 4, "hydra.run.dir": run_dir}))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lightning-qlora: finished 4 steps" in result.stdout
    assert "before:" in result.stdout and "after:" in result.stdout  # the sample generation
    adapter = run_dir / "adapter"
    assert {"adapter_model.safetensors", "adapter_config.json"} <= _adapter_files(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["peft_type"] == "LORA"
    weights = load_file(adapter / "adapter_model.safetensors")
    assert weights and any(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)  # it trained
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert list((run_dir / "checkpoints").glob("*.ckpt"))


def test_recipes_are_found_from_any_cwd_with_python_m(run_cli, tmp_path):
    result = run_cli("--config-name", "llama2_7b_alpaca", "lora.r=32", "--cfg", "job", module=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "name_or_path: meta-llama/Llama-2-7b-hf" in result.stdout and "r: 32" in result.stdout
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_multirun_with_two_values_makes_two_runs(run_cli, tmp_path):
    sweep = tmp_path / "sweep"
    overrides = micro_overrides(**{"trainer.max_steps": 2, "hydra.sweep.dir": sweep, "sample.prompts": "[]"})
    result = run_cli("-m", "lora.r=2,4", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = sorted(
        json.loads((d / "adapter" / "adapter_config.json").read_text())["r"]
        for d in sweep.iterdir()
        if d.is_dir()
    )
    assert ranks == [2, 4]


def test_a_saved_model_loads_back_through_from_pretrained(compose, tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = compose(
        "default",
        [
            *micro_overrides(output_dir=tmp_path),
            f"model.name_or_path={tiny_llama_dir}",
            "model.from_config=null",
            "model.tokenizer=null",
        ],
    )
    P.check_model_source(cfg)
    tokenizer = B.build_tokenizer(cfg)
    assert len(tokenizer) == 262  # the tokenizer saved with the model
    plugin = B.build_plugin(cfg)
    module = B.build_module(cfg, tokenizer)
    with plugin.module_init_context():
        module.configure_model()
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    # 16-bit parts are the saved values exactly; 4-bit parts are close to them.
    assert torch.equal(module.model.get_input_embeddings().weight, ref.get_input_embeddings().weight)
    ids = torch.randint(0, 262, (2, 10))
    with torch.no_grad():
        out, want = module(ids).logits, ref(ids).logits
    assert (out - want).abs().max() < 0.25 * want.abs().max()


def test_a_saved_model_trains_in_process(compose, tiny_llama_dir, tmp_path, wandb_offline):
    cfg = compose(
        "default",
        [
            *micro_overrides(output_dir=tmp_path / "run"),
            f"model.name_or_path={tiny_llama_dir}",
            "model.from_config=null",
            "model.tokenizer=byte",
            "model.activation_checkpointing=full",
            "trainer.max_steps=2",
            "logger=csv",
            "sample.prompts=[]",
        ],
    )
    summary = T.train(cfg)
    assert summary["global_step"] == 2 and summary["final_train_loss"] > 0
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "csv" / "metrics.csv").is_file()


# --------------------------------------------------------------------------------------------- bad input
def _run_main(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        T.main(args)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "override,expected",
    [
        ("lora.foo=1", "unknown config key 'lora.foo'; 'lora' has: r, alpha"),
        ("lora.r=abc", "bad value for 'lora.r': Value 'abc' of type 'str' could not be converted to Integer"),
        ("trainer.max_steps=many", "bad value for 'trainer.max_steps'"),
        ("quant=nf8", "quant=nf8 is not an option of 'quant'; choose one of: fp4, nf4, nf4_dq, none"),
        ("modle.name_or_path=x", "unknown config key 'modle'"),
    ],
)
def test_bad_overrides_stop_with_one_line(override, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = _run_main([override], capsys)
    assert code == 2
    assert expected in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "outputs").exists()


def test_unknown_recipe_lists_the_recipes(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = _run_main(["--config-name", "llama9_alpaca"], capsys)
    assert code == 2 and "no recipe named 'llama9_alpaca'; recipes: default, llama2_7b_alpaca" in err


def _bad_data(tmp_path: Path, kind: str) -> tuple[list[str], str]:
    if kind == "missing_file":
        return [f"data.path={tmp_path / 'nope.jsonl'}"], "nope.jsonl"
    if kind == "row_missing_fields":
        rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(5)] + [
            {"instruction": "no output"}
        ]
        path = write_jsonl(tmp_path / "rows.jsonl", rows)
        return [f"data.path={path}", "data.format=instruction"], "line 6"
    if kind == "empty_after_filtering":
        path = write_jsonl(tmp_path / "one.jsonl", [{"instruction": "q", "output": "a"}])
        return [f"data.path={path}", "data.max_samples=null"], "empty dataset after filtering"
    if kind == "model_path":
        return ["model.from_config=null", f"model.name_or_path={tmp_path / 'no-model'}"], "does not exist"
    if kind == "blocksize":
        return ["quant.blocksize=100"], "quant.blocksize=100 is not supported"
    if kind == "val_interval":
        return [
            "trainer.val_check_interval=1000",
            "trainer.check_val_every_n_epoch=1",
        ], "trainer.val_check_interval=1000"
    if kind == "optimizer":
        return ["optimizer.name=adamax"], "optimizer.name='adamax' is not supported"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "missing_file",
        "row_missing_fields",
        "empty_after_filtering",
        "model_path",
        "blocksize",
        "optimizer",
        "val_interval",
    ],
)
def test_bad_input_stops_before_training_and_leaves_no_run_dir(
    kind, capsys, tmp_path, monkeypatch, wandb_offline
):
    monkeypatch.chdir(tmp_path)
    overrides, expected = _bad_data(tmp_path, kind)
    run_dir = tmp_path / "outputs" / "run"
    code, err = _run_main(
        [*micro_overrides(**{"hydra.run.dir": run_dir, "data.cache_dir": tmp_path / "cache"}), *overrides],
        capsys,
    )
    assert code == 2, err
    assert expected in err, err
    assert len([line for line in err.splitlines() if line.startswith("lightning-qlora: error:")]) == 1
    assert not run_dir.exists()


def test_a_run_resumes_from_its_checkpoint_with_ckpt_path(compose, tmp_path, wandb_offline):
    """The application builds the model in configure_model, so the plugin converts it before Lightning
    restores the checkpoint: the adapters, optimizer and step count come back."""
    import torch

    first = compose(
        "default", [*micro_overrides(output_dir=tmp_path / "a"), "logger=csv", "sample.prompts=[]"]
    )
    assert T.train(first)["global_step"] == 3
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    assert saved["state_dict"] and all(".lora_" in k for k in saved["state_dict"])

    second = compose(
        "default",
        [
            *micro_overrides(output_dir=tmp_path / "b", trainer__max_steps=5),
            "logger=csv",
            "sample.prompts=[]",
            f"ckpt_path={ckpt}",
        ],
    )
    summary = T.train(second)  # Lightning loads strictly: unadapted layers would have raised here
    assert summary["global_step"] == 5
    resumed = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=False)
    key = next(iter(saved["state_dict"]))
    assert not torch.equal(resumed["state_dict"][key], saved["state_dict"][key]), (
        "training went on from there"
    )
