"""`cells gradflow`: the vanishing-gradient picture, per arch, at init and after training.

For each arch: train the example's predictor (`cells train`'s loop, LBFGS) into `--out/<arch>`, and
measure, at init and after training, `||dL/ds_t||` (the last step's loss against each layer's state;
`functional.gradflow`) and the spectral norm of the top cell's step Jacobian along the trajectory
(`functional.jacobian`). One figure: gradient norms on a log scale against the distance to the loss.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from functional.gradflow import state_gradient_norms
from functional.jacobian import jacobian_spectral_norms
from functional.predictor import predictor_cells
from functional.registry import ARCHS, get_arch
from functional.scan import scan
from scripts.checkpoint import CheckpointError, has_checkpoint, load_checkpoint
from scripts.data import DataError
from scripts.errors import errors, fail
from scripts.plots import plot_gradflow
from scripts.train import DTYPES, Diverged, Interrupted, StepEvent, TrainConfig, check_config, initial_params, load_data, resolve_device, run

console = Console()


def parse_archs(value: str) -> list[str]:
    """`all` or a comma list of registered archs."""
    names = list(ARCHS) if value.strip() == "all" else [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in ARCHS]
    if unknown or not names:
        raise ValueError(f"--arch: expected 'all' or a comma list of {', '.join(ARCHS)}, got {value!r}")
    return names


def measure(arch: str, params: dict[str, torch.Tensor], inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
    """Gradient norms for every layer `(layers, T)` and the top cell's step-Jacobian norms `(T, N)`."""
    norms = state_gradient_norms(arch, params, inputs, targets)
    cells = predictor_cells(params)
    spec = get_arch(arch)
    hidden = inputs
    for cell in cells[:-1]:  # the top cell's inputs: the outputs of the layers below
        carry = spec.initial_carry(tuple(hidden.shape[1:-1]), spec.sizes(cell)[1], dtype=hidden.dtype, device=hidden.device)
        _, hidden = scan(lambda c, x, cell=cell: spec.recurrence(cell, c, x), carry, spec.project(cell, hidden))
    jacobians = jacobian_spectral_norms(arch, cells[-1], hidden)
    return {"state_gradient_norms": norms.tolist(), "jacobian_norms_median": jacobian_norms_median(jacobians)}


def jacobian_norms_median(norms: torch.Tensor) -> list[float]:
    return norms.flatten(1).median(dim=1).values.tolist()


