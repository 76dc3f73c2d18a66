"""`cells train --ensemble K`: the vmapped run equals K single runs; CLI outputs, resume, predict, bad input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import functional
from scripts.checkpoint import load_checkpoint
from scripts.ensemble import run_ensemble
from scripts.train import TrainConfig, load_data, run

TOL = 1e-10
SMALL_ENSEMBLE = ["--hidden", "4", "--future", "8", "--steps", "2"]


def relative(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


@pytest.mark.parametrize("arch", list(functional.ARCHS))
def test_vmapped_ensemble_equals_single_runs(tmp_path: Path, small_csv: Path, arch: str):
    """Every member's Adam steps equal the single-model run with seed + k (float64)."""
    config = TrainConfig(arch=arch, optimizer="adam", lr=0.01, steps=2, hidden=4, future=8, data=str(small_csv), seed=5)
    data = load_data(config)
    (tmp_path / "ensemble").mkdir()
    ensemble = run_ensemble(config, 3, tmp_path / "ensemble", data=data)
    stacked = load_checkpoint(tmp_path / "ensemble").params
    for member in range(3):
        out = tmp_path / f"single{member}"
        out.mkdir()
        single = run(dataclasses.replace(config, seed=config.seed + member), out, data=data)
        for step in range(2):
            assert relative(ensemble.history[step]["train_loss"][member], single.history[step]["train_loss"]) <= TOL
            assert relative(ensemble.history[step]["test_loss"][member], single.history[step]["test_loss"]) <= TOL
        params = load_checkpoint(out).params
        for key, value in params.items():
            difference = (stacked[key][member] - value).abs().max().item()
            assert difference <= TOL * max(value.abs().max().item(), 1.0), f"member {member} {key}: {difference:.2e}"
        forecast = ensemble.predictions[member]
        assert np.abs(forecast - single.predictions).max() <= TOL * max(np.abs(single.predictions).max(), 1.0)


def test_train_ensemble_writes_band_plot_losses_and_checkpoint(invoke, small_csv: Path):
    code, output = invoke("train", "--arch", "gru", "--ensemble", "3", "--data", small_csv, "--out", "runs/e", *SMALL_ENSEMBLE)
    assert code == 0, output
    out = Path("runs/e")
    for name in ("ensemble.png", "loss.png", "metrics.json", "checkpoint.safetensors"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ensemble"] == 3 and metrics["seeds"] == [0, 1, 2] and metrics["config"]["optimizer"] == "adam"
    assert [len(entry["train_loss"]) for entry in metrics["history"]] == [3, 3]
    for member, seed in enumerate(metrics["seeds"]):
        assert f"│      {member} │    {seed} │" in output
    checkpoint = load_checkpoint(out)
    assert checkpoint.params["cells.0.weight_hh"].shape == (3, 12, 4) and checkpoint.step == 2


def test_resumed_ensemble_equals_an_uninterrupted_one(invoke, small_csv: Path):
    assert invoke("train", "--arch", "lstm", "--ensemble", "2", "--data", small_csv, "--out", "straight", *SMALL_ENSEMBLE[:-1], "3")[0] == 0
    assert invoke("train", "--arch", "lstm", "--ensemble", "2", "--data", small_csv, "--out", "split", *SMALL_ENSEMBLE[:-1], "1")[0] == 0
    code, output = invoke("train", "--resume", "split", "--steps", "3")
    assert code == 0, output
    straight, split = load_checkpoint(Path("straight")), load_checkpoint(Path("split"))
    assert [entry["train_loss"] for entry in split.history] == [entry["train_loss"] for entry in straight.history]
    for key in straight.params:
        assert torch.equal(split.params[key], straight.params[key]), key


def test_predict_from_an_ensemble_checkpoint(invoke, small_csv: Path):
    assert invoke("train", "--arch", "rnn_tanh", "--ensemble", "2", "--data", small_csv, "--out", "e", *SMALL_ENSEMBLE)[0] == 0
    code, output = invoke("predict", "--checkpoint", "e", "--future", "5")
    assert code == 0, output
    values = np.load(Path("e") / "forecast.npy")
    assert values.shape[0] == 2 and values.shape[2] == 3
    assert "2 members x" in output


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--ensemble", "0"], "error: --ensemble: expected an int >= 1 (members), got 0"),
        (["--ensemble", "-2"], "error: --ensemble: expected an int >= 1 (members), got -2"),
        (["--ensemble", "2", "--optimizer", "lbfgs"], "error: --ensemble 2 with --optimizer lbfgs: LBFGS's line search and curvature history span every tensor"),
        (["--ensemble", "2", "--imp", "torch"], "error: --ensemble 2 with --imp torch: ensembles are one torch.func.vmap over stacked params; torch.nn cells cannot be vmapped"),
    ],
)
def test_bad_ensemble_options_are_one_line_and_exit_2(invoke, small_csv: Path, options, message):
    code, output = invoke("train", "--arch", "gru", "--data", small_csv, *SMALL_ENSEMBLE, *options)
    assert code == 2
    assert output.strip().startswith(message), output
    assert len(output.strip().splitlines()) == 1
    assert not Path("runs").exists()


def test_resume_refuses_a_different_ensemble_size(invoke, small_csv: Path):
    assert invoke("train", "--arch", "gru", "--ensemble", "2", "--data", small_csv, "--out", "e", *SMALL_ENSEMBLE)[0] == 0
    code, output = invoke("train", "--resume", "e", "--ensemble", "3")
    assert code == 2
    assert "error: --ensemble 3: the checkpoint in e was trained with --ensemble 2; only --steps may change on --resume" in output
