"""The benchmark harness itself, on its tiny CPU configuration (its figures mean nothing).

The end-to-end runs (``slow``) start the real jobs: ours through Lightning (1 process, DDP, FSDP2), the
PEFT + bitsandbytes reference (1 process, torch DDP and FSDP1 under torchrun: bitsandbytes' CPU backend
runs it), and the 70b path at the tiny size (a random 4-bit checkpoint written by the same function,
trained from by both stacks). The rest checks the parts on their own: the FLOP count against a count by
hand, the table's columns, the commands, the refusals.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from lightning_qlora.bench import (
    MODELS,
    Result,
    _run_job,
    build_parser,
    checkpoint_bytes,
    job_command,
    main,
    prepare_checkpoint,
    skip_reason,
    table,
)
from lightning_qlora.bench_common import batches
from lightning_qlora.bench_flops import flop_terms, flops_per_token, matmul_peak
from lightning_qlora.bench_ours import estimate_gib
from lightning_qlora.checkpoint4bit import is_4bit_checkpoint, read_4bit_checkpoint

CPU = torch.device("cpu")
# The tiny Llama's adapters (r=16 on q, k, v, o, gate, up, down of 2 layers), in fp32 bytes.
TINY_ADAPTER_BYTES = 2 * 16 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 3 * (64 + 128)) * 4


def parse_table(text: str) -> list[dict[str, str]]:
    """The markdown table in ``text`` as one dict per row (a repeated header gets ``#2``)."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|") and not ln.startswith("|---")]
    headers: list[str] = []
    for h in (c.strip() for c in lines[0].strip("|").split("|")):
        headers.append(h if h not in headers else f"{h}#2")
    return [
        dict(zip(headers, (c.strip() for c in ln.strip("|").split("|")), strict=True)) for ln in lines[1:]
    ]


def bench(tmp_path: Path, *argv: str) -> tuple[list[dict], list[dict[str, str]]]:
    """Runs the bench with ``argv`` on CPU, 2 timed steps; returns its JSON rows and its table's rows."""
    report, results = tmp_path / "BENCH.md", tmp_path / "bench.json"
    main(["--cpu", "--steps", "2", "--warmup", "1", "--cache", str(tmp_path), "--report", str(report),
          "--json", str(results), *argv])  # fmt: skip
    return json.loads(results.read_text()), parse_table(report.read_text())


@torch.no_grad()
def base_loss(directory: Path) -> float:
    """The loss of the checkpoint's own model (transformers, float32) on the bench's first batch: what both
    stacks' first step computes, their adapters' B being zero."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(directory), device_map="cpu", dtype=torch.float32
    )
    ids = batches("tiny-4bit", 1, CPU)[0]
    return float(model(input_ids=ids, labels=ids).loss)


# ------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_cpu_harness_runs_each_mode_in_its_own_process_and_reports(tmp_path):
    rows, cells = bench(tmp_path, "--modes", "ours,ours16", "--estimate")
    assert [(r["model"], r["mode"]) for r in rows] == [("tiny", "ours"), ("tiny", "ours16")]
    for row in rows:
        assert not row["error"] and row["tokens_per_s"] > 0 and row["tokens_per_step"] == 128
        assert 0 < row["loss_last"] < 10
        assert row["first_step_s"] > row["load_s"] > 0  # from the job's start: imports and loading included
        assert 0.1 < row["host_rss_gib"] < 8 and row["peak_reserved_gib"] == 0  # no GPU here
        assert row["flops_per_token"] == 901120 and 0 < row["peak_share"]
        assert row["est_gib"] > 0  # the memory model's estimate, from the shipped model's config
        assert row["grad_bytes"] is None  # one process: nothing communicated
    text = (tmp_path / "BENCH.md").read_text()
    assert "| tiny | ours | 2 | full | " in text and "command: python -m lightning_qlora.bench --cpu" in text
    assert "matrix products (float32 512^3), measured by this call: " in text
    ours = cells[0]
    assert ours["tokens/s"] == f"{rows[0]['tokens_per_s']:,.0f}"
    assert ours["% matmul peak"] == f"{rows[0]['peak_share']:.0%}"
    assert ours["first step s"] == f"{rows[0]['first_step_s']:.1f}"
    assert ours["reserved GiB"] == "0.00" and ours["est. GiB"] == f"{rows[0]['est_gib']:.2f}"
    assert ours["host RSS GiB"] == f"{rows[0]['host_rss_gib']:.2f}"
    assert "devices" not in ours and "grad MiB/step" not in ours and "strategy" not in ours


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], list[dict[str, str]], str]:
    """One call, as a user makes it: ``--cpu --devices 2 --strategy ddp,fsdp --modes ours,peft``: each mode on
    1 process, then 2 under each strategy (ours: Lightning's DDP / FSDP2Strategy, relaunched by Lightning;
    the reference: torch DDP / FSDP1 under torchrun, HF's FSDP-QLoRA recipe with bnb_4bit_quant_storage=bf16,
    which bitsandbytes' CPU backend runs)."""
    tmp_path = tmp_path_factory.mktemp("bench-two-processes")
    rows, cells = bench(tmp_path, "--devices", "2", "--strategy", "ddp,fsdp", "--modes", "ours,peft")
    return rows, cells, (tmp_path / "BENCH.md").read_text()


@pytest.mark.slow
def test_two_processes_give_a_row_per_mode_strategy_and_device_count(two_processes):
    rows, cells, text = two_processes
    assert [(r["mode"], r["devices"], r["strategy"]) for r in rows] == [
        ("ours", 1, ""), ("ours", 2, "ddp"), ("ours", 2, "fsdp"),
        ("peft", 1, ""), ("peft", 2, "ddp"), ("peft", 2, "fsdp"),
    ]  # fmt: skip
    for row in rows:
        assert not row["error"] and row["tokens_per_s"] > 0 and 0 < row["loss_last"] < 10
        # batch 2 x 64 tokens per process, summed over the ranks
        assert row["tokens_per_step"] == 128 * row["devices"], row
        assert row["first_step_s"] > 0 and row["host_rss_gib"] > 0
    for one, two in ((cells[0], cells[1]), (cells[3], cells[5])):
        assert (two["devices"], one["strategy"]) == ("2", "")
        assert two["scaling"].endswith("%") and one["scaling"] == ""
        assert one["grad MiB/step"] == "" and two["peak GiB/device"] == "0.00"
    assert cells[2]["strategy"] == "fsdp" and cells[4]["strategy"] == "ddp"
    assert "| devices |" in text and "| scaling |" in text


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode, strategy, expected",
    [
        ("ours", "ddp", TINY_ADAPTER_BYTES),  # Lightning's DDP: the comm hook sees the fp32 adapter buckets
        ("ours", "fsdp", TINY_ADAPTER_BYTES),  # FSDP2: reduce-scattered, nothing of the frozen 4-bit base
        ("peft", "ddp", TINY_ADAPTER_BYTES),  # torch DDP around the PEFT model: the same
        ("peft", "fsdp", TINY_ADAPTER_BYTES // 2),  # FSDP1 + bf16 MixedPrecision reduces in bf16
    ],
)
def test_a_two_process_job_measures_its_gradient_traffic(two_processes, mode, strategy, expected):
    rows, cells, _ = two_processes
    index, row = next((i, r) for i, r in enumerate(rows) if (r["mode"], r["strategy"]) == (mode, strategy))
    assert row["grad_bytes"] == expected and row["grad_bytes_measured"]
    assert cells[index]["grad MiB/step"] == f"{expected / 2**20:.2f}"


@pytest.mark.slow
def test_70b_path_at_tiny_size_writes_a_4bit_checkpoint_that_ours_trains_from(tmp_path):
    """``tiny-4bit`` is 70b's path: the checkpoint is written in 4-bit by write_random_4bit_checkpoint (no
    16-bit copy anywhere) and ours trains from it through the app (model.name_or_path); the 16-bit modes
    are listed as not run, which is no failure."""
    rows, cells = bench(tmp_path, "--models", "tiny-4bit", "--modes", "ours,ours16")
    directory = tmp_path / "tiny-4bit"
    assert is_4bit_checkpoint(directory)
    ckpt = read_4bit_checkpoint(directory)
    assert len(ckpt.layers) == 14  # every decoder linear layer is 4-bit in the file
    assert all(ckpt.tensors[f"{layer}.weight"].dtype == "U8" for layer in ckpt.layers)
    ours, ours16 = rows
    assert not ours["error"] and ours["tokens_per_s"] > 0 and 0 < ours["loss_last"] < 10
    assert ours["loss_first"] == pytest.approx(base_loss(directory), rel=1e-4)  # step 0: adapters add nothing
    assert ours16["error"].startswith("not run: tiny-4bit exists only as a 4-bit checkpoint")
    assert cells[1]["tokens/s"].startswith("not run:") and cells[0]["tokens/s"] != ""


@pytest.mark.slow
def test_70b_path_at_tiny_size_the_reference_loads_the_same_4bit_checkpoint(tmp_path):
    """The reference trains from the same directory through transformers' from_pretrained (as from a hub
    ``...-bnb-4bit`` checkpoint), to the first loss ours starts from on it."""
    args = build_parser().parse_args(["--cpu", "--steps", "2", "--warmup", "1"])
    prepare_checkpoint("tiny-4bit", tmp_path / "tiny-4bit", CPU)
    peft = _run_job(args, "tiny-4bit", "peft", tmp_path / "tiny-4bit")
    assert not peft.error, peft.error
    assert peft.loss_first == pytest.approx(
        base_loss(tmp_path / "tiny-4bit"), rel=1e-2
    )  # under bf16 autocast
    assert 0 < peft.loss_last < 10


# ------------------------------------------------------------------------------------------ the parts


def test_prepare_only_writes_the_checkpoints_and_runs_nothing(tmp_path, capsys):
    main(["--cpu", "--models", "tiny,tiny-4bit", "--prepare-only", "--cache", str(tmp_path)])
    assert is_4bit_checkpoint(tmp_path / "tiny-4bit")
    assert (tmp_path / "tiny" / "model.safetensors").is_file() and not is_4bit_checkpoint(tmp_path / "tiny")
    assert "checkpoint ready" in capsys.readouterr().out and not (tmp_path / "tiny" / "app-run").exists()


def test_flops_per_token_match_a_count_by_hand():
    # tiny: h 64, 4 heads x 16 (q 64), 2 KV heads (kv 32), MLP 128, 2 layers, vocab 256, r 16, seq 64
    linear = 2 * (64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128)  # 73,728 decoder weights
    adapters = 2 * 16 * (128 + 96 + 96 + 128 + 3 * 192)  # 32,768 adapter weights
    hand = {
        "linear": 6 * linear,  # forward, recompute, input gradient
        "head": 4 * 256 * 64,  # forward, input gradient
        "adapters": 8 * adapters,  # forward, recompute, input and weight gradients
        "attention": 16 * 2 * 64 * 64,  # 4 L s q a pass: forward, recompute, backward x 2
    }
    terms = flop_terms(MODELS["tiny"]["config"], 64)
    assert terms == {**hand, "total": sum(hand.values())} and terms["total"] == 901_120
    assert adapters * 4 == TINY_ADAPTER_BYTES
    # Llama-2-7B at 2048 tokens: the ~44 GFLOP per token the anchors bound the 7B step with.
    assert flops_per_token(MODELS["7b"]["config"], 2048) == pytest.approx(44.0e9, rel=1e-3)


def test_70b_is_the_llama2_70b_architecture_and_its_checkpoint_fits_the_gpu_machines_disk():
    config = transformers.LlamaConfig(**MODELS["70b"]["config"])
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == 68_976_648_192  # Llama-2-70B's parameter count
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # untied
    assert (MODELS["70b"]["batch"], MODELS["70b"]["seq"], MODELS["70b"]["four_bit"]) == (1, 2048, True)
    assert 33 < checkpoint_bytes("70b") / 2**30 < 35  # NF4 + double quant, 16-bit embeddings and head


def test_what_does_not_run_says_why():
    assert "16-bit weights are never written" in skip_reason("70b", "ours16")
    assert "16-bit weights are never written" in skip_reason("70b", "peft16")
    assert skip_reason("70b", "ours") is None and skip_reason("70b", "peft") is None
    assert "bnb_4bit_quant_storage" in skip_reason("70b", "peft", 2, "fsdp")
    assert skip_reason("70b", "ours", 2, "fsdp") is None and skip_reason("7b", "peft", 2, "fsdp") is None


def test_job_commands_start_ours_as_one_process_and_the_reference_under_torchrun(tmp_path):
    args = build_parser().parse_args(["--cpu", "--steps", "4", "--warmup", "2"])
    ours = job_command(args, "tiny", "ours", tmp_path, devices=2, strategy="fsdp")
    assert ours[1:3] == ["-m", "lightning_qlora.bench"]
    assert ours[-5:] == ["--cpu", "--devices", "2", "--strategy", "fsdp"]
    ref = job_command(args, "tiny", "peft", tmp_path, devices=4, strategy="fsdp")
    assert ref[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    assert ref[5:9] == ["-m", "lightning_qlora.bench", "--mode", "peft"]
    assert ref[-4:] == ["--devices", "4", "--strategy", "fsdp"]
    one = job_command(args, "tiny", "peft", tmp_path)
    assert "torch.distributed.run" not in one and "--devices" not in one
    # What the worker makes of the reference's command line.
    parsed = build_parser().parse_args(ref[7:])
    assert (parsed.mode, parsed.devices, parsed.strategy, parsed.steps, parsed.cpu) == (
        "peft",
        "4",
        "fsdp",
        4,
        True,
    )


def test_a_failed_job_keeps_its_whole_output_in_a_file_the_row_names(tmp_path, capsys):
    """The table keeps a failure's last lines; the whole stderr (the traceback of a rank) goes to a file."""
    args = build_parser().parse_args(["--cpu", "--steps", "1", "--warmup", "0"])
    row = _run_job(args, "tiny", "ours", tmp_path / "no-such-checkpoint")
    assert row.error and not row.tokens_per_s
    (log,) = tmp_path.glob("failed-*.log")
    assert log.name == "failed-no-such-checkpoint-ours.log" and str(log) in capsys.readouterr().out
    assert "Traceback" in log.read_text() and "no-such-checkpoint" in log.read_text()


def _row(mode: str, devices: int = 1, strategy: str = "", **kw) -> Result:
    return Result("7b", mode, 4096 * devices, 10000.0 * devices, 0.41, 6.0, 30.0, 4.0, 10.4, 10.3, batch=2,
                  checkpointing="full", devices=devices, strategy=strategy, **kw)  # fmt: skip


def test_table_shows_the_new_columns_only_where_measured():
    measured = dict(peak_reserved_gib=6.5, host_rss_gib=3.25, first_step_s=71.0, flops_per_token=44e9,
                    peak_share=0.587)  # fmt: skip
    rows = [
        _row("ours", est_gib=5.8, **measured),
        _row("peft", est_gib=None, **measured),
        _row("ours", 2, "ddp", grad_bytes=160 * 2**20, grad_bytes_measured=True, **measured),
        _row("ours", 2, "fsdp", grad_bytes=80 * 2**20, grad_bytes_measured=False, **measured),
        _row("peft16", 2, "fsdp", error="not run: a reason"),
        _row("peft", 2, "fsdp", error="out of memory"),
    ]
    text = table(rows, estimate=True)
    lines = text.splitlines()
    assert len({line.count("|") for line in lines}) == 1, "every row has the header's columns"
    cells = parse_table(text)
    ours, peft, ddp, fsdp, skipped, failed = cells
    assert ours["% matmul peak"] == "59%" and ours["first step s"] == "71.0"
    assert (
        ours["peak GiB/device"] == "6.00"
        and ours["reserved GiB"] == "6.50"
        and ours["host RSS GiB"] == "3.25"
    )
    assert ours["est. GiB"] == "5.80" and peft["est. GiB"] == ""  # the memory model models ours only
    assert ours["vs peft"] == "1.00x" and ours["vs peft#2"] == "1.00x"
    assert ddp["grad MiB/step"] == "160.00" and fsdp["grad MiB/step"] == "80.00*"  # *: counted
    assert ddp["scaling"] == "100%" and ddp["strategy"] == "ddp" and ours["grad MiB/step"] == ""
    assert skipped["tokens/s"] == "not run: a reason" and failed["tokens/s"] == "failed: out of memory"
    assert (skipped["devices"], skipped["strategy"]) == ("2", "fsdp")
    assert "est. GiB" not in parse_table(table(rows))[0]  # without --estimate
    broken = _row("ours", est_gib=None, **measured)
    assert parse_table(table([broken], estimate=True))[0]["est. GiB"] == "n/a"
    # Rows without the new measurements: the table of before, column for column.
    assert table([_row("ours")]).splitlines()[0] == (
        "| model | mode | batch | checkpointing | tokens/s | vs peft | step s | peak GiB | vs peft | load s | "
        "load peak GiB | loss first→last |"
    )


def test_memory_estimate_is_guarded():
    from lightning_qlora import LoRAConfig, QLoRAPrecision, QuantConfig

    plugin = QLoRAPrecision(quant=QuantConfig(compute_dtype="float32"), lora=LoRAConfig(r=16))
    config = transformers.LlamaConfig(**MODELS["7b"]["config"])
    est = estimate_gib(config, plugin, 2, 2048)
    assert 3 < est < 12  # the 7B QLoRA step with full checkpointing peaked at 6.05 GiB on an H200
    assert estimate_gib(object(), plugin, 2, 2048) is None  # a config it cannot read: n/a, not a crash
    fsdp = estimate_gib(config, plugin, 2, 2048, devices=2, strategy="fsdp")
    assert fsdp is None or fsdp < est  # per GPU where the memory model knows FSDP, else n/a


def test_matmul_peak_is_measured_on_the_device():
    flops, label = matmul_peak(CPU, n=64, iters=2)
    assert flops > 0 and label == "float32 64^3"


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--modes", "ours,fast"], "unknown mode 'fast'"),
        (["--models", "70b"], "--models 70b is a GPU model; with --cpu use tiny or tiny-4bit"),
        (["--strategy", "fsdp"], "--strategy fsdp splits work over several devices; add --devices N"),
        (
            ["--devices", "2", "--strategy", "ddp,zero3"],
            "'zero3' is not a strategy; use ddp, fsdp or ddp,fsdp",
        ),
    ],
)
def test_what_cannot_be_measured_is_refused(argv, expected, capsys):
    with pytest.raises(SystemExit):
        main(["--cpu", *argv])
    assert expected in capsys.readouterr().err
