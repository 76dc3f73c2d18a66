"""The README's "Bad input" rows not covered by test_bad_input.py: one line on stderr, exit code 2, nothing saved is lost."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from scripts.checkpoint import CHECKPOINT, load_checkpoint
from tests.cli.conftest import SMALL


def one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    return lines[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--future", "10000000"], "--future: expected an int in [0, 100000], got 10000000"),
        (["--lr", "inf"], "--lr: expected a finite number >= 0, got inf"),
        (["--seed", "-1"], "--seed: expected an int in [0, 2**32 - 1] (numpy's seed range), got -1"),
        (["--seed", str(2**32)], f"--seed: expected an int in [0, 2**32 - 1] (numpy's seed range), got {2**32}"),
        (["--device", "bogus"], "--device bogus: expected cpu, cuda, cuda:N or auto"),
        (["--test-series", "6"], "--test-series: expected 1 <= N < 6 (the number of series), got 6"),
    ],
    ids=["future-1e7", "lr-inf", "seed-negative", "seed-2**32", "device-bogus", "test-series"],
)
def test_bad_option_is_one_line_and_writes_nothing(invoke, small_csv, tmp_path, args, message):
    options = [*SMALL, *args] if "--future" not in args else ["--hidden", "4", "--steps", "1", *args]
    code, output = invoke("train", "--arch", "gru", "--data", small_csv, *options, "--out", "run")
    assert code == 2 and one_error_line(output) == f"error: {message}", output
    assert not (tmp_path / "run").exists()


def test_nan_lr_is_a_usage_error(invoke, small_csv, tmp_path):
    """Typer's own range check refuses nan (its usage box, exit 2) before ours sees it."""
    code, output = invoke("train", "--arch", "gru", "--data", small_csv, *SMALL, "--lr", "nan", "--out", "run")
    assert code == 2 and "Invalid value for '--lr'" in output and not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_device_without_cuda(invoke, small_csv):
    code, output = invoke("train", "--arch", "gru", "--data", small_csv, *SMALL, "--device", "cuda")
    assert code == 2 and one_error_line(output) == "error: --device cuda: CUDA is not available on this machine; use --device cpu or auto"


def test_predict_future_1e7_and_bad_device(invoke, small_csv, tmp_path):
    assert invoke("train", "--arch", "gru", "--data", small_csv, *SMALL, "--out", "run")[0] == 0
    code, output = invoke("predict", "--checkpoint", "run", "--future", "10000000")
    assert code == 2 and one_error_line(output) == "error: --future: expected an int in [0, 100000], got 10000000"
    code, output = invoke("predict", "--checkpoint", "run", "--device", "bogus")
    assert code == 2 and one_error_line(output) == "error: --device bogus: expected cpu, cuda, cuda:N or auto"
    assert not (tmp_path / "run" / "forecast.npy").exists()


@pytest.mark.slow
def test_the_largest_future_runs_in_bounded_memory(invoke, small_csv, tmp_path):
    """--future 100000 (the limit) works: the forecast is (known + 100000, series) and nothing grows beyond it."""
    assert invoke("train", "--arch", "rnn_tanh", "--data", small_csv, "--hidden", "2", "--layers", "1", "--future", "8", "--steps", "1", "--out", "run")[0] == 0
    code, output = invoke("predict", "--checkpoint", "run", "--future", "100000")
    assert code == 0, output
    forecast = np.load(tmp_path / "run" / "forecast.npy")
    assert forecast.shape == (39 + 100000, 3) and np.isfinite(forecast).all()


def write(path: Path, content: bytes | str) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


DATA_CASES = {
    "csv nan": ("nan.csv", "t0,t1,t2,t3\n1,2,3,4\n5,6,nan,8\n", "line 3, column 3: non-finite value 'nan'; expected finite numbers"),
    "csv inf": ("inf.csv", "1,2,3,4\n5,-inf,7,8\n", "line 2, column 2: non-finite value '-inf'; expected finite numbers"),
    "npy inf": ("inf.npy", None, "non-finite value inf at row 2, column 1"),
    "empty csv file": ("empty.csv", "", "the file holds no numbers"),
    "header only csv": ("header.csv", "a,b,c\n", "the file holds no numbers"),
    "empty npy file": ("empty.npy", b"", "not a readable .npy file"),
    "empty npy array": ("empty_array.npy", None, "the array is empty (shape (1, 0))"),
    "object npy (pickle)": ("objects.npy", None, "not a readable .npy file (Object arrays cannot be loaded when allow_pickle=False)"),
    "3-D npy": ("cube.npy", None, "expected a 1-D series or a 2-D array (one series per row), got 3-D shape (2, 2, 2)"),
    "complex npy": ("complex.npy", None, "expected real numbers, got dtype complex128"),
    "not UTF-8": ("latin1.csv", b"1,2,3\n\xff\xfe,4,5\n", "cannot read the file (UnicodeDecodeError"),
}


def make_data(tmp_path: Path, case: str) -> tuple[Path, str]:
    name, content, message = DATA_CASES[case]
    path = tmp_path / name
    if content is not None:
        write(path, content)
    elif case == "npy inf":
        np.save(path, np.array([[1.0, 2.0, 3.0], [np.inf, 1.0, 2.0]]))
    elif case == "empty npy array":
        np.save(path, np.zeros(0))
    elif case == "object npy (pickle)":
        np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    elif case == "3-D npy":
        np.save(path, np.zeros((2, 2, 2)))
    elif case == "complex npy":
        np.save(path, np.ones((2, 4), dtype=complex))
    return path, message


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_data_file(invoke, tmp_path, case):
    path, message = make_data(tmp_path, case)
    code, output = invoke("train", "--arch", "gru", "--data", path, *SMALL, "--out", "run")
    line = one_error_line(output)
    assert code == 2 and line.startswith(f"error: --data {path}: ") and message in line, output
    assert not (tmp_path / "run").exists()


def test_window_too_short_for_a_single_series(invoke, tmp_path):
    np.save(tmp_path / "one.npy", np.sin(np.arange(40.0)))
    code, output = invoke("train", "--arch", "gru", "--data", tmp_path / "one.npy", *SMALL, "--window", "2")
    assert code == 2 and one_error_line(output) == "error: --window: expected at least 3 points, got 2"


def test_disk_full_mid_run_keeps_the_last_checkpoint(invoke, small_csv, tmp_path, monkeypatch):
    """A write failing mid-run (here: ENOSPC from the second checkpoint) is one line, exit 2, and the first checkpoint stays."""
    import scripts.train as train_module

    original, calls = train_module.save_checkpoint, []

    def full_disk(directory, checkpoint):
        calls.append(checkpoint.step)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / CHECKPOINT))
        original(directory, checkpoint)

    monkeypatch.setattr(train_module, "save_checkpoint", full_disk)
    code, output = invoke("train", "--arch", "gru", "--data", small_csv, "--hidden", "4", "--future", "8", "--steps", "3", "--optimizer", "adam", "--out", "run")
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, output
    assert errors[0] == f"error: --out run: cannot write {Path('run') / CHECKPOINT} (No space left on device); the last saved checkpoint is kept"
    assert load_checkpoint(tmp_path / "run").step == 1


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_out_is_refused(invoke, small_csv, tmp_path):
    out = tmp_path / "locked"
    out.mkdir()
    out.chmod(0o500)
    try:
        code, output = invoke("train", "--arch", "gru", "--data", small_csv, *SMALL, "--out", out)
    finally:
        out.chmod(0o700)
    assert code == 2 and one_error_line(output) == f"error: --out {out}: the directory is not writable"
