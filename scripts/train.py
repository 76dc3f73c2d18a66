"""Training the time-sequence predictor: functional (torch.func.grad) or torch.nn (autograd), same optimizer."""

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
from torch.func import grad_and_value

from functional.predictor import init_predictor, predict
from functional.registry import get_arch
from parity.predictor import to_torch_predictor
from scripts.checkpoint import Checkpoint, CheckpointError, save_checkpoint, write_json
from scripts.data import Dataset, make_dataset
from scripts.plots import plot_forecast, plot_losses

DTYPES = {"float64": torch.float64, "float32": torch.float32}
DEFAULT_LR = {"lbfgs": 0.8, "adam": 0.01}


@dataclass
class TrainConfig:
    """Everything that defines a run; the defaults are pytorch/examples time_sequence_prediction."""

    arch: str = "lstm"
    imp: str = "functional"  # functional: torch.func.grad; torch: torch.nn cells + autograd
    steps: int = 15  # optimizer steps (LBFGS: each runs up to 20 iterations / 25 evaluations)
    lr: float = 0.8
    optimizer: str = "lbfgs"
    line_search: str | None = None  # LBFGS line_search_fn: None or "strong_wolfe"
    hidden: int = 51
    layers: int = 2
    future: int = 1000  # forecast length after each step
    dtype: str = "float64"
    seed: int = 0
    device: str = "cpu"
    data: str | None = None  # None: the embedded sine waves
    test_series: int = 3
    window: int = 100

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})


class Diverged(RuntimeError):
    """The loss became non-finite; the message names the step and what to try."""


def resolve_device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((prediction - target) ** 2).mean()


