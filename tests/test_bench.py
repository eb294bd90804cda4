"""The benchmark harness itself, on its tiny CPU configuration (its figures mean nothing)."""

import json

import pytest

from lightning_qlora.bench import main


@pytest.mark.slow
def test_cpu_harness_runs_each_mode_in_its_own_process_and_reports(tmp_path):
    report, results = tmp_path / "BENCH.md", tmp_path / "bench.json"
    main(
        [
            "--cpu",
            "--modes",
            "ours,ours16",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--cache",
            str(tmp_path),
            "--report",
            str(report),
            "--json",
            str(results),
        ]
    )
    rows = json.loads(results.read_text())
    assert [(r["model"], r["mode"]) for r in rows] == [("tiny", "ours"), ("tiny", "ours16")]
    for row in rows:
        assert not row["error"] and row["tokens_per_s"] > 0 and row["tokens_per_step"] == 128
        assert 0 < row["loss_last"] < 10
    text = report.read_text()
    assert "| tiny | ours | 2 | full | " in text and "command: python -m lightning_qlora.bench --cpu" in text


def test_unknown_model_or_mode_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--cpu", "--modes", "ours,fast"])
    assert "unknown mode 'fast'" in capsys.readouterr().err
