"""What 4-bit costs in model quality: held-out loss per format, the train-first study, bad input.

Real bitsandbytes (its CPU backend), the real ``Linear4bit`` layers, a real Lightning ``Trainer``
with ``QLoRAPrecision``, real Hydra recipes, W&B offline. The one ordering asserted is the one that
must hold: evaluated on the rows a model was fitted to (a minimum of that loss), every 4-bit format
scores a higher loss than the unquantized model. On held-out data or random weights the sign of a
small perturbation's effect is not guaranteed (measured: on a random tiny Llama the bitsandbytes
formats *lower* the loss by 0.002), so nothing else is asserted about the ordering.
"""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import wandb_summary, write_jsonl
from tiny import MICRO_LLAMA, tiny_llama_config
from transformers import AutoModelForCausalLM

from lightning_qlora import quant_report as qr
from lightning_qlora.data import build_byte_tokenizer
from lightning_qlora.nf4 import Linear4bit, QuantConfig, quantize_linears
from lightning_qlora.quant_report import quality as ql
from lightning_qlora.quant_report import stdlib

BUILTIN = Path(ql.__file__).parents[1] / "data" / "tiny_instruct.jsonl"
# The micro Llama of the Hydra tests with 2 layers: 64 wide, so block sizes 32 and 64 fit.
MODEL = {**MICRO_LLAMA, "num_hidden_layers": 2}
FROM_CONFIG = "++model.from_config=" + json.dumps(MODEL).replace('"', "").replace(" ", "")
BLOCKS = (32, 64)


def _rows(n: int) -> list[dict]:
    return [json.loads(line) for line in BUILTIN.read_text().splitlines()[:n]]


