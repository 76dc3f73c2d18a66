"""`cells gradflow`: runs every arch, writes the figure and the numbers the library computes; bad options exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import functional
from functional.gradflow import state_gradient_norms
from scripts.checkpoint import load_checkpoint
from scripts.data import make_dataset

SMALL = ["--hidden", "4", "--sequences", "2"]


def test_gradflow_all_archs_writes_plot_json_and_runs(invoke, small_csv: Path):
    code, output = invoke("gradflow", "--arch", "all", "--steps", "1", "--data", small_csv, "--out", "gf", *SMALL)
    assert code == 0, output
    out = Path("gf")
    assert (out / "gradflow.png").is_file()
    summary = json.loads((out / "gradflow.json").read_text())
    assert list(summary["archs"]) == list(functional.ARCHS)
    steps = summary["steps_T"]
    for arch, entry in summary["archs"].items():
        for when in ("init", "trained"):
            norms = entry[when]["state_gradient_norms"]
            assert len(norms) == 2 and len(norms[0]) == steps, (arch, when)
            assert len(entry[when]["jacobian_norms_median"]) == steps
        # the trained numbers are the library's, on the run's own checkpoint and data
        data = make_dataset(str(small_csv), test_series=3, window=100, future=0, dtype=torch.float64, device="cpu")
        params = load_checkpoint(out / arch).params
        want = state_gradient_norms(arch, params, data.train_input[:, :2], data.train_target[:, :2])
        assert torch.allclose(torch.tensor(entry["trained"]["state_gradient_norms"], dtype=torch.float64), want, rtol=1e-12, atol=0)
    assert "d=1" in output and "wrote gf/gradflow.png" in output


def test_gradflow_steps_zero_measures_init_only(invoke, small_csv: Path):
    code, output = invoke("gradflow", "--arch", "gru,lstm", "--steps", "0", "--data", small_csv, "--out", "gf", *SMALL)
    assert code == 0, output
    summary = json.loads(Path("gf/gradflow.json").read_text())
    assert list(summary["archs"]) == ["gru", "lstm"]
    assert all("trained" not in entry for entry in summary["archs"].values())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--arch", "transformer"], "error: --arch: expected 'all' or a comma list of rnn_tanh, rnn_relu, lstm, gru, sru, got 'transformer'"),
        (["--steps", "-1"], "error: --steps: expected an int >= 0, got -1"),
        (["--sequences", "0"], "error: --sequences: expected an int >= 1, got 0"),
        (["--dtype", "float16"], "error: --dtype: expected one of float64, float32, got 'float16'"),
    ],
)
def test_gradflow_bad_options_are_one_line_and_exit_2(invoke, small_csv: Path, options, message):
    code, output = invoke("gradflow", "--data", small_csv, "--out", "gf", *SMALL, *options)
    assert code == 2
    assert output.strip() == message


def test_gradflow_refuses_to_overwrite_runs(invoke, small_csv: Path):
    assert invoke("gradflow", "--arch", "gru", "--steps", "1", "--data", small_csv, "--out", "gf", *SMALL)[0] == 0
    code, output = invoke("gradflow", "--arch", "gru", "--steps", "1", "--data", small_csv, "--out", "gf", *SMALL)
    assert code == 2
    assert output.strip() == "error: --out gf: gf/gru already holds a run; pass --overwrite to replace it, or another --out"
    assert invoke("gradflow", "--arch", "gru", "--steps", "1", "--data", small_csv, "--out", "gf", "--overwrite", *SMALL)[0] == 0
