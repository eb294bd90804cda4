"""More than one process on this host, CPU and gloo, through Lightning's own DDP strategy.

- 2 processes train exactly like 1 process at the same global batch, and all-reduce only the adapters'
  gradients (the CPU twin of ``test_gpu_multi.py``).
- 2 "nodes" x 1 process, each node a ``torchrun --nnodes=2 --node_rank=N`` on localhost
  (``Trainer(devices=1, num_nodes=2)``, Lightning's TorchElasticEnvironment), end with the same adapters,
  bit for bit, as 1 node x 2 processes (``devices=2``, Lightning's own launcher).
- ``lightning-qlora trainer=ddp trainer.devices=2 trainer.accelerator=cpu`` trains end to end.
- The bench's table of 1 and 2 processes reports the scaling against the 1-process row (the runs
  themselves: ``test_bench.py``).

Every run is its own process group with a deadline; the first failure kills them all.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import micro_overrides
from multi_worker import (
    check_only_adapters_reduced,
    check_same_training,
    free_port,
    read_ranks,
    start,
    torchrun_cmd,
    wait_all,
    worker_cmd,
)
from tiny import save_tiny_llama

R = 4
STEPS = 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """All at once: 1 process x batch 8; 1 node x 2 processes x batch 4; 2 torchrun nodes x 1 process x batch 4."""
    root = tmp_path_factory.mktemp("multi")
    checkpoint = root / "tiny-llama"
    save_tiny_llama(checkpoint)
    common = ["--accelerator", "cpu", "--steps", str(STEPS), "--lora-r", str(R)]
    dirs = {name: root / name for name in ("one", "devices2", "nodes2")}
    port = free_port()
    node_args = [
        str(checkpoint),
        str(dirs["nodes2"]),
        "--devices",
        "1",
        "--num-nodes",
        "2",
        "--batch",
        "4",
        *common,
    ]
    cmds = {
        "1 process": (worker_cmd(checkpoint, dirs["one"], "--devices", "1", "--batch", "8", *common), dirs["one"]),
        "1 node x 2": (worker_cmd(checkpoint, dirs["devices2"], "--devices", "2", "--batch", "4", *common),
                       dirs["devices2"]),
        "node 0": (torchrun_cmd(0, 2, port, *node_args), dirs["nodes2"]),
        "node 1": (torchrun_cmd(1, 2, port, *node_args), dirs["nodes2"]),
    }  # fmt: skip
    procs = {}
    for name, (cmd, out) in cmds.items():
        log = out / f"log-{name.replace(' ', '_')}.txt"
        procs[name] = (start(cmd, log), log)
    wait_all(procs, timeout=600)
    config = json.loads((checkpoint / "config.json").read_text())
    return {
        "one": read_ranks(dirs["one"], 1)[0],
        "devices2": read_ranks(dirs["devices2"], 2),
        "nodes2": read_ranks(dirs["nodes2"], 2),
        "dirs": dirs,
        "config": config,
    }


@pytest.mark.slow
def test_two_processes_train_like_one_at_the_same_global_batch(runs):
    # fp32 on CPU: measured 1e-7; a rank that trained other rows, or a sum in place of a mean, is 1e-3 off.
    for line in check_same_training(
        runs["one"], runs["devices2"], loss_rtol=1e-5, grad_rtol=1e-5, grad_steps=STEPS
    ):
        print(f"[2 processes, CPU] {line}")


@pytest.mark.slow
def test_ddp_all_reduces_only_the_adapter_gradients(runs):
    print(f"[2 processes, CPU] {check_only_adapters_reduced(runs['devices2'], runs['config'], R)}")


@pytest.mark.slow
def test_two_torchrun_nodes_end_like_one_node_with_two_processes(runs):
    import torch

    nodes, local = runs["nodes2"], runs["devices2"]
    assert [(r["node_rank"], r["local_rank"]) for r in nodes] == [(0, 0), (1, 0)]
    assert {r["environment"] for r in nodes} == {"TorchElasticEnvironment"}
    assert [(r["node_rank"], r["local_rank"]) for r in local] == [(0, 0), (0, 1)]
    for node, proc in zip(nodes, local, strict=True):  # same global rank: same rows, losses, adapters
        assert node["rows"] == proc["rows"] and node["losses"] == proc["losses"]
        assert node["digest"] == proc["digest"]
    for rank in range(2):
        a = torch.load(runs["dirs"]["nodes2"] / f"rank{rank}.pt")
        b = torch.load(runs["dirs"]["devices2"] / f"rank{rank}.pt")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert nodes[0]["digest"] != runs["one"]["initial_digest"], "the adapters trained"
    print(
        f"[2 nodes x 1, torchrun] adapters equal, bit for bit, to 1 node x 2 (sha256 {nodes[0]['digest'][:16]})"
    )


@pytest.mark.slow
def test_the_app_trains_with_trainer_ddp_on_two_cpu_processes(run_cli, tmp_path):
    proc = run_cli("trainer=ddp", *micro_overrides(), "trainer.devices=2", timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Starting with 2 processes" in out, "Lightning did not start 2 ranks"
    assert "Traceback" not in out, out[-3000:]
    assert out.count("lightning-qlora: finished 3 steps") == 1, "rank 0 alone prints the summary"
    # Lightning relaunches rank 1 with rank 0's hydra.run.dir: one run directory, written by both.
    run_dirs = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(run_dirs) == 1, run_dirs
    run_dir = run_dirs[0]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "train_ddp_process_1.log").is_file(), sorted(p.name for p in run_dir.iterdir())
    assert re.search(r"adapter\s+" + re.escape(str(run_dir / "adapter")), proc.stdout)


def test_bench_table_reports_scaling_against_the_one_device_row():
    from lightning_qlora.bench import Result, scaling_efficiency, table

    def row(mode: str, devices: int, tps: float) -> Result:
        return Result("1b", mode, 8192 * devices, tps, 0.2, 4.0, 3.0, 1.0, 12.0, 11.0, batch=4,
                      checkpointing="full", devices=devices)  # fmt: skip

    rows = [row("ours", 1, 36000), row("ours", 2, 70000), row("peft", 1, 30000), row("peft", 2, 50000)]
    assert scaling_efficiency(rows[1], rows) == pytest.approx(70000 / 72000)
    lines = table(rows).splitlines()
    assert len({line.count("|") for line in lines}) == 1, "every row has the header's columns"
    assert lines[3].startswith("| 1b | ours | 2 | 4 | full | 70,000 | 1.40x | 97% | 0.200 | 4.00 |"), lines[3]
    assert lines[4].startswith("| 1b | peft | 1 | 4 | full | 30,000 | 1.00x |  |"), lines[4]
    # One device: the table of before, column for column.
    assert table(rows[:1]).splitlines()[0] == (
        "| model | mode | batch | checkpointing | tokens/s | vs peft | step s | peak GiB | vs peft | load s | "
        "load peak GiB | loss first→last |"
    )


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--devices", "0"], "--devices='0' must be a number of GPUs (>= 1)"),
        (["--devices", "2", "--max-memory-gib", "40"], "--max-memory-gib measures one GPU"),
    ],
)
def test_bench_refuses_what_it_cannot_measure(argv, expected, capsys):
    from lightning_qlora.bench import main

    with pytest.raises(SystemExit):
        main(["--cpu", *argv])
    assert expected in capsys.readouterr().err


def test_bench_kills_a_job_past_its_deadline_with_every_process_it_started(tmp_path):
    from lightning_qlora.bench import main

    results = tmp_path / "bench.json"
    with pytest.raises(SystemExit):  # failed rows: exit code 1, after the table is written
        main(["--cpu", "--devices", "2", "--modes", "ours", "--job-timeout", "3", "--cache", str(tmp_path),
              "--json", str(results)])  # fmt: skip
    rows = json.loads(results.read_text())
    assert [r["devices"] for r in rows] == [1, 2]
    assert all("timed out after 3 s" in r["error"] for r in rows), [r["error"] for r in rows]
    left = [p for p in Path("/proc").glob("[0-9]*") if _cmdline_mentions(p, str(tmp_path))]
    assert not left, [p.name for p in left]


def _cmdline_mentions(proc_dir: Path, text: str) -> bool:
    try:
        return text in (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