@pytest.fixture(scope="module")
def memorized(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``--recipe default --train-first`` on 32 rows, evaluated on the same rows, with 3 LoRA steps.

    The model memorizes the rows (loss ~0.004 after 120 steps; at 60 steps, loss 0.19, the smallest
    margin was 0.2 SE): at a minimum of the evaluated loss every perturbation raises it.
    """
    tmp = tmp_path_factory.mktemp("study")
    data = write_jsonl(tmp / "mem.jsonl", _rows(32))
    out = tmp / "out"
    argv = [
        "--recipe",
        "default",
        "--train-first",
        "--eval-data",
        str(data),
        "--train-steps",
        "120",  # to a loss of ~0.004: at a near-zero loss no perturbation can lower it
        "--lora-steps",
        "3",
        "--blocksizes",
        ",".join(map(str, BLOCKS)),
        "--samples",
        "4096",
        "--out",
        str(out),
        "--quiet",
        FROM_CONFIG,
        f"data.path={data}",
        "data.val_fraction=0",
        "data.batch_size=32",
        f"data.cache_dir={tmp / 'cache'}",
        "optimizer.lr=1e-2",
    ]
    assert qr.main(argv) == 0
    return {"out": out, "data": data, "csv": list(csv.DictReader((out / "quality.csv").open()))}


def _loss(rows: list[dict], fmt: str, blocksize: int | str = "") -> float:
    return next(float(r["loss"]) for r in rows if r["format"] == fmt and r["blocksize"] == str(blocksize))


@pytest.mark.slow
def test_unquantized_loss_is_below_every_4bit_format_on_the_fitted_rows(memorized):
    rows = memorized["csv"]
    base = _loss(rows, "none")
    quantized = [r for r in rows if r["format"] != "none"]
    assert quantized
    for r in quantized:
        assert float(r["loss"]) > base, (r["format"], r["blocksize"], r["loss"], base)
        assert float(r["delta_loss"]) == pytest.approx(float(r["loss"]) - base)
        assert float(r["perplexity"]) == pytest.approx(2.718281828459045 ** float(r["loss"]))


@pytest.mark.slow
def test_quality_table_csv_json_and_figure_hold_every_format_and_block_size(memorized):
    out, rows = memorized["out"], memorized["csv"]
    got = {(r["format"], r["blocksize"]) for r in rows}
    want = {("none", "")} | {(f, str(b)) for f in qr.DEFAULT_FORMATS for b in BLOCKS}
    assert got == want and len(rows) == len(want)
    # bits/weight are the measured stored bytes of what the model ran with, e.g. 4 + 32/B for nf4
    for b in BLOCKS:
        nf4 = next(r for r in rows if r["format"] == "nf4" and r["blocksize"] == str(b))
        assert float(nf4["bits_per_weight"]) == pytest.approx(4 + 32 / b)
    record = json.loads((out / "quality.json").read_text())
    assert [(r["format"], str(r["blocksize"] or "")) for r in record["quality"]["rows"]] == [
        (r["format"], r["blocksize"]) for r in rows
    ]
    assert record["quality"]["eval_set"]["rows"] == 32
    assert record["quality"]["linear_layers"] == 14  # 7 per layer; the head stays unquantized
    assert record["train"]["steps"] == 120 and record["train"]["params"] > 0
    md = (out / "report.md").read_text()
    assert "## Model quality" in md and "| nf4 + dq (bnb) | 64 |" in md
    assert "### LoRA on the 4-bit base" in md and "response tokens only" in md
    assert (out / "quality_vs_bits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "model" / "config.json").is_file()  # the fitted model, reusable with --model


@pytest.mark.slow
def test_lora_recovery_runs_through_the_plugin_and_starts_where_the_quality_rows_are(memorized):
    record = json.loads((memorized["out"] / "quality.json").read_text())
    rec = {r["base"]: r for r in record["recovery"]}
    assert set(rec) == {"none", "nf4_dq"}
    assert all(r["steps"] == 3 for r in rec.values())
    # Step 0 of LoRA (B = 0) is the base exactly: the plugin's 4-bit model, validated by the Trainer,
    # scores what quantize_linears' Linear4bit scored in the table; its 16-bit model the baseline.
    rows = memorized["csv"]
    assert rec["nf4_dq"]["loss_before"] == pytest.approx(_loss(rows, "nf4_dq", 64), abs=1e-5)
    assert rec["none"]["loss_before"] == pytest.approx(_loss(rows, "none"), abs=1e-5)
    assert rec["nf4_dq"]["loss_after"] != rec["nf4_dq"]["loss_before"]  # the adapters trained


@pytest.mark.slow
def test_eval_data_on_the_saved_model_reproduces_the_study(memorized, tmp_path):
    out = tmp_path / "again"
    argv = ["--model", str(memorized["out"] / "model"), "--eval-data", str(memorized["data"])]
    argv += ["--prompt-template", "short", "--formats", "nf4_dq,int4_absmax", "--blocksizes", "64"]
    assert qr.main([*argv, "--samples", "4096", "--out", str(out), "--quiet"]) == 0
    rows = list(csv.DictReader((out / "quality.csv").open()))
    assert len(rows) == 3
    for fmt, bs in (("none", ""), ("nf4_dq", 64), ("int4_absmax", 64)):
        assert _loss(rows, fmt, bs) == pytest.approx(_loss(memorized["csv"], fmt, bs), abs=1e-6)


# --------------------------------------------------------------------------------------------
# The layer paths, on a random tiny Llama (fast)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_eval() -> tuple[torch.nn.Module, ql.EvalSet]:
    tok = build_byte_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(vocab_size=len(tok)))
    from lightning_qlora.data import DataConfig

    es = ql.eval_set_from_file(str(BUILTIN), tok, DataConfig(prompt_template="short", batch_size=16), 200)
    return model, es


def test_bnb_rows_are_the_linear4bit_layers_that_train(tiny_eval):
    model, es = tiny_eval
    q = ql.evaluate_quality(model, es, ["nf4_dq", "fp4"], [64])
    # the same model through quantize_linears' Linear4bit, built by hand
    for fmt, (quant_type, dq) in (("nf4_dq", ("nf4", True)), ("fp4", ("fp4", False))):
        m = copy.deepcopy(model)
        quantize_linears(
            m, QuantConfig(quant_type=quant_type, double_quant=dq, blocksize=64, compute_dtype="float32")
        )
        assert sum(isinstance(x, Linear4bit) for x in m.modules()) == 14
        loss, n = ql.evaluate_loss(m, es, "cpu")
        assert q.row(fmt, 64).loss == loss and q.row(fmt, 64).target_tokens == n == es.target_tokens


def test_int4_rows_run_the_same_layers_with_the_dequantized_weights(tiny_eval):
    model, es = tiny_eval
    q = ql.evaluate_quality(model, es, ["int4_absmax", "std_quantile"], [32])
    for fmt in ("int4_absmax", "std_quantile"):
        m = copy.deepcopy(model)
        for name in ql.target_linears(m):
            w = m.get_submodule(name).weight
            w.data = qr.quantize(w, fmt, 32).dequantized.view_as(w)
        loss, _ = ql.evaluate_loss(m, es, "cpu")
        assert q.row(fmt, 32).loss == pytest.approx(loss, abs=1e-7)
        assert q.row(fmt, 32).weights.n_tensors == 14


def test_evaluation_leaves_the_model_as_it_was(tiny_eval):
    model, es = tiny_eval
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = [type(m) for m in model.modules()]
    q = ql.evaluate_quality(model, es, ["nf4", "int4_minmax"], [32])
    assert [type(m) for m in model.modules()] == kinds
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert ql.evaluate_loss(model, es, "cpu")[0] == q.baseline.loss
    assert q.n_linear == 14 and q.quantized_params == sum(
        model.get_submodule(n).weight.numel() for n in ql.target_linears(model)
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_quality_rows_agree_with_the_cpu_ones(tiny_eval):
    # The GPU study quantizes int4 on the GPU and runs bitsandbytes' CUDA kernels: in float32 both
    # must store the same bytes and land on the CPU's losses (up to matmul rounding).
    model, es = tiny_eval
    fmts = ["int4_absmax", "nf4_dq"]
    cpu = ql.evaluate_quality(copy.deepcopy(model), es, fmts, [64], "cpu", torch.float32)
    gpu = ql.evaluate_quality(copy.deepcopy(model), es, fmts, [64], "cuda", torch.float32)
    assert gpu.baseline.loss == pytest.approx(cpu.baseline.loss, abs=1e-4)
    for fmt in fmts:
        c, g = cpu.row(fmt, 64), gpu.row(fmt, 64)
        assert g.weights.block_bytes == c.weights.block_bytes
        assert g.weights.rel_mse == pytest.approx(c.weights.rel_mse, rel=1e-3)
        assert g.loss == pytest.approx(c.loss, abs=1e-3)


def test_the_standard_error_of_a_loss_difference_is_paired_over_batches(tiny_eval):
    base = ql.QualityRow("none", None, 2.0, 30, batches=[(1.0, 10), (2.0, 10), (3.0, 10)])
    shifted = ql.QualityRow("nf4", 64, 2.1, 30, batches=[(1.1, 10), (2.1, 10), (3.1, 10)])
    mixed = ql.QualityRow("fp4", 64, 2.0 + 0.1 / 3, 30, batches=[(1.2, 10), (2.0, 10), (2.9, 10)])
    q = ql.QualityResult("m", {}, "cpu", "float32", base, [shifted, mixed])
    # a constant shift on every batch: the batches' own spread (1 to 3) cancels, the SE is 0
    assert q.delta_se(shifted) == pytest.approx(0, abs=1e-12) and q.resolved(shifted)
    # differences 0.2, 0, -0.1: mean 1/30, SE = sqrt(sum((d - mean)^2) / 9 * 3/2)
    d = [0.2, 0.0, -0.1]
    want = (sum((x - 0.1 / 3) ** 2 for x in d) / 9 * 1.5) ** 0.5
    assert q.delta_se(mixed) == pytest.approx(want) and not q.resolved(mixed)
    # and in a real evaluation the batches add up to the reported loss
    model, es = tiny_eval
    r = ql.evaluate_quality(model, es, ["nf4"], [64])
    assert len(es.batches) >= 8 and len(r.baseline.batches) == len(es.batches)
    for row in (r.baseline, r.row("nf4", 64)):
        assert sum(x * k for x, k in row.batches) / sum(k for _, k in row.batches) == pytest.approx(row.loss)
    assert r.delta_se(r.row("nf4", 64)) > 0


def test_eval_tokens_keeps_whole_rows_up_to_the_budget(tiny_eval):
    _, es = tiny_eval
    assert es.data_format == "instruction" and "response tokens only" in es.loss_on
    assert 200 <= es.target_tokens < 200 + 20  # whole rows: the last one may go a little over
    assert es.available_rows == 1600 and es.rows < 100
    assert sum(int((b["labels"][:, 1:] != -100).sum()) for b in es.batches) == es.target_tokens


def test_a_recipe_model_is_evaluated_on_data_tokenized_as_the_recipe_does(tmp_path):
    data = write_jsonl(tmp_path / "eval.jsonl", _rows(16))
    out = tmp_path / "out"
    argv = ["--recipe", "default", "--eval-data", str(data), "--eval-tokens", "40"]
    argv += ["--formats", "nf4_dq,int4_absmax", "--blocksizes", "64", "--samples", "4096"]
    assert qr.main([*argv, "--out", str(out), "--quiet"]) == 0
    record = json.loads((out / "quality.json").read_text())["quality"]
    assert record["linear_layers"] == 28  # the embedded model: 4 layers of 7
    assert record["model"].startswith("default: llama(from_config)")
    # the recipe's short template (byte tokens): ~70 a row; the alpaca preamble alone would add ~150
    assert record["eval_set"]["tokens"] < 120 * record["eval_set"]["rows"]
    assert 40 <= record["eval_set"]["target_tokens"] and record["eval_set"]["rows"] < 16
    assert [r["format"] for r in record["rows"]] == ["none", "nf4_dq", "int4_absmax"]


def test_wandb_logs_the_quality_table_offline(tmp_path, wandb_offline):
    data = write_jsonl(tmp_path / "eval.jsonl", _rows(8))
    out = tmp_path / "out"
    argv = ["--random-llama", "--eval-data", str(data), "--formats", "nf4,int4_absmax", "--blocksizes", "32"]
    assert qr.main([*argv, "--samples", "4096", "--out", str(out), "--wandb", "--quiet"]) == 0
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    summary = wandb_summary(runs[0])
    assert summary["quant_report/quality"]["_type"] == "table-file"
    assert summary["quant_report/quality"]["nrows"] == 3
    assert summary["quant_report/quality_vs_bits"]["_type"] == "image-file"
    rows = list(csv.DictReader((out / "quality.csv").open()))
    assert summary["quant_report/quality/nf4/32/loss"] == pytest.approx(_loss(rows, "nf4", 32))


# --------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    tok = build_byte_tokenizer()
    AutoModelForCausalLM.from_config(tiny_llama_config(vocab_size=len(tok))).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _refused(capsys, tmp_path: Path, argv: list[str]) -> str:
    out = tmp_path / "refused"
    with pytest.raises(SystemExit) as e:
        qr.main([*argv, "--out", str(out), "--quiet"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("lightning-qlora-quant-report: error: ")
    assert not out.exists()  # nothing written
    return err


def test_eval_data_errors_are_one_line(tmp_path, capsys, saved_tiny):
    model = ["--model", str(saved_tiny)]
    missing = tmp_path / "nope.jsonl"
    assert f"data file not found: {missing}" in _refused(
        capsys, tmp_path, [*model, "--eval-data", str(missing)]
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{not json\n')
    assert f"{bad}, line 2: malformed JSON" in _refused(capsys, tmp_path, [*model, "--eval-data", str(bad)])
    odd = tmp_path / "rows.xml"
    odd.write_text("<rows/>")
    assert "unsupported data file" in _refused(capsys, tmp_path, [*model, "--eval-data", str(odd)])
    cols = write_jsonl(tmp_path / "cols.jsonl", [{"question": "q", "answer": "a"}])
    assert "cannot detect the data format" in _refused(capsys, tmp_path, [*model, "--eval-data", str(cols)])
    ok = write_jsonl(tmp_path / "ok.jsonl", _rows(4))
    err = _refused(capsys, tmp_path, ["--eval-data", str(ok)])
    assert "--eval-data needs a model" in err
    err = _refused(capsys, tmp_path, ["--model", str(tmp_path), "--eval-data", str(ok)])
    assert "no config.json there" in err
    err = _refused(capsys, tmp_path, [*model, "--eval-data", str(ok), "--eval-tokens", "0"])
    assert "--eval-tokens must be at least 1, got 0" in err


def test_a_block_wider_than_a_layer_is_refused_before_evaluating(tmp_path, capsys, saved_tiny):
    ok = write_jsonl(tmp_path / "ok.jsonl", _rows(4))
    err = _refused(
        capsys, tmp_path, ["--model", str(saved_tiny), "--eval-data", str(ok), "--blocksizes", "64,128"]
    )
    assert (
        "--blocksizes 128 is larger than the input width (64) of layer 'model.layers.0.self_attn.q_proj'"
        in err
    )
    assert "use block sizes up to 64" in err
    # and before a study trains for minutes
    err = _refused(capsys, tmp_path, ["--recipe", "default", "--train-first", "--blocksizes", "512"])
    assert "--blocksizes 512 is larger than the narrowest layer input (256)" in err


def test_a_tokenizer_beyond_the_model_vocabulary_is_refused(tmp_path, capsys):
    path = tmp_path / "small-vocab"
    AutoModelForCausalLM.from_config(tiny_llama_config(vocab_size=64)).save_pretrained(path)
    ok = write_jsonl(tmp_path / "ok.jsonl", _rows(4))
    err = _refused(capsys, tmp_path, ["--model", str(path), "--eval-data", str(ok), "--tokenizer", "byte"])
    assert "beyond the model's vocabulary of 64" in err
    err = _refused(capsys, tmp_path, ["--model", str(path), "--eval-data", str(ok)])
    assert "has no usable tokenizer" in err and "--tokenizer byte" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--eval-tokens", "100"], "--eval-tokens applies to the quality study"),
        (["--random-llama", "--train-steps", "5"], "--train-steps applies to a study that trains first"),
        (["--train-first"], "--train-first fits a recipe's model: add --recipe NAME"),
        (["--tiny"], "--tiny shrinks the --stdlib-llama study"),
        (["--stdlib-llama", "--random-llama"], "--stdlib-llama trains its own model"),
        (
            ["--recipe", "default", "--train-first", "--lora-formats", "int4_absmax"],
            "--lora-formats 'int4_absmax'",
        ),
        (["--recipe", "default", "--train-first", "--lora-steps", "-1"], "--lora-steps must be at least 0"),
        (["--random-llama", "lora.r=4"], "Hydra overrides lora.r=4 apply to --recipe or --stdlib-llama only"),
        (["--recipe", "default", "--train-first", "lora.rank=4"], "unknown config key 'lora.rank'"),
        (["--recipe", "default", "--train-first", "--dtype", "int8"], "--dtype='int8' is not a dtype"),
        (
            ["--recipe", "default", "--train-first", "--device", "tpu"],
            "--device tpu is not a device; use auto, cpu or cuda",
        ),
    ],
)
def test_flags_that_would_be_ignored_or_are_out_of_range_are_refused(tmp_path, capsys, argv, message):
    assert message in _refused(capsys, tmp_path, argv)


# --------------------------------------------------------------------------------------------
# The standard-library study
# --------------------------------------------------------------------------------------------


def test_stdlib_corpus_holds_out_whole_files_in_chunks_that_fit(tmp_path):
    plan = stdlib.STDLIB_PLANS["tiny"]
    stats = stdlib.build_stdlib_corpus(tmp_path, plan)
    assert stats["files"] == stats["train_files"] + stats["val_files"] and stats["val_files"] > 0
    assert plan.corpus_bytes <= stats["bytes"] < plan.corpus_bytes + 2_000_000
    assert stats["val_bytes"] >= plan.corpus_bytes // 20
    root, files = stdlib.stdlib_files()
    assert all("site-packages" not in p.parts for p in files)
    for split in ("train", "val"):
        chunks = [json.loads(line)["text"] for line in (tmp_path / f"{split}.jsonl").read_text().splitlines()]
        assert chunks and all(0 < len(c) <= stats["chunk_chars"] for c in chunks)
    val_text = (tmp_path / "val.jsonl").read_text()
    # a held-out file's first chunk is in val, never in train
    held = next(
        p for p in files if stdlib.is_held_out(p.relative_to(root).as_posix()) and p.read_text().strip()
    )
    first = json.dumps({"text": stdlib._chunks(held.read_text(), stats["chunk_chars"])[0]})
    assert first in val_text and first not in (tmp_path / "train.jsonl").read_text()


def test_stdlib_plan_is_the_default_recipe_and_user_overrides_win(tmp_path):
    out = tmp_path / "it's here"  # a quote and a space: paths are quoted in the overrides
    cfg = stdlib.stdlib_config(
        out, stdlib.STDLIB_PLANS["full"], torch.device("cpu"), ["data.max_length=1024"]
    )
    assert cfg.data.max_length == 1024  # the user's
    assert cfg.data.batch_size == 32 and cfg.optimizer.lr == 1e-3  # the plan's
    assert cfg.data.path == str(out / "data" / "train.jsonl") and cfg.model.tokenizer == str(
        out / "tokenizer"
    )
    assert dict(cfg.model.from_config) == stdlib.STDLIB_LLAMA
    # ~100M parameters: 12 layers of 4 x 768^2 + 3 x 768 x 2048, and two 8192 x 768 embeddings
    linear = 12 * (4 * 768 * 768 + 3 * 768 * 2048)
    assert 95e6 < linear + 2 * 8192 * 768 + 25 * 768 < 100e6


@pytest.mark.slow
def test_stdlib_llama_tiny_runs_end_to_end(tmp_path):
    out = tmp_path / "stdlib"
    argv = ["--stdlib-llama", "--tiny", "--train-steps", "4", "--lora-steps", "1", "--eval-tokens", "256"]
    argv += ["--formats", "nf4,int4_absmax", "--blocksizes", "64", "--samples", "4096"]
    assert qr.main([*argv, "--out", str(out), "--quiet"]) == 0
    record = json.loads((out / "quality.json").read_text())
    assert record["corpus"]["files"] > 0 and record["corpus"]["tokenizer"]["vocab_size"] == 1024
    assert record["data"]["format"] == "text" and record["quality"]["eval_set"]["loss_on"] == "every token"
    assert record["train"]["steps"] == 4 and len(record["recovery"]) == 2
    assert [r["format"] for r in record["quality"]["rows"]] == ["none", "nf4", "int4_absmax"]  # as given
    for name in ("report.md", "quality.csv", "quality_vs_bits.png"):
        assert (out / name).is_file()
