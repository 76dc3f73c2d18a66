"""`cells predict` and `cells compare`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from parity.predictor import to_torch_predictor
from scripts.checkpoint import load_checkpoint
from scripts.data import make_dataset
from tests.cli.conftest import SMALL


def test_predict_forecasts_from_a_checkpoint_like_the_torch_module(invoke, small_csv, tmp_path):
    assert invoke("train", "--arch", "lstm", "--data", small_csv, *SMALL, "--out", "run")[0] == 0
    code, output = invoke("predict", "--checkpoint", "run", "--future", "12", "--out", "forecast")
    assert code == 0, output
    forecast = np.load(tmp_path / "forecast" / "forecast.npy")
    assert (tmp_path / "forecast" / "forecast.png").is_file()
    # oracle: the torch.nn predictor built from the checkpoint's params, on the same (standardized) test input
    checkpoint = load_checkpoint(tmp_path / "run")
    data = make_dataset(str(small_csv), future=12, stats=checkpoint.data_stats)
    with torch.no_grad():
        expected = to_torch_predictor("lstm", checkpoint.params)(data.test_input, future=12)
    assert forecast.shape == (data.test_input.shape[0] + 12, 3)
    np.testing.assert_allclose(forecast, data.to_original(expected), rtol=1e-10, atol=1e-12)


def test_predict_on_other_data_uses_the_training_statistics(invoke, small_csv, tmp_path):
    assert invoke("train", "--arch", "gru", "--data", small_csv, *SMALL, "--out", "run")[0] == 0
    other = tmp_path / "other.npy"
    np.save(other, np.sin(np.arange(80) / 3.0))
    code, output = invoke("predict", "--checkpoint", "run", "--future", "10", "--data", other)
    assert code == 0, output
    assert np.load(tmp_path / "run" / "forecast.npy").shape == (80 - 10 - 1 + 10, 1)


def test_compare_reports_agreement_and_writes_the_overlay(invoke, small_csv, tmp_path):
    code, output = invoke("compare", "--arch", "gru", "--data", small_csv, "--hidden", "4", "--future", "8", "--steps", "2", "--out", "cmp")
    assert code == 0, output
    assert (tmp_path / "cmp" / "compare.png").is_file()
    functional = json.loads((tmp_path / "cmp" / "functional" / "metrics.json").read_text())["history"]
    reference = json.loads((tmp_path / "cmp" / "torch" / "metrics.json").read_text())["history"]
    assert len(functional) == len(reference) == 2
    assert functional[0]["train_loss"] == pytest.approx(reference[0]["train_loss"], rel=1e-8)
    assert "first-step train loss agrees" in output
