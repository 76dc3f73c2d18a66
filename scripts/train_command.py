"""`cells train`, `cells compare`, `cells predict`: the time-sequence-prediction example from the command line."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from functional.predictor import predict as functional_predict
from functional.registry import ARCHS
from scripts.checkpoint import CheckpointError, has_checkpoint, load_checkpoint
from scripts.data import DataError, make_dataset
from scripts.errors import fail
from scripts.ensemble import LBFGS_COUPLES, check_ensemble, check_ensemble_resume, ensemble_forecast, member_seeds, run_ensemble
from scripts.plots import plot_ensemble_forecast, plot_forecast
from scripts.train import DEFAULT_LR, DTYPES, Diverged, Interrupted, RunResult, StepEvent, TrainConfig, check_config, check_resume, load_data, resolve_device, run

ArchName = Enum("ArchName", {name: name for name in ARCHS}, type=str)  # type: ignore[misc]


class Imp(str, Enum):
    functional = "functional"
    torch = "torch"


class OptimizerName(str, Enum):
    lbfgs = "lbfgs"
    adam = "adam"


class LineSearch(str, Enum):
    none = "none"
    strong_wolfe = "strong_wolfe"


class DType(str, Enum):
    float64 = "float64"
    float32 = "float32"


console = Console()

MODEL = "Model"
DATA = "Data"
RUN = "Run"

# Options shared by `train` and `compare`; None means "not given" (the TrainConfig default, or the checkpoint's on --resume).
ArchOption = Annotated[Optional[ArchName], typer.Option(help="Cell architecture.", rich_help_panel=MODEL, show_default=False)]
StepsOption = Annotated[Optional[int], typer.Option(min=1, help="Optimizer steps.  \\[default: 15]", rich_help_panel=RUN, show_default=False)]
LrOption = Annotated[Optional[float], typer.Option(min=0.0, help="Learning rate.  \\[default: 0.8 for lbfgs, 0.01 for adam]", rich_help_panel=RUN, show_default=False)]
OptimizerOption = Annotated[Optional[OptimizerName], typer.Option(help="torch.optim optimizer.  \\[default: lbfgs; adam with --ensemble]", rich_help_panel=RUN, show_default=False)]
LineSearchOption = Annotated[Optional[LineSearch], typer.Option(help="LBFGS line search.  \\[default: none]", rich_help_panel=RUN, show_default=False)]
HiddenOption = Annotated[Optional[int], typer.Option(min=1, help="Hidden size of each cell.  \\[default: 51]", rich_help_panel=MODEL, show_default=False)]
LayersOption = Annotated[Optional[int], typer.Option(min=1, help="Stacked cells.  \\[default: 2]", rich_help_panel=MODEL, show_default=False)]
FutureOption = Annotated[Optional[int], typer.Option(help="Steps to forecast after each step (held out for a single series).  \\[default: 1000]", rich_help_panel=DATA, show_default=False)]
DTypeOption = Annotated[Optional[DType], typer.Option(help="Floating-point type.  \\[default: float64]", rich_help_panel=MODEL, show_default=False)]
SeedOption = Annotated[Optional[int], typer.Option(help="Seed for numpy and torch (weights).  \\[default: 0]", rich_help_panel=RUN, show_default=False)]
DeviceOption = Annotated[str, typer.Option(help="cpu, cuda, cuda:N, or auto (cuda if available).", rich_help_panel=RUN)]
DataOption = Annotated[Optional[Path], typer.Option(help="A .csv or .npy file: one series per row, or a single series.  \\[default: the sine waves]", rich_help_panel=DATA, show_default=False)]
TestSeriesOption = Annotated[Optional[int], typer.Option(help="Series held out for testing (2-D data).  \\[default: 3]", rich_help_panel=DATA, show_default=False)]
WindowOption = Annotated[Optional[int], typer.Option(help="Training window length for a single series.  \\[default: 100]", rich_help_panel=DATA, show_default=False)]
PdfOption = Annotated[bool, typer.Option("--pdf", help="Also write PDF plots.", rich_help_panel=RUN)]
OverwriteOption = Annotated[bool, typer.Option("--overwrite", help="Replace a run already in --out.", rich_help_panel=RUN)]


def _given(**options: object) -> dict[str, object]:
    """The options the user actually passed, as TrainConfig fields."""
    given = {key: (value.value if isinstance(value, Enum) else value) for key, value in options.items() if value is not None}
    if given.get("line_search") == "none":
        given["line_search"] = None
    if "data" in given:
        given["data"] = str(given["data"])
    return given


def _config(given: dict[str, object]) -> TrainConfig:
    if "arch" not in given:
        raise fail("--arch: missing; expected one of " + ", ".join(ARCHS))
    config = TrainConfig(**{key: value for key, value in given.items() if key != "lr"})
    config.lr = given.get("lr", DEFAULT_LR[config.optimizer])  # type: ignore[assignment]
    try:
        check_config(config)
    except ValueError as error:
        raise fail(str(error)) from None
    return config


def _prepare_out(out: Path, overwrite: bool, resuming: bool) -> None:
    if has_checkpoint(out) and not (overwrite or resuming):
        raise fail(f"--out {out} already holds a run; pass --resume {out} to continue it, --overwrite to replace it, or another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise fail(f"--out {out}: cannot create the directory ({error.strerror})") from None
    if not os.access(out, os.W_OK):
        raise fail(f"--out {out}: the directory is not writable")


def _load_data(config: TrainConfig, resume_from=None):
    """Validate the data before anything is written; a bad file is one line and exit 2."""
    try:
        return load_data(config, resume_from)
    except (DataError, ValueError) as error:
        raise fail(str(error)) from None


@contextlib.contextmanager
def _run_failures(progress: Progress, out: Path) -> Iterator[None]:
    """Map every expected failure of a training run to one line and an exit code (1 diverged, 130 Ctrl-C, 2 otherwise)."""
    try:
        yield
    except Diverged as error:
        progress.stop()
        raise fail(str(error), code=1) from None
    except Interrupted as error:
        progress.stop()
        raise fail(str(error), code=130) from None
    except OSError as error:  # e.g. the disk filled up or --out became unwritable mid-run; the last checkpoint stays
        progress.stop()
        raise fail(f"--out {out}: cannot write {error.filename or 'the run'} ({error.strerror or error}); the last saved checkpoint is kept") from None
    except (DataError, CheckpointError, ValueError) as error:
        progress.stop()
        raise fail(str(error)) from None


def _train_one(config: TrainConfig, out: Path, data, *, resume_from=None, pdf: bool = False, label: str = "") -> RunResult:
    """Run one training with a progress bar; map every expected failure to one line and an exit code."""
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("step {task.completed}/{task.total}"),
        TextColumn("{task.fields[evals]} evals"), TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), console=console, transient=False,
    ) as progress:
        start = resume_from.step if resume_from else 0
        task = progress.add_task(label or f"{config.arch} ({config.imp})", total=config.steps, completed=start, evals=0, loss="-")

        def on_event(event: StepEvent) -> None:
            progress.update(task, evals=event.evaluations, loss=f"{event.loss:.4e}", completed=event.step + 1 if event.done else event.step)

        with _run_failures(progress, out):
            result = run(config, out, data=data, resume_from=resume_from, pdf=pdf, on_event=on_event)
    for entry in result.history[start:]:
        extra = f", forecast loss {entry['forecast_loss']:.4e}" if "forecast_loss" in entry else ""
        console.print(f"step {entry['step']}: train loss {entry['train_loss']:.6e}, test loss {entry['test_loss']:.6e}{extra} ({entry['evaluations']} evals, {entry['wall_s']:.1f} s)")
    return result


def train(
    arch: ArchOption = None,
    imp: Annotated[Optional[Imp], typer.Option(help="functional: torch.func.grad over param dicts; torch: torch.nn cells + autograd.  \\[default: functional]", rich_help_panel=MODEL, show_default=False)] = None,
    steps: StepsOption = None,
    lr: LrOption = None,
    optimizer: OptimizerOption = None,
    line_search: LineSearchOption = None,
    hidden: HiddenOption = None,
    layers: LayersOption = None,
    future: FutureOption = None,
    dtype: DTypeOption = None,
    seed: SeedOption = None,
    device: DeviceOption = "auto",
    data: DataOption = None,
    test_series: TestSeriesOption = None,
    window: WindowOption = None,
    out: Annotated[Optional[Path], typer.Option(help="Output directory.  \\[default: runs/<arch>-<imp>]", rich_help_panel=RUN, show_default=False)] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue the run in this directory (its checkpoint fixes the options).", rich_help_panel=RUN, show_default=False)] = None,
    pdf: PdfOption = False,
    overwrite: OverwriteOption = False,
    ensemble: Annotated[Optional[int], typer.Option(help="Train K models from seeds seed..seed+K-1 in one torch.func.vmap run (Adam); plots the mean forecast and its min-max band.", rich_help_panel=RUN, show_default=False)] = None,
) -> None:
    """Train two stacked cells on sine waves (pytorch/examples time_sequence_prediction); plots, metrics, checkpoint in --out."""
    given = _given(arch=arch, imp=imp, steps=steps, lr=lr, optimizer=optimizer, line_search=line_search, hidden=hidden, layers=layers,
                   future=future, dtype=dtype, seed=seed, data=data, test_series=test_series, window=window)
    if ensemble is not None:
        if ensemble < 1:
            raise fail(f"--ensemble: expected an int >= 1 (members), got {ensemble}")
        if given.get("optimizer") == "lbfgs":
            raise fail(f"--ensemble {ensemble} with --optimizer lbfgs: {LBFGS_COUPLES}")
        if resume is None:
            given.setdefault("optimizer", "adam")
    members = ensemble
    resume_from = None
    if resume is not None:
        if out is not None and out.resolve() != resume.resolve():
            raise fail(f"--out {out}: a resumed run writes into its own directory {resume}; drop --out")
        try:
            resume_from = load_checkpoint(resume)
        except CheckpointError as error:
            raise fail(str(error)) from None
        config = TrainConfig.from_dict(resume_from.config)
        for key, value in given.items():
            if key != "steps" and getattr(config, key) != value:
                raise fail(f"--{key.replace('_', '-')} {value}: the checkpoint in {resume} was trained with {getattr(config, key)}; only --steps may change on --resume")
        if config.arch not in ARCHS:
            raise fail(f"{resume}: the checkpoint's arch {config.arch!r} is not registered; expected one of {', '.join(ARCHS)}")
        config.steps = given.get("steps", config.steps)  # type: ignore[assignment]
        saved_members = resume_from.config.get("ensemble")
        if members is not None and members != saved_members:
            raise fail(f"--ensemble {members}: the checkpoint in {resume} was trained with {f'--ensemble {saved_members}' if saved_members else 'no ensemble'}; only --steps may change on --resume")
        members = saved_members
        try:
            if members is None:
                check_resume(config, resume_from, resume)  # params and optimizer state fit the config, before anything runs
            else:
                check_ensemble_resume(config, members, resume_from, resume)
        except CheckpointError as error:
            raise fail(str(error)) from None
        out = resume
    else:
        config = _config(given)
        if members is not None:
            try:
                check_ensemble(config, members)
            except ValueError as error:
                raise fail(str(error)) from None
        out = out or Path("runs") / (f"{config.arch}-ensemble{members}" if members else f"{config.arch}-{config.imp}")
    config.device = resolve_device(device)
    data = _load_data(config, resume_from)
    _prepare_out(out, overwrite, resume is not None)
    if members is not None:
        _train_ensemble(config, members, out, data, resume_from=resume_from, pdf=pdf)
        return
    result = _train_one(config, out, data, resume_from=resume_from, pdf=pdf)
    console.print(f"wrote {out}/predict*.png, loss.png, metrics.json, checkpoint.safetensors ({len(result.history)} steps)")


def _train_ensemble(config: TrainConfig, members: int, out: Path, data, *, resume_from=None, pdf: bool = False) -> None:
    """`cells train --ensemble K`: progress per step, then each member's losses in a table."""
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("step {task.completed}/{task.total}"),
        TextColumn("mean loss {task.fields[loss]}"), TimeElapsedColumn(), console=console, transient=False,
    ) as progress:
        start = resume_from.step if resume_from else 0
        task = progress.add_task(f"{config.arch} ensemble of {members}", total=config.steps, completed=start, loss="-")

        def on_event(event: StepEvent) -> None:
            progress.update(task, loss=f"{event.loss:.4e}", completed=event.step + 1)

        with _run_failures(progress, out):
            result = run_ensemble(config, members, out, data=data, resume_from=resume_from, pdf=pdf, on_event=on_event)
    table = Table(title=f"{config.arch}: {members} members trained in one vmapped run, {len(result.history)} Adam steps")
    for column in ("member", "seed", "first train loss", "last train loss", "last test loss"):
        table.add_column(column, justify="right", no_wrap=True)
    first, last = result.history[0], result.history[-1]
    for member, seed in enumerate(member_seeds(config, members)):
        table.add_row(str(member), str(seed), f"{first['train_loss'][member]:.6e}", f"{last['train_loss'][member]:.6e}", f"{last['test_loss'][member]:.6e}")
    console.print(table)
    console.print(f"wrote {out}/ensemble.png, loss.png, metrics.json, checkpoint.safetensors ({len(result.history)} steps)")