class FunctionalModel:
    """Params dict + `torch.func.grad_and_value`; the optimizer updates the dict's tensors in place."""

    def __init__(self, config: TrainConfig, params: dict[str, torch.Tensor]):
        self.arch, self.params = config.arch, params
        constants = get_arch(config.arch).buffers  # e.g. SRU's scale_x: part of the model, never trained
        self.trainable = {key: value for key, value in params.items() if key.rsplit(".", 1)[-1] not in constants}
        self.constants = {key: value for key, value in params.items() if key not in self.trainable}

    def tensors(self) -> list[torch.Tensor]:
        return list(self.trainable.values())

    def loss_and_grad(self, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        def loss(trainable: dict[str, torch.Tensor]) -> torch.Tensor:
            return mse(predict(self.arch, {**trainable, **self.constants}, inputs)[0], target)

        grads, value = grad_and_value(loss)(self.trainable)
        for key, tensor in self.trainable.items():
            tensor.grad = grads[key]
        return value

    def forecast(self, inputs: torch.Tensor, future: int) -> torch.Tensor:
        return predict(self.arch, self.params, inputs, future=future)[0]

    def state(self) -> dict[str, torch.Tensor]:
        return self.params


class TorchModel:
    """`torch.nn` cells built from the same params through `parity`, trained with `.backward()`."""

    def __init__(self, config: TrainConfig, params: dict[str, torch.Tensor]):
        self.module = to_torch_predictor(config.arch, params)

    def tensors(self) -> list[torch.Tensor]:
        return list(self.module.parameters())

    def loss_and_grad(self, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.module.zero_grad()
        loss = mse(self.module(inputs), target)
        loss.backward()
        return loss

    def forecast(self, inputs: torch.Tensor, future: int) -> torch.Tensor:
        return self.module(inputs, future=future)

    def state(self) -> dict[str, torch.Tensor]:
        return {key: value.detach() for key, value in self.module.state_dict(keep_vars=True).items()}


MODELS = {"functional": FunctionalModel, "torch": TorchModel}


def make_optimizer(config: TrainConfig, tensors: list[torch.Tensor]) -> torch.optim.Optimizer:
    if config.optimizer == "lbfgs":
        return torch.optim.LBFGS(tensors, lr=config.lr, line_search_fn=config.line_search)
    return torch.optim.Adam(tensors, lr=config.lr)


def initial_params(config: TrainConfig, device: str) -> dict[str, torch.Tensor]:
    """The example's init: seed numpy and torch, draw float32 weights as `nn` modules do, then cast."""
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    params = init_predictor(config.arch, 1, config.hidden, layers=config.layers)
    return {key: value.to(device=device, dtype=DTYPES[config.dtype]) for key, value in params.items()}


@dataclass
class StepEvent:
    """Progress for the caller: after every closure evaluation (`done=False`) and after each step."""

    step: int
    evaluations: int
    loss: float
    done: bool


@dataclass
class RunResult:
    history: list[dict[str, Any]]
    predictions: np.ndarray  # last step's forecast in original units (known + future, M)
    known: int
    out: Path


def load_data(config: TrainConfig, resume_from: Checkpoint | None = None) -> Dataset:
    """The run's dataset (standardized with the checkpoint's statistics when resuming)."""
    stats = resume_from.data_stats if resume_from else None
    device = resolve_device(config.device)
    return make_dataset(config.data, test_series=config.test_series, window=config.window, future=config.future, dtype=DTYPES[config.dtype], device=device, stats=stats)


def run(
    config: TrainConfig,
    out: Path,
    *,
    data: Dataset | None = None,
    resume_from: Checkpoint | None = None,
    pdf: bool = False,
    on_event: Callable[[StepEvent], None] = lambda event: None,
) -> RunResult:
    """Train `config.steps` steps into `out` (plots, metrics.json, checkpoint after every step).

    Raises Diverged when the training loss turns non-finite; the last finite checkpoint stays.
    """
    device = resolve_device(config.device)
    dtype = DTYPES[config.dtype]
    data = data or load_data(config, resume_from)
    params = {k: v.to(device=device, dtype=dtype).clone() for k, v in resume_from.params.items()} if resume_from else initial_params(config, device)
    model = MODELS[config.imp](config, params)
    optimizer = make_optimizer(config, model.tensors())
    history: list[dict[str, Any]] = list(resume_from.history) if resume_from else []
    if resume_from and resume_from.optimizer:
        try:
            optimizer.load_state_dict(_to_device(resume_from.optimizer, device))
        except (ValueError, KeyError, RuntimeError) as error:
            raise CheckpointError(f"{out}: optimizer state does not fit this run ({error})") from None
    predictions = None
    for step in range(resume_from.step if resume_from else 0, config.steps):
        evaluations, last_loss = 0, math.nan
        start = time.perf_counter()

        def closure() -> torch.Tensor:
            nonlocal evaluations, last_loss
            optimizer.zero_grad()
            loss = model.loss_and_grad(data.train_input, data.train_target)
            evaluations, last_loss = evaluations + 1, loss.item()
            on_event(StepEvent(step, evaluations, last_loss, False))
            return loss

        if config.optimizer == "lbfgs":
            optimizer.step(closure)
        else:
            closure()
            optimizer.step()
        wall = time.perf_counter() - start
        if not math.isfinite(last_loss) or not all(torch.isfinite(t).all() for t in model.tensors()):
            raise Diverged(
                f"step {step}: the training loss became {last_loss} (diverged); the last finite checkpoint ({step} steps) is kept in {out}. "
                f"Try a smaller --lr (now {config.lr}) or --line-search strong_wolfe."
            )
        entry, predictions = _evaluate(model, data, config, step, evaluations, last_loss, wall)
        history.append(entry)
        _write_step(out, config, data, model, optimizer, history, predictions, pdf)
        on_event(StepEvent(step, evaluations, last_loss, True))
    if predictions is None:  # nothing left to train (resumed a finished run): forecast once for the result
        with torch.no_grad():
            predictions = data.to_original(model.forecast(data.test_input, config.future))
    return RunResult(history, predictions, data.test_input.shape[0], out)


def _evaluate(model: Any, data: Dataset, config: TrainConfig, step: int, evaluations: int, train_loss: float, wall: float) -> tuple[dict[str, Any], np.ndarray]:
    known = data.test_input.shape[0]
    with torch.no_grad():
        prediction = model.forecast(data.test_input, config.future)  # (known + future, M, 1)
        test_loss = mse(prediction[:known], data.test_target).item()
    predictions = data.to_original(prediction)
    entry = {"step": step, "train_loss": train_loss, "test_loss": test_loss, "evaluations": evaluations, "wall_s": wall}
    if data.truth is not None:
        entry["forecast_loss"] = float(np.mean((predictions[known:] - data.truth) ** 2))
    return entry, predictions


def _write_step(out: Path, config: TrainConfig, data: Dataset, model: Any, optimizer: torch.optim.Optimizer, history: list, predictions: np.ndarray, pdf: bool) -> None:
    step = history[-1]["step"]
    suffixes = (".png", ".pdf") if pdf else (".png",)
    title = f"{config.arch} ({config.imp}), step {step}: dashed lines are predicted values"
    plot_forecast([out / f"predict{step}{suffix}" for suffix in suffixes], predictions, data.test_input.shape[0], title=title, truth=data.truth)
    plot_losses([out / f"loss{suffix}" for suffix in suffixes], history, f"{config.arch} ({config.imp})")
    write_json(out / "metrics.json", {"config": dataclasses.asdict(config), "history": history})
    save_checkpoint(out, Checkpoint(model.state(), optimizer.state_dict(), dataclasses.asdict(config), history, step + 1, (data.mean, data.std)))


def _to_device(value: Any, device: str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: _to_device(item, device) for key, item in value.items()}
    if isinstance(value, list):
        return [_to_device(item, device) for item in value]
    return value