def gradflow(
    arch: Annotated[str, typer.Option(help="'all' or a comma list of archs.")] = "all",
    steps: Annotated[int, typer.Option(help="LBFGS steps of training before the second measurement (0: init only).")] = 5,
    hidden: Annotated[int, typer.Option(help="Hidden size of each cell.")] = 51,
    layers: Annotated[int, typer.Option(help="Stacked cells.")] = 2,
    sequences: Annotated[int, typer.Option(help="Training sequences the gradients are measured on (all of them train).")] = 8,
    dtype: Annotated[str, typer.Option(help="float64 or float32.")] = "float64",
    seed: Annotated[int, typer.Option(help="Seed for the weights.")] = 0,
    data: Annotated[Optional[Path], typer.Option(help="A .csv or .npy file (see cells train); default: the sine waves.", show_default=False)] = None,
    out: Annotated[Path, typer.Option(help="Output directory: gradflow.png, gradflow.json, one training run per arch.")] = Path("runs/gradflow"),
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace runs already in --out.")] = False,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N, or auto.")] = "auto",
) -> None:
    """How much the last step's loss depends on the state at each earlier step, per arch, at init and after training."""
    try:
        archs = parse_archs(arch)
    except ValueError as error:
        raise fail(str(error)) from None
    for name, value, low in (("--steps", steps, 0), ("--hidden", hidden, 1), ("--layers", layers, 1), ("--sequences", sequences, 1)):
        if value < low:
            raise fail(f"{name}: expected an int >= {low}, got {value}")
    if dtype not in DTYPES:
        raise fail(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    base = TrainConfig(arch=archs[0], steps=max(steps, 1), hidden=hidden, layers=layers, dtype=dtype, seed=seed, data=str(data) if data else None, future=0, device=resolve_device(device))
    try:
        check_config(base)
        dataset = load_data(base)
    except (DataError, ValueError) as error:
        raise fail(str(error)) from None
    taken = [name for name in archs if has_checkpoint(out / name)]
    if taken and not overwrite:
        raise fail(f"--out {out}: {out / taken[0]} already holds a run; pass --overwrite to replace it, or another --out")
    try:
        for name in archs:
            (out / name).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise fail(f"--out {out}: cannot create the directory ({error.strerror})") from None
    count = min(sequences, dataset.train_input.shape[1])
    inputs, targets = dataset.train_input[:, :count], dataset.train_target[:, :count]
    results: dict[str, Any] = {}
    for name in archs:
        config = dataclasses.replace(base, arch=name, steps=steps)
        entry: dict[str, Any] = {"init": measure(name, initial_params(config, config.device), inputs, targets)}
        if steps:
            entry.update(_train(config, out / name, dataset))
            if "trained_steps" in entry:
                params = {key: value.to(device=config.device) for key, value in load_checkpoint(out / name).params.items()}
                entry["trained"] = measure(name, params, inputs, targets)
        results[name] = entry
    summary = {"config": {**dataclasses.asdict(base), "steps": steps, "sequences": count, "archs": archs}, "steps_T": inputs.shape[0], "archs": results}
    (out / "gradflow.json").write_text(json.dumps(summary, indent=1))
    plot_gradflow([out / "gradflow.png"], results, title=f"Gradient flow through time: {layers} stacked cells of {hidden}, {count} sine sequences of {inputs.shape[0]} steps")
    _print_table(results, inputs.shape[0])
    console.print(f"wrote {out}/gradflow.png, gradflow.json and one run per arch in {out}/<arch>")


def _train(config: TrainConfig, out: Path, dataset) -> dict[str, Any]:
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("step {task.completed}/{task.total}"), TextColumn("loss {task.fields[loss]}"),
                  TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task(f"{config.arch}: training", total=config.steps, loss="-")

        def on_event(event: StepEvent) -> None:
            progress.update(task, loss=f"{event.loss:.3e}", completed=event.step + 1 if event.done else event.step)

        try:
            result = run(config, out, data=dataset, on_event=on_event)
        except Diverged as error:
            progress.stop()
            errors.print(f"warning: {config.arch} diverged ({str(error).split(';')[0]}); only its init is shown", markup=False, highlight=False, soft_wrap=True)
            return {"diverged": str(error)}
        except Interrupted as error:
            progress.stop()
            raise fail(str(error), code=130) from None
        except (OSError, CheckpointError) as error:
            progress.stop()
            raise fail(f"--out {out}: {error}") from None
    return {"trained_steps": len(result.history), "train_loss": result.history[-1]["train_loss"]}


def _print_table(results: dict[str, Any], steps: int) -> None:
    distances = [d for d in (1, 10, 100, 1000) if d <= steps]
    table = Table(title="||dL/ds_t|| of the top cell at distance d = T - t from the loss (init -> trained)")
    table.add_column("arch")
    for d in distances:
        table.add_column(f"d={d}", justify="right")
    table.add_column("median ||J_t||", justify="right")
    for name, entry in results.items():
        row = [name]
        for d in distances:
            cells = [f"{entry[when]['state_gradient_norms'][-1][steps - d]:.1e}" for when in ("init", "trained") if when in entry]
            row.append(" -> ".join(cells))
        row.append(" -> ".join(f"{np.median(entry[when]['jacobian_norms_median']):.3f}" for when in ("init", "trained") if when in entry))
        table.add_row(*row)
    console.print(table)
