"""The evidence report's pipeline of benchmarks runs end to end (`svdiff bench --smoke`: benchmarks/report.py with
a few steps of everything) and writes a report with every section, its command and its JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from svdiff.world import BASE_DIRS

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_smoke_report(tmp_path):
    out = tmp_path / "report"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, "-m", "svdiff", "bench", "--smoke", "--out", str(out), "--runs", str(tmp_path / "runs")]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    sections = results["sections"]
    on_both = {"world", "single_subject", "layer_groups", "multi_subject", "edit", "combine"}
    expected = on_both | {"storage", "svd_engine", "step_flops", "train_methods", "compose"}
    if (BASE_DIRS["flow"] / "model_index.json").is_file():  # the flow base's sections beside the UNet's
        expected |= {f"{key}_flow" for key in on_both}
        assert "## Both bases side by side" in report
    assert set(sections) == expected
    for section in sections.values():
        assert f"`{section['command']}`" in report
    assert "smoke run" in report
    # Real figures, not placeholders: the tiny base's shift file is far smaller than its full checkpoint ...
    tiny = sections["storage"]["result"]["bases"]["tiny"]
    assert 0 < tiny["bytes_fp16"]["svdiff_all"] < tiny["bytes_fp16"]["full"] / 50
    # ... the trained methods really ran, and each picture the report shows exists.
    single = sections["single_subject"]["result"]["summary"]
    assert single["svdiff"]["bytes"] < single["lora"]["bytes"]
    for line in report.splitlines():
        if line.startswith("!["):
            assert (out / line.split("(", 1)[1].rstrip(")")).is_file(), line


def test_bench_outside_a_checkout_says_to_clone_and_run_make_bench(tmp_path, monkeypatch, capsys):
    from svdiff import cli, commands

    monkeypatch.setattr(commands, "CHECKOUT", tmp_path / "site-packages")  # from a wheel: no benchmarks/ beside
    assert cli.main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "clone the repository" in err and "make bench" in err
