"""Interrupted runs: Ctrl-C saves the step boundary and exits 130; kill -9 at any moment leaves a loadable checkpoint;
resuming an interrupted run reproduces the uninterrupted run bit for bit."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from scripts.checkpoint import CHECKPOINT, CheckpointError, load_checkpoint, remove_stale_temps
from scripts.train import Interrupted, StepEvent, TrainConfig, run

ROOT = Path(__file__).resolve().parents[2]
STEPS = 2
_WHOLE: dict = {}  # (imp, optimizer) -> (uninterrupted RunResult, its directory), shared by the parametrized cases


@pytest.fixture
def series(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    t = np.arange(30)
    path = tmp_path / "series.npy"
    np.save(path, np.sin(t[None, :] / 4 + rng.uniform(0, 6, size=(5, 1))))
    return path


@pytest.fixture
def no_plots(monkeypatch):
    """The figures play no part in checkpoints or losses; skipping them keeps these runs fast."""
    monkeypatch.setattr("scripts.train.plot_forecast", lambda *args, **kwargs: None)
    monkeypatch.setattr("scripts.train.plot_losses", lambda *args, **kwargs: None)


def config_for(series: Path, imp: str, optimizer: str) -> TrainConfig:
    return TrainConfig(arch="gru", imp=imp, hidden=3, steps=STEPS, future=4, data=str(series), optimizer=optimizer, lr=0.8 if optimizer == "lbfgs" else 0.05)


def sigint_at(step: int, evaluation: int | None, presses: int = 1):
    """An on_event hook that sends this process SIGINT (a real Ctrl-C) at `evaluation` of `step`, or once `step` is saved (None)."""

    def on_event(event: StepEvent) -> None:
        if event.step == step and (event.done if evaluation is None else (not event.done and event.evaluations == evaluation)):
            for _ in range(presses):
                os.kill(os.getpid(), signal.SIGINT)

    return on_event


def losses(history):
    return [(entry["train_loss"], entry["test_loss"], entry["evaluations"]) for entry in history]


@pytest.mark.parametrize(
    ("imp", "optimizer", "step", "evaluation", "presses", "completed"),
    [
        ("functional", "lbfgs", 1, 3, 1, 1),  # mid-step: the partial LBFGS step is discarded
        ("torch", "lbfgs", 1, 3, 1, 1),
        pytest.param("functional", "lbfgs", 0, 1, 1, 0, marks=pytest.mark.slow),  # during the very first step: the initial state is saved
        pytest.param("functional", "lbfgs", 1, 2, 2, 1, marks=pytest.mark.slow),  # a second Ctrl-C stops the evaluation at once
        ("functional", "lbfgs", 0, None, 1, 1),  # after step 0 was saved: that step is kept
        ("functional", "adam", 0, 1, 1, 1),  # Adam's one evaluation per step: the step finishes, is saved, then the run stops
        ("torch", "adam", 0, 1, 2, 0),  # ... unless Ctrl-C is pressed twice
    ],
    ids=["functional-lbfgs-mid-step", "torch-lbfgs-mid-step", "first-step", "second-ctrl-c", "at-boundary", "functional-adam", "torch-adam-twice"],
)
def test_resume_after_ctrl_c_reproduces_the_uninterrupted_run(no_plots, series, tmp_path, tmp_path_factory, imp, optimizer, step, evaluation, presses, completed):
    config = config_for(series, imp, optimizer)
    if (imp, optimizer) not in _WHOLE:
        directory = tmp_path_factory.mktemp("whole")
        _WHOLE[imp, optimizer] = (run(config, directory), directory)
    whole, whole_dir = _WHOLE[imp, optimizer]
    (tmp_path / "parts").mkdir()

    with pytest.raises(Interrupted) as info:
        run(config, tmp_path / "parts", on_event=sigint_at(step, evaluation, presses))
    assert info.value.completed == completed
    message = str(info.value)
    assert "\n" not in message and f"state after {completed} completed step(s) is saved in {tmp_path / 'parts' / CHECKPOINT}" in message
    assert f"resume with: cells train --resume {tmp_path / 'parts'}" in message
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the run's handler is gone again

    saved = load_checkpoint(tmp_path / "parts")
    assert saved.step == completed and losses(saved.history) == losses(whole.history[:completed])
    assert not list((tmp_path / "parts").glob(".*.tmp"))
    resumed = run(config, tmp_path / "parts", resume_from=saved)
    assert losses(resumed.history) == losses(whole.history)  # exact float equality, every step
    final, reference = load_checkpoint(tmp_path / "parts"), load_checkpoint(whole_dir)
    assert final.params.keys() == reference.params.keys()
    assert all(torch.equal(final.params[key], reference.params[key]) for key in reference.params)
    assert np.array_equal(resumed.predictions, whole.predictions)


def test_ctrl_c_in_the_cli_exits_130_with_one_line(no_plots, invoke, series, tmp_path, monkeypatch):
    import scripts.train as train_module

    original = train_module.run

    def interrupted_run(*args, **kwargs):
        kwargs["on_event"] = sigint_at(1, 2)
        return original(*args, **kwargs)

    monkeypatch.setattr("scripts.train_command.run", interrupted_run)
    code, output = invoke("train", "--arch", "gru", "--data", series, "--hidden", "3", "--future", "4", "--steps", "3", "--out", "run")
    assert code == 130, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "interrupted during step 1 (that partial step is discarded)" in errors[0] and "resume with: cells train --resume run" in errors[0]
    assert load_checkpoint(tmp_path / "run").step == 1
    monkeypatch.setattr("scripts.train_command.run", original)
    code, output = invoke("train", "--resume", "run")
    assert code == 0, output
    assert load_checkpoint(tmp_path / "run").step == 3


def cells_command(*args) -> list[str]:
    return [sys.executable, "-m", "scripts.cli", *map(str, args)]


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"the run ended early: {process.communicate()}"
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.02)


def check_sigint(launch, series: Path, out: Path) -> None:
    """`cells train` in another process, a real SIGINT after its first checkpoint: exit code 130, one line on stderr, a loadable checkpoint."""
    args = ["train", "--arch", "gru", "--data", series, "--hidden", "3", "--future", "4", "--steps", "100000", "--optimizer", "adam", "--out", out]
    stderr_path = out.parent / "stderr.txt"
    process = launch([str(a) for a in args], stderr_path)
    try:
        wait_for(out / CHECKPOINT, process)
        time.sleep(random.Random(0).uniform(0.0, 0.3))
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=60)
    finally:
        process.kill()
    stderr = stderr_path.read_text()
    assert code == 130, stderr
    assert stderr.count("\n") == 1 and stderr.startswith("error: interrupted ") and f"resume with: cells train --resume {out}" in stderr, stderr
    saved = load_checkpoint(out)
    assert saved.step >= 1 and saved.step == len(saved.history)


def test_sigint_to_a_cells_process(series, tmp_path):
    check_sigint(lambda args, stderr: _Forked(args, stderr), series, tmp_path / "run")


@pytest.mark.slow
def test_sigint_to_a_real_cells_process(series, tmp_path):
    def launch(args, stderr_path):
        with open(stderr_path, "w") as stderr:
            return subprocess.Popen(cells_command(*args), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)

    check_sigint(launch, series, tmp_path / "run")


# --- kill -9 at random moments ---------------------------------------------------------------------------------


def _train_in_child(args: list[str], stderr_path: Path | None = None) -> int:
    """Fork a child that runs `cells <args>` (the real app, as the console script does); stdout discarded, stderr to a file.

    Forking skips the interpreter and torch start-up (seconds on a busy machine); the child exits with the app's exit code."""
    child = os.fork()
    if child == 0:
        code = 1
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            os.dup2(os.open(stderr_path or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
            sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
            from scripts.cli import app

            app(args)
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
        finally:
            sys.stderr.flush()
            os._exit(code)
    return child


def kill_repeatedly(out: Path, first: list[str], then: list[str], kills: int, seed: int, launch) -> list[int]:
    """Launch, SIGKILL at a random moment after a checkpoint exists, check it loads, relaunch with --resume; returns the steps seen."""
    rng = random.Random(seed)
    steps = []
    for attempt in range(kills):
        process = launch(first if attempt == 0 else then)
        try:
            if attempt == 0:
                wait_for(out / CHECKPOINT, process)
            time.sleep(rng.uniform(0.05, 0.6))
        finally:
            process.kill()
            process.wait()
        try:
            saved = load_checkpoint(out)  # whatever the kill interrupted: the previous checkpoint, whole
        except CheckpointError as error:
            pytest.fail(f"kill {attempt}: {error}")
        assert saved.step == len(saved.history) and [entry["step"] for entry in saved.history] == list(range(saved.step))
        assert not steps or saved.step >= steps[-1]
        steps.append(saved.step)
    remove_stale_temps(out)
    assert not list(out.glob(".*.tmp"))
    return steps


class _Forked:
    """A forked `cells` process with the bits of subprocess.Popen's interface the tests use."""

    def __init__(self, args, stderr_path=None):
        self.pid = _train_in_child(args, stderr_path)
        self.returncode = None

    def _record(self, status: int) -> None:
        self.returncode = os.waitstatus_to_exitcode(status)

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self._record(status)
        return self.returncode

    def communicate(self):
        return ("", "")

    def send_signal(self, number):
        if self.poll() is None:
            os.kill(self.pid, number)

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            time.sleep(0.01)
        return self.returncode


def run_args(series: Path, out: Path) -> tuple[list[str], list[str]]:
    first = ["train", "--arch", "gru", "--data", str(series), "--hidden", "3", "--future", "4", "--steps", "100000", "--optimizer", "adam", "--out", str(out)]
    return first, ["train", "--resume", str(out)]


def test_kill_9_at_random_moments_leaves_a_loadable_checkpoint(series, tmp_path):
    """A `cells train` process (forked from this one, so no interpreter start-up) killed 5 times at random moments."""
    out = tmp_path / "run"
    first, then = run_args(series, out)
    steps = kill_repeatedly(out, first, then, kills=5, seed=1, launch=_Forked)
    assert steps[-1] >= 1


@pytest.mark.slow
def test_kill_9_real_cells_processes(series, tmp_path):
    """The same with real `python -m scripts.cli` processes, 10 kills."""
    out = tmp_path / "run"
    first, then = run_args(series, out)

    def launch(args):
        return subprocess.Popen(cells_command(*args), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    steps = kill_repeatedly(out, first, then, kills=10, seed=2, launch=launch)
    assert steps[-1] >= 1
