"""Small data and a CliRunner for the `cells` command tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from scripts.cli import app

# tiny but real: 6 series of 40 points, 4 hidden units, short forecasts
SMALL = ["--hidden", "4", "--future", "8", "--steps", "1"]


@pytest.fixture
def small_csv(tmp_path: Path) -> Path:
    """Six noisy sine series (rows) of 40 points as CSV with a header line."""
    rng = np.random.default_rng(0)
    t = np.arange(40)
    series = np.sin(t[None, :] / 4 + rng.uniform(0, 6, size=(6, 1))) + 0.01 * rng.standard_normal((6, 40))
    path = tmp_path / "series.csv"
    header = ",".join(f"t{i}" for i in range(40))
    path.write_text(header + "\n" + "\n".join(",".join(f"{v:.6f}" for v in row) for row in series) + "\n")
    return path


@pytest.fixture
def invoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Run `cells ...` in-process from inside tmp_path; returns (exit code, stdout + stderr)."""
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def run(*args: str) -> tuple[int, str]:
        result = runner.invoke(app, [str(a) for a in args])
        output = result.output  # stdout and stderr interleaved
        if result.exception and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result.exit_code, output

    return run
