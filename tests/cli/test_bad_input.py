"""Every bad input of the training commands: one clear line, a non-zero exit, nothing good overwritten."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.cli.conftest import SMALL


@pytest.mark.parametrize(
    ("option", "value", "choices"),
    [("--arch", "transformer", "rnn_tanh"), ("--imp", "jax", "functional"), ("--optimizer", "sgd", "lbfgs")],
)
def test_unknown_choice_is_a_usage_error_listing_the_choices(invoke, option, value, choices):
    args = ["train", option, value] + ([] if option == "--arch" else ["--arch", "gru"])
    code, output = invoke(*args)
    assert code == 2
    assert value in output and choices in output


def test_missing_arch_is_a_usage_error(invoke):
    code, output = invoke("train", "--steps", "1")
    assert code == 2 and "--arch" in output and "lstm" in output


def _bad_data(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    cases = {}
    path = tmp_path / "letters.csv"
    path.write_text("1,2,3,4\n5,6,x7,8\n")
    cases["non-numeric"] = (path, "line 2, column 3")
    path = tmp_path / "nan.npy"
    np.save(path, np.array([[1.0, 2.0, np.nan, 4.0], [1.0, 2.0, 3.0, 4.0]]))
    cases["nan"] = (path, "non-finite value nan at row 1, column 3")
    path = tmp_path / "short.npy"
    np.save(path, np.array([1.0, 2.0]))
    cases["short"] = (path, "at least 3 points, got 2")
    path = tmp_path / "ragged.csv"
    path.write_text("1,2,3\n4,5\n")
    cases["ragged"] = (path, "line 2 has 2 values, expected 3")
    path = tmp_path / "empty.csv"
    path.write_text("\n\n")
    cases["empty"] = (path, "holds no numbers")
    path = tmp_path / "broken.npy"
    path.write_bytes(b"\x93NUMPY garbage")
    cases["corrupt npy"] = (path, "not a readable .npy file")
    path = tmp_path / "table.json"
    path.write_text("[1, 2, 3]")
    cases["extension"] = (path, "expected a .csv or .npy file")
    cases["missing"] = (tmp_path / "nowhere.csv", "no such file")
    return cases


@pytest.mark.parametrize("case", ["non-numeric", "nan", "short", "ragged", "empty", "corrupt npy", "extension", "missing"])
def test_bad_data_file_gives_one_line_and_writes_nothing(invoke, tmp_path, case):
    path, message = _bad_data(tmp_path)[case]
    code, output = invoke("train", "--arch", "gru", "--data", path, *SMALL, "--out", "run")
    assert code == 2
    assert message in output and output.strip().count("\n") == 0, output
    assert not (tmp_path / "run").exists()


def test_bad_data_does_not_touch_an_existing_run(invoke, small_csv, tmp_path):
    assert invoke("train", "--arch", "gru", "--data", small_csv, *SMALL, "--out", "run")[0] == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    path, _ = _bad_data(tmp_path)["nan"]
    code, _ = invoke("train", "--arch", "gru", "--data", path, *SMALL, "--out", "run", "--overwrite")
    assert code == 2
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before


def test_negative_future_is_refused(invoke, small_csv):
    code, output = invoke("train", "--arch", "gru", "--data", small_csv, "--future", "-1", "--steps", "1")
    assert code == 2 and "--future" in output and "-1" in output


def test_future_longer_than_a_single_series_is_refused(invoke, tmp_path):
    np.save(tmp_path / "one.npy", np.arange(10.0))
    code, output = invoke("train", "--arch", "gru", "--data", tmp_path / "one.npy", "--future", "9", "--steps", "1")
    assert code == 2 and "--future 9" in output


def test_steps_zero_is_a_usage_error(invoke):
    code, output = invoke("train", "--arch", "gru", "--steps", "0")
    assert code == 2 and "--steps" in output


def test_unwritable_out_is_refused(invoke, small_csv, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, output = invoke("train", "--arch", "gru", "--data", small_csv, *SMALL, "--out", blocker / "run")
    assert code == 2 and "--out" in output and "cannot create" in output


def test_resume_without_checkpoint(invoke, tmp_path):
    (tmp_path / "empty").mkdir()
    code, output = invoke("train", "--resume", "empty")
    assert code == 2 and "no checkpoint here" in output


def test_corrupted_checkpoint_is_a_clear_error(invoke, small_csv, tmp_path):
    assert invoke("train", "--arch", "gru", "--data", small_csv, *SMALL, "--out", "run")[0] == 0
    path = tmp_path / "run" / "checkpoint.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    for args in (("predict", "--checkpoint", "run"), ("train", "--resume", "run", "--steps", "2")):
        code, output = invoke(*args)
        assert code == 2 and "not a readable cells checkpoint" in output, output


def test_checkpoint_of_another_arch_is_refused_by_predict(invoke, small_csv, tmp_path):
    """A checkpoint whose metadata says gru but whose tensors are an LSTM's: shapes are checked before use."""
    from scripts.checkpoint import load_checkpoint, save_checkpoint

    assert invoke("train", "--arch", "lstm", "--data", small_csv, *SMALL, "--out", "run")[0] == 0
    checkpoint = load_checkpoint(tmp_path / "run")
    checkpoint.config["arch"] = "gru"
    save_checkpoint(tmp_path / "run", checkpoint)
    code, output = invoke("predict", "--checkpoint", "run", "--future", "4")
    assert code == 2 and "cells.0.weight_ih" in output and "expected shape" in output
    assert not (tmp_path / "run" / "forecast.npy").exists()


def test_predict_negative_future(invoke, small_csv, tmp_path):
    assert invoke("train", "--arch", "gru", "--data", small_csv, *SMALL, "--out", "run")[0] == 0
    code, output = invoke("predict", "--checkpoint", "run", "--future", "-3")
    assert code == 2 and "--future" in output
