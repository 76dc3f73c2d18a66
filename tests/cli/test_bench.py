"""`cells bench` on tiny workloads: table and JSON structure, the agreement check, one-line errors. Never asserts on speed."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

import scripts.bench as bench_module
from scripts.bench import IMPLEMENTATIONS, PASSES, Workload

TINY = ["--sequences", "4", "--length", "10", "--reps", "3", "--hidden", "4"]
ROOT = Path(__file__).resolve().parents[2]


def test_tiny_run_prints_the_table_and_writes_the_json(invoke):
    code, output = invoke("bench", *TINY, "--arch", "lstm,gru", "--arch", "lstm", "--dtype", "float64", "--json", "bench.json")
    assert code == 0, output
    for header in ("machine:", "torch 2.", "fn grad", "cell f+b", "fused f+b", "grad /cell", "grad /fused", "targets: judged on the full workload only"):
        assert header in output
    report = json.loads(Path("bench.json").read_text())
    assert report["config"]["workload"] == {"sequences": 4, "length": 10}
    assert report["config"]["reps"] == 3 and report["config"]["threads"] == 1 and report["config"]["full_workload"] is False
    assert report["config"]["archs"] == ["lstm", "gru"] and report["config"]["hiddens"] == [4]
    assert {"platform", "cpu", "cores", "torch", "torch_threads"} <= report["machine"].keys() and report["machine"]["torch_threads"] == 1
    assert report["targets"] is None
    assert [(row["arch"], row["dtype"], row["hidden"]) for row in report["rows"]] == [("lstm", "float64", 4), ("gru", "float64", 4)]
    for row in report["rows"]:
        assert row["loss_relative_difference"] <= 1e-10 and row["grad_relative_difference"] <= 1e-8
        for imp in IMPLEMENTATIONS:
            for pass_ in PASSES:
                times = row["times_ms"][imp][pass_]
                assert len(times) == 3 and all(t > 0 for t in times)
                assert row["median_ms"][imp][pass_] == sorted(times)[1]
        for pass_ in PASSES:
            for base in ("cell_loop", "fused"):
                assert row["ratios"][pass_][base] == pytest.approx(row["median_ms"]["functional"][pass_] / row["median_ms"][base][pass_])
    assert torch.get_num_threads() == 1  # restored


def test_quick_defaults_and_targets_on_the_full_workload(invoke, monkeypatch):
    monkeypatch.setattr(bench_module, "QUICK", Workload(3, 6))
    code, output = invoke("bench", "--quick", "--arch", "rnn_tanh", "--dtype", "float32", "--json", "quick.json")
    assert code == 0, output
    config = json.loads(Path("quick.json").read_text())["config"]
    assert config["workload"] == {"sequences": 3, "length": 6} and config["hiddens"] == [51] and config["reps"] == 3 and config["quick"]

    monkeypatch.setattr(bench_module, "FULL", Workload(3, 6))  # the targets are judged on W only; shrink W
    code, output = invoke("bench", "--arch", "lstm,rnn_tanh", "--hidden", "4", "--reps", "3", "--json", "full.json")
    assert code == 0, output
    assert "issue 6 targets" in output and "targets: " in output and ("PASS" in output or "MISS" in output)
    targets = json.loads(Path("full.json").read_text())["targets"]
    expected = [("float32", "fused", 1.5), ("float64", "cell_loop", 0.5), ("float64", "fused", 1.0)]
    assert sorted((t["dtype"], t["baseline"], t["limit"]) for t in targets) == expected
    assert all(t["arch"] == "lstm" and t["pass"] == (t["ratio"] <= t["limit"]) for t in targets)


def test_disagreeing_implementations_abort_before_timing(invoke, monkeypatch):
    real = bench_module.to_torch_predictor

    def perturbed(arch, params):
        module = real(arch, params)
        with torch.no_grad():
            module.head.bias.add_(1e-3)
        return module

    monkeypatch.setattr(bench_module, "to_torch_predictor", perturbed)
    code, output = invoke("bench", *TINY, "--arch", "gru", "--dtype", "float64", "--json", "bench.json")
    assert code == 1
    lines = output.strip().splitlines()
    assert lines[-1].startswith("error: gru float64 hidden 4: cell_loop") and "differs from functional's" in lines[-1]
    assert "fn grad" not in output and not Path("bench.json").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--arch", "sru"], "--arch sru: expected one of rnn_tanh, rnn_relu, lstm, gru"),
        (["--arch", "lstm,transformer"], "--arch transformer: expected one of rnn_tanh, rnn_relu, lstm, gru"),
        (["--dtype", "float16"], "--dtype float16: expected one of float64, float32"),
        (["--hidden", "51,0"], "--hidden 0: expected an int >= 1"),
        (["--hidden", "big"], "--hidden big: expected an int >= 1"),
        (["--reps", "2"], "--reps 2: expected an int >= 3"),
        (["--threads", "0"], "--threads 0: expected an int >= 1"),
        (["--length", "1.5"], "--length 1.5: expected an int >= 1"),
        (["--json", "missing/bench.json"], "--json missing/bench.json: expected a file in an existing directory"),
    ],
)
def test_bad_option_is_one_line_and_exit_2(invoke, args, message):
    code, output = invoke("bench", *args)
    assert code == 2
    assert output.strip() == f"error: {message}"


def test_runs_as_a_script_with_the_same_options(monkeypatch, capsys):
    """`python scripts/bench.py ...` (run in-process: a fresh interpreter would spend seconds importing torch)."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "argv", ["scripts/bench.py", "--reps", "1"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "scripts" / "bench.py"), run_name="__main__")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --reps 1: expected an int >= 3"
