"""Same seed and options, same machine: two runs give bit-identical losses, forecasts and checkpoints (both imps)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from scripts.checkpoint import load_checkpoint


def history(directory: Path) -> list[tuple[float, float, int]]:
    entries = json.loads((directory / "metrics.json").read_text())["history"]
    return [(entry["train_loss"], entry["test_loss"], entry["evaluations"]) for entry in entries]


@pytest.mark.parametrize("imp", ["functional", "torch"])
def test_two_runs_are_bit_identical(invoke, small_csv, tmp_path, imp):
    options = ["--arch", "lstm", "--imp", imp, "--data", small_csv, "--hidden", "3", "--future", "8", "--steps", "1", "--seed", "3"]
    for out in ("first", "second"):
        code, output = invoke("train", *options, "--out", out)
        assert code == 0, output
    first, second = tmp_path / "first", tmp_path / "second"
    assert history(first) == history(second)  # exact float equality
    a, b = load_checkpoint(first), load_checkpoint(second)
    assert a.params.keys() == b.params.keys() and all(torch.equal(a.params[key], b.params[key]) for key in a.params)
    assert a.optimizer["state"][0]["prev_flat_grad"].tolist() == b.optimizer["state"][0]["prev_flat_grad"].tolist()


def test_another_seed_gives_other_losses(invoke, small_csv, tmp_path):
    """The equality above is not trivial: changing only the seed changes the losses."""
    options = ["--arch", "lstm", "--data", small_csv, "--hidden", "3", "--future", "8", "--steps", "1"]
    assert invoke("train", *options, "--seed", "3", "--out", "a")[0] == 0
    assert invoke("train", *options, "--seed", "4", "--out", "b")[0] == 0
    assert history(tmp_path / "a") != history(tmp_path / "b")