def compare(
    arch: ArchOption = None,
    steps: StepsOption = None,
    lr: LrOption = None,
    optimizer: OptimizerOption = None,
    line_search: LineSearchOption = None,
    hidden: HiddenOption = None,
    layers: LayersOption = None,
    future: FutureOption = None,
    dtype: DTypeOption = None,
    seed: SeedOption = None,
    device: DeviceOption = "auto",
    data: DataOption = None,
    test_series: TestSeriesOption = None,
    window: WindowOption = None,
    out: Annotated[Optional[Path], typer.Option(help="Output directory.  \\[default: runs/<arch>-compare]", rich_help_panel=RUN, show_default=False)] = None,
    pdf: PdfOption = False,
    overwrite: OverwriteOption = False,
) -> None:
    """Train the functional and the torch.nn implementation from the same seed and weights; compare losses and forecasts."""
    given = _given(arch=arch, steps=steps, lr=lr, optimizer=optimizer, line_search=line_search, hidden=hidden, layers=layers,
                   future=future, dtype=dtype, seed=seed, data=data, test_series=test_series, window=window)
    base = _config(given)
    base.device = resolve_device(device)
    out = out or Path("runs") / f"{base.arch}-compare"
    results = {}
    data = _load_data(base)
    for imp in Imp:
        _prepare_out(out / imp.value, overwrite, False)
    for imp in Imp:
        config = dataclasses.replace(base, imp=imp.value)
        results[imp.value] = _train_one(config, out / imp.value, data, pdf=pdf, label=f"{base.arch} ({imp.value})")
    functional, reference = results["functional"], results["torch"]
    table = Table(title=f"{base.arch}: functional (torch.func.grad) vs torch.nn (autograd), same start")
    for column in ("step", "train functional", "train torch", "rel Δ train", "rel Δ test"):
        table.add_column(column, justify="right", no_wrap=True)
    for a, b in zip(functional.history, reference.history):
        table.add_row(str(a["step"]), f"{a['train_loss']:.8e}", f"{b['train_loss']:.8e}",
                      f"{_relative(a['train_loss'], b['train_loss']):.1e}", f"{_relative(a['test_loss'], b['test_loss']):.1e}")
    console.print(table)
    suffixes = (".png", ".pdf") if pdf else (".png",)
    plot_forecast([out / f"compare{suffix}" for suffix in suffixes], functional.predictions, functional.known, overlay=reference.predictions,
                  labels=("functional", "torch.nn"), title=f"{base.arch}: functional (solid/dotted) vs torch.nn (dashed) after {len(functional.history)} steps")
    first = _relative(functional.history[0]["train_loss"], reference.history[0]["train_loss"])
    console.print(f"wrote {out}/compare.png; first-step train loss agrees to {first:.1e} relative")
    if base.dtype == "float64" and first > 1e-8:
        raise fail(f"first-step losses differ by {first:.1e} relative (> 1e-8 in float64)", code=1)


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), sys.float_info.min)


