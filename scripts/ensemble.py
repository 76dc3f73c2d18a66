"""`cells train --ensemble K`: K predictors from K seeds, trained in one vmapped run (Adam).

The members' params are stacked on a leading axis K (`stack_params`); one
`vmap(grad_and_value(loss))` call gives every member's loss and gradient, and one Adam over the
stacked tensors updates them. Adam is elementwise, so that equals K separate Adams; LBFGS is not
(its line search and curvature history span all the tensors it is given, which would couple the
members), so ensembles refuse it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.func import vmap

from functional.predictor import init_predictor, predict
from functional.registry import get_arch, split_buffers
from functional.stack import stack_params
from functional.transforms import ensemble_grad_and_value, predictor_loss
from scripts.checkpoint import Checkpoint, CheckpointError, remove_stale_temps, save_checkpoint, write_json
from scripts.data import Dataset
from scripts.plots import plot_ensemble_forecast, plot_ensemble_losses
from scripts.train import (
    DTYPES, Diverged, Interrupted, StepEvent, TrainConfig, _deferred_sigint, _interrupted_message, check_optimizer_state, initial_params, load_data, resolve_device,
)

LBFGS_COUPLES = (
    "LBFGS's line search and curvature history span every tensor it is given, so on stacked members it would take one "
    "step size for all of them (the members would no longer be independent); use --optimizer adam (the default with --ensemble)"
)


def check_ensemble(config: TrainConfig, members: int) -> None:
    """ValueError naming the option when an ensemble cannot be trained as asked."""
    if not isinstance(members, int) or members < 1:
        raise ValueError(f"--ensemble: expected an int >= 1 (members), got {members}")
    if config.optimizer == "lbfgs":
        raise ValueError(f"--ensemble {members} with --optimizer lbfgs: {LBFGS_COUPLES}")
    if config.imp != "functional":
        raise ValueError(f"--ensemble {members} with --imp {config.imp}: ensembles are one torch.func.vmap over stacked params; torch.nn cells cannot be vmapped (no batching rule for aten::lstm_cell), use --imp functional")
    get_arch(config.arch)


def check_ensemble_resume(config: TrainConfig, members: int, checkpoint: Checkpoint, out: Path) -> None:
    """The checkpoint holds `members` stacked predictors of this config, and Adam state for them (CheckpointError otherwise)."""
    if not isinstance(members, int) or members < 1:
        raise CheckpointError(f"{out}: the checkpoint's 'ensemble' must be an int >= 1, got {members!r}")
    expected = {key: (members, *value.shape) for key, value in init_predictor(config.arch, 1, config.hidden, layers=config.layers, device="meta").items()}
    what = f"{members} stacked {config.layers}-layer {config.arch} predictors with hidden {config.hidden}"
    if set(expected) != set(checkpoint.params):
        key = sorted(set(expected) ^ set(checkpoint.params))[0]
        raise CheckpointError(f"{out}: the checkpoint's params do not fit {what}: {'missing' if key in expected else 'unexpected'} key {key!r}")
    for key, shape in expected.items():
        if tuple(checkpoint.params[key].shape) != shape:
            raise CheckpointError(f"{out}: params[{key!r}]: expected shape {shape} for {what}, got {tuple(checkpoint.params[key].shape)}")
    if checkpoint.optimizer:
        trainable, _ = split_buffers(config.arch, {key: torch.empty(shape, device="meta") for key, shape in expected.items()})
        check_optimizer_state(checkpoint.optimizer, torch.optim.Adam([value.requires_grad_() for value in trainable.values()], lr=config.lr), out)


def member_seeds(config: TrainConfig, members: int) -> list[int]:
    return [config.seed + member for member in range(members)]


def initial_ensemble(config: TrainConfig, members: int, device: str) -> dict[str, torch.Tensor]:
    """Member k is exactly the single run with `--seed seed + k` (the example's init), stacked on axis 0."""
    return stack_params([initial_params(dataclasses.replace(config, seed=seed), device) for seed in member_seeds(config, members)])


def ensemble_forecast(arch: str, stacked: dict[str, torch.Tensor], inputs: torch.Tensor, future: int) -> torch.Tensor:
    """Every member's teacher-forced outputs then forecast: `(K, T + future, *B, O)`."""
    with torch.no_grad():
        return vmap(lambda params: predict(arch, params, inputs, future=future)[0])(stacked)


@dataclass
class EnsembleResult:
    history: list[dict[str, Any]]  # per step: lists of K losses
    predictions: np.ndarray  # (K, known + future, M) in original units
    known: int
    out: Path


def run_ensemble(
    config: TrainConfig,
    members: int,
    out: Path,
    *,
    data: Dataset | None = None,
    resume_from: Checkpoint | None = None,
    pdf: bool = False,
    on_event: Callable[[StepEvent], None] = lambda event: None,
) -> EnsembleResult:
    """Train `members` predictors for `config.steps` Adam steps; checkpoint after every step, plots at the end."""
    check_ensemble(config, members)
    device = resolve_device(config.device)
    dtype = DTYPES[config.dtype]
    data = data or load_data(config, resume_from)
    if resume_from:
        stacked = {key: value.to(device=device, dtype=dtype).clone() for key, value in resume_from.params.items()}
    else:
        stacked = initial_ensemble(config, members, device)
    trainable, constants = split_buffers(config.arch, stacked)
    optimizer = torch.optim.Adam(list(trainable.values()), lr=config.lr)
    if resume_from:
        check_ensemble_resume(config, members, resume_from, out)
        if resume_from.optimizer:
            optimizer.load_state_dict(resume_from.optimizer)
    history: list[dict[str, Any]] = list(resume_from.history) if resume_from else []
    known = data.test_input.shape[0]
    remove_stale_temps(out)

    def save(completed: int) -> None:
        save_checkpoint(out, Checkpoint(stacked, optimizer.state_dict(), {**dataclasses.asdict(config), "ensemble": members}, history, completed, (data.mean, data.std)))

    with _deferred_sigint() as sigint:  # Ctrl-C is acted on between steps, never inside an update or a write
        for step in range(resume_from.step if resume_from else 0, config.steps):
            start = time.perf_counter()
            try:
                with sigint.hard():  # a second Ctrl-C abandons the gradient at once; the params are still the step's start
                    optimizer.zero_grad()
                    grads, losses = ensemble_grad_and_value(predictor_loss(config.arch), trainable, data.train_input, data.train_target, constants=constants or None)
            except KeyboardInterrupt:
                save(step)
                raise Interrupted(_interrupted_message(out, step, step), step) from None
            for key, tensor in trainable.items():
                tensor.grad = grads[key]
            optimizer.step()
            wall = time.perf_counter() - start
            bad = [member for member, loss in enumerate(losses.tolist()) if not math.isfinite(loss)]
            if bad or not all(torch.isfinite(tensor).all() for tensor in trainable.values()):
                raise Diverged(
                    f"step {step}: member(s) {bad or 'all'} (seeds {[config.seed + m for m in bad] or member_seeds(config, members)}) diverged; "
                    f"the last finite checkpoint ({step} steps) is kept in {out}. Try a smaller --lr (now {config.lr})."
                )
            test = ensemble_forecast(config.arch, stacked, data.test_input, 0)  # (K, known, M, 1)
            test_losses = ((test - data.test_target) ** 2).flatten(1).mean(1)
            history.append({"step": step, "train_loss": losses.tolist(), "test_loss": test_losses.tolist(), "wall_s": wall})
            save(step + 1)
            on_event(StepEvent(step, 1, float(losses.mean()), True))
            if sigint.pressed and step + 1 < config.steps:
                raise Interrupted(_interrupted_message(out, step + 1, None), step + 1)
    forecast = ensemble_forecast(config.arch, stacked, data.test_input, config.future)  # (K, known + future, M, 1)
    predictions = np.stack([data.to_original(member) for member in forecast])
    _write_plots(out, config, members, data, history, predictions, pdf)
    return EnsembleResult(history, predictions, known, out)


def _write_plots(out: Path, config: TrainConfig, members: int, data: Dataset, history: list[dict[str, Any]], predictions: np.ndarray, pdf: bool) -> None:
    suffixes = (".png", ".pdf") if pdf else (".png",)
    label = f"{config.arch} ensemble of {members} (seeds {config.seed}..{config.seed + members - 1})"
    known = data.test_input.shape[0]
    plot_ensemble_forecast([out / f"ensemble{suffix}" for suffix in suffixes], predictions, known, truth=data.truth,
                           title=f"{label}, {len(history)} Adam steps: mean forecast (dotted) and min-max band")
    plot_ensemble_losses([out / f"loss{suffix}" for suffix in suffixes], history, label)
    write_json(out / "metrics.json", {"config": dataclasses.asdict(config), "ensemble": members, "seeds": member_seeds(config, members), "history": history})
