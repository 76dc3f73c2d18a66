"""`cells train`: both imps for every arch, outputs, resume, user data, divergence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from functional import ARCHS
from parity.sru import sru_available
from scripts.checkpoint import load_checkpoint
from tests.cli.conftest import SMALL


def skip_without_sru(arch: str, imp: str) -> None:
    if arch == "sru" and imp == "torch" and not sru_available():
        pytest.skip("--imp torch for sru needs the optional sru package (pip install 'cells[sru]')")


def history(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "metrics.json").read_text())["history"]


@pytest.mark.parametrize("imp", ["functional", "torch"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_train_writes_plots_metrics_and_checkpoint(invoke, small_csv, tmp_path, arch, imp):
    skip_without_sru(arch, imp)
    code, output = invoke("train", "--arch", arch, "--imp", imp, "--data", small_csv, *SMALL)
    assert code == 0, output
    run_dir = tmp_path / "runs" / f"{arch}-{imp}"
    for name in ("predict0.png", "loss.png", "metrics.json", "checkpoint.safetensors", "checkpoint.json"):
        assert (run_dir / name).is_file(), name
    (entry,) = history(run_dir)
    assert entry["step"] == 0 and entry["evaluations"] >= 1
    assert np.isfinite(entry["train_loss"]) and np.isfinite(entry["test_loss"])
    checkpoint = load_checkpoint(run_dir)
    assert checkpoint.step == 1 and checkpoint.config["arch"] == arch and checkpoint.config["imp"] == imp


@pytest.mark.parametrize("arch", list(ARCHS))
def test_functional_and_torch_agree_on_the_first_step(invoke, small_csv, tmp_path, arch):
    skip_without_sru(arch, "torch")
    for imp in ("functional", "torch"):
        code, output = invoke("train", "--arch", arch, "--imp", imp, "--data", small_csv, *SMALL)
        assert code == 0, output
    functional, reference = (history(tmp_path / "runs" / f"{arch}-{imp}")[0] for imp in ("functional", "torch"))
    for key in ("train_loss", "test_loss"):
        assert functional[key] == pytest.approx(reference[key], rel=1e-8)


def test_resume_continues_to_the_same_losses_as_one_run(invoke, small_csv, tmp_path):
    options = ["--arch", "gru", "--data", small_csv, "--hidden", "4", "--future", "8"]
    assert invoke("train", *options, "--steps", "2", "--out", "whole")[0] == 0
    assert invoke("train", *options, "--steps", "1", "--out", "parts")[0] == 0
    code, output = invoke("train", "--resume", "parts", "--steps", "2")
    assert code == 0, output
    whole, parts = history(tmp_path / "whole"), history(tmp_path / "parts")
    assert [e["step"] for e in parts] == [0, 1]
    assert [e["train_loss"] for e in parts] == [e["train_loss"] for e in whole]
    assert load_checkpoint(tmp_path / "parts").step == 2


def test_resume_refuses_other_options(invoke, small_csv, tmp_path):
    assert invoke("train", "--arch", "gru", "--data", small_csv, *SMALL, "--out", "run")[0] == 0
    before = (tmp_path / "run" / "checkpoint.safetensors").read_bytes()
    code, output = invoke("train", "--resume", "run", "--arch", "lstm")
    assert code == 2 and "--arch lstm" in output and "gru" in output
    assert (tmp_path / "run" / "checkpoint.safetensors").read_bytes() == before


def test_existing_run_is_not_overwritten_without_overwrite(invoke, small_csv, tmp_path):
    assert invoke("train", "--arch", "gru", "--data", small_csv, *SMALL, "--out", "run")[0] == 0
    before = (tmp_path / "run" / "checkpoint.safetensors").read_bytes()
    code, output = invoke("train", "--arch", "lstm", "--data", small_csv, *SMALL, "--out", "run")
    assert code == 2 and "already holds a run" in output
    assert (tmp_path / "run" / "checkpoint.safetensors").read_bytes() == before
    code, output = invoke("train", "--arch", "lstm", "--data", small_csv, *SMALL, "--out", "run", "--overwrite")
    assert code == 0, output
    assert load_checkpoint(tmp_path / "run").config["arch"] == "lstm"


def test_single_series_holds_out_the_future_and_reports_forecast_loss(invoke, tmp_path):
    series = np.sin(np.arange(120) / 5.0) * 3.0 + 10.0  # not standardized: mean 10, amplitude 3
    np.save(tmp_path / "one.npy", series)
    code, output = invoke("train", "--arch", "lstm", "--data", tmp_path / "one.npy", "--window", "30", "--hidden", "4", "--future", "20", "--steps", "1", "--out", "one")
    assert code == 0, output
    (entry,) = history(tmp_path / "one")
    assert np.isfinite(entry["forecast_loss"])
    checkpoint = load_checkpoint(tmp_path / "one")
    mean, std = checkpoint.data_stats
    assert mean == pytest.approx(series[:100].mean()) and std == pytest.approx(series[:100].std())


def test_column_csv_is_a_single_series(invoke, tmp_path):
    values = np.cos(np.arange(60) / 4.0)
    (tmp_path / "column.csv").write_text("value\n" + "\n".join(f"{v}" for v in values) + "\n")
    code, output = invoke("train", "--arch", "rnn_tanh", "--data", tmp_path / "column.csv", "--window", "20", "--hidden", "3", "--future", "10", "--steps", "1", "--out", "col")
    assert code == 0, output
    assert "forecast_loss" in history(tmp_path / "col")[0]


def test_divergence_stops_with_a_hint_and_keeps_the_last_finite_checkpoint(invoke, small_csv, tmp_path, monkeypatch):
    from scripts import train as train_module

    real = train_module.FunctionalModel.loss_and_grad
    calls = {"count": 0}

    def nan_after_first_step(self, inputs, target):
        loss = real(self, inputs, target)
        calls["count"] += 1
        return loss * float("nan") if calls["count"] > 1 else loss

    monkeypatch.setattr(train_module.FunctionalModel, "loss_and_grad", nan_after_first_step)
    code, output = invoke("train", "--arch", "gru", "--data", small_csv, "--hidden", "4", "--future", "8", "--steps", "3", "--optimizer", "adam", "--out", "run")
    assert code == 1
    assert "step 1" in output and "diverged" in output and "--line-search strong_wolfe" in output and "--lr" in output
    checkpoint = load_checkpoint(tmp_path / "run")
    assert checkpoint.step == 1 and all(torch.isfinite(t).all() for t in checkpoint.params.values())


def test_a_real_blow_up_is_caught(invoke, small_csv, tmp_path):
    code, output = invoke("train", "--arch", "rnn_relu", "--data", small_csv, "--hidden", "8", "--future", "8", "--steps", "3", "--optimizer", "adam", "--lr", "1e12", "--out", "run")
    assert code == 1, output
    assert "diverged" in output