def predict(
    checkpoint: Annotated[Path, typer.Option(help="A run directory holding checkpoint.safetensors.", show_default=False)],
    future: Annotated[Optional[int], typer.Option(help="Steps to forecast.  \\[default: the run's --future]", show_default=False)] = None,
    data: DataOption = None,
    out: Annotated[Optional[Path], typer.Option(help="Where to write forecast.png and forecast.npy.  \\[default: the checkpoint directory]", show_default=False)] = None,
    device: DeviceOption = "auto",
) -> None:
    """Load a trained model and forecast (no training); writes forecast.png and forecast.npy."""
    try:
        saved = load_checkpoint(checkpoint)
    except CheckpointError as error:
        raise fail(str(error)) from None
    config = TrainConfig.from_dict(saved.config)
    if config.arch not in ARCHS:
        raise fail(f"--checkpoint {checkpoint}: its arch {config.arch!r} is not registered; expected one of {', '.join(ARCHS)}")
    future = config.future if future is None else future
    if future < 0:
        raise fail(f"--future: expected an int >= 0, got {future}")
    device_name = resolve_device(device)
    dtype = DTYPES.get(config.dtype, torch.float64)
    try:
        dataset = make_dataset(str(data) if data else config.data, test_series=config.test_series, window=config.window, future=future, dtype=dtype, device=device_name, stats=saved.data_stats)
        params = {key: value.to(device=device_name, dtype=dtype) for key, value in saved.params.items()}
        members = saved.config.get("ensemble")
        if members is not None:
            check_ensemble_resume(config, members, dataclasses.replace(saved, optimizer={}), checkpoint)
            prediction = ensemble_forecast(config.arch, params, dataset.test_input, future)  # (K, known + future, M, 1)
        else:
            with torch.no_grad():
                prediction = functional_predict(config.arch, params, dataset.test_input, future=future)[0]
    except (DataError, ValueError) as error:
        raise fail(f"--checkpoint {checkpoint}: {error}" if not isinstance(error, (DataError, CheckpointError)) else str(error)) from None
    out = out or checkpoint
    _prepare_out(out, True, True)
    known, title = dataset.test_input.shape[0], f"{config.arch}: forecast of {future} steps (dotted) from {checkpoint}"
    if members is not None:
        values = np.stack([dataset.to_original(member) for member in prediction])  # (K, known + future, M)
        plot_ensemble_forecast([out / "forecast.png"], values, known, truth=dataset.truth, title=f"{title}: mean of {members} members and min-max band")
        shape = f"{values.shape[0]} members x {values.shape[1]} steps x {values.shape[2]} series"
    else:
        values = dataset.to_original(prediction)
        plot_forecast([out / "forecast.png"], values, known, truth=dataset.truth, title=title)
        shape = f"{values.shape[0]} steps x {values.shape[1]} series"
    np.save(out / "forecast.npy", values)
    console.print(f"wrote {out}/forecast.png and forecast.npy ({shape})")
