"""What users run holds no more memory than what the benchmark measures (GPU only).

The app (``lightning-qlora`` on a 1B-architecture checkpoint, the shipped data packed to 2048 tokens,
4 rows a step) and the benchmark's ``ours`` mode (the same module and plugin, random tokens) train the
same shapes; their peaks must agree within 10%.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_gpu_app_peak_matches_the_benchmark_on_1b_shapes(tmp_path):
    from lightning_qlora.bench import main as bench_main
    from lightning_qlora.bench import prepare_checkpoint

    checkpoint = tmp_path / "1b"
    prepare_checkpoint("1b", checkpoint, torch.device("cuda", 0))
    torch.cuda.empty_cache()
    results = tmp_path / "bench.json"
    bench_main(["--models", "1b", "--modes", "ours", "--steps", "4", "--warmup", "2",
                "--cache", str(tmp_path), "--json", str(results)])  # fmt: skip
    bench_peak = json.loads(results.read_text())[0]["peak_gib"]

    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    app = subprocess.run(
        [sys.executable, "-m", "lightning_qlora.train", "--config-name", "llama32_1b_alpaca",
         f"model.name_or_path={checkpoint}", "model.tokenizer=byte", "model.activation_checkpointing=full",
         "data=tiny_instruct", "data.max_length=2048", "data.packing=true", "data.batch_size=4",
         "trainer.max_steps=6", "trainer.val_check_interval=null", "trainer.limit_val_batches=0",
         "trainer.accumulate_grad_batches=1", "logger=csv", "callbacks.checkpoint=false", "save_adapter=false",
         f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert app.returncode == 0, app.stderr[-2000:]
    app_peak = float(re.search(r"peak GPU memory ([0-9.]+) GiB", app.stdout).group(1))
    assert app_peak == pytest.approx(bench_peak, rel=0.10), f"app {app_peak} GiB, bench {bench_peak} GiB"
