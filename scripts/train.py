"""Training the time-sequence predictor: functional (torch.func.grad) or torch.nn (autograd), same optimizer."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.func import grad_and_value

from functional.predictor import init_predictor, predict
from functional.registry import ARCHS, split_buffers
from functional.transforms import mse
from parity.predictor import to_torch_predictor
from scripts.checkpoint import CHECKPOINT, Checkpoint, CheckpointError, remove_stale_temps, save_checkpoint, write_json
from scripts.data import Dataset, check_future, make_dataset
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


class Interrupted(RuntimeError):
    """Ctrl-C (SIGINT) stopped the run at a step boundary, which is saved; the message says where and how to resume."""

    def __init__(self, message: str, completed: int):
        super().__init__(message)
        self.completed = completed  # steps in the saved checkpoint


class _StopStep(Exception):
    """Raised inside the closure when Ctrl-C was pressed: abandons the partial optimizer step."""


def check_config(config: TrainConfig) -> None:
    """The options no CLI type check covers (nan/inf --lr, seed range, --future limit); ValueError naming the option."""
    if config.arch not in ARCHS:
        raise ValueError(f"--arch: expected one of {', '.join(ARCHS)}, got {config.arch!r}")
    if not isinstance(config.lr, (int, float)) or not math.isfinite(config.lr) or config.lr < 0:
        raise ValueError(f"--lr: expected a finite number >= 0, got {config.lr}")
    if not isinstance(config.seed, int) or not 0 <= config.seed < 2**32:
        raise ValueError(f"--seed: expected an int in [0, 2**32 - 1] (numpy's seed range), got {config.seed}")
    check_future(config.future)


def resolve_device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


class FunctionalModel:
    """Params dict + `torch.func.grad_and_value`; the optimizer updates the dict's tensors in place."""

    def __init__(self, config: TrainConfig, params: dict[str, torch.Tensor]):
        self.arch, self.params = config.arch, params
        self.trainable, self.constants = split_buffers(config.arch, params)  # e.g. SRU's scale_x is never trained

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
    Raises Interrupted on Ctrl-C (SIGINT): pressed during a step, that partial step is discarded and the
    state at its start (params, optimizer state, history) is saved; pressed while a finished step is being
    written, that step is completed and saved first. Either way `--resume` continues exactly as an
    uninterrupted run would (same losses bit for bit).
    """
    device = resolve_device(config.device)
    dtype = DTYPES[config.dtype]
    data = data or load_data(config, resume_from)
    if resume_from:
        check_resume(config, resume_from, out)
    params = {k: v.to(device=device, dtype=dtype).clone() for k, v in resume_from.params.items()} if resume_from else initial_params(config, device)
    model = MODELS[config.imp](config, params)
    optimizer = make_optimizer(config, model.tensors())
    history: list[dict[str, Any]] = list(resume_from.history) if resume_from else []
    if resume_from and resume_from.optimizer:
        try:
            optimizer.load_state_dict(_to_device(resume_from.optimizer, device))
        except (ValueError, KeyError, RuntimeError, TypeError) as error:
            raise CheckpointError(f"{out}: optimizer state does not fit this run ({error})") from None
    remove_stale_temps(out)  # temporary files of a run killed mid-write
    predictions = None
    with _deferred_sigint() as sigint:
        for step in range(resume_from.step if resume_from else 0, config.steps):
            evaluations, last_loss = 0, math.nan
            start = time.perf_counter()
            boundary = _snapshot(model, optimizer, history)  # what an interruption during this step saves

            def closure() -> torch.Tensor:
                nonlocal evaluations, last_loss
                if sigint.pressed:
                    raise _StopStep
                optimizer.zero_grad()
                loss = model.loss_and_grad(data.train_input, data.train_target)
                evaluations, last_loss = evaluations + 1, loss.item()
                on_event(StepEvent(step, evaluations, last_loss, False))
                return loss

            try:
                with sigint.hard():  # a second Ctrl-C stops an evaluation at once; the step is discarded either way
                    if config.optimizer == "lbfgs":
                        optimizer.step(closure)
                    else:
                        closure()
                        optimizer.step()
            except (_StopStep, KeyboardInterrupt):
                _save_boundary(out, config, data, boundary)
                raise Interrupted(_interrupted_message(out, step, step), step) from None
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
            if sigint.pressed and step + 1 < config.steps:
                raise Interrupted(_interrupted_message(out, step + 1, None), step + 1)
    if predictions is None:  # nothing left to train (resumed a finished run): forecast once for the result
        with torch.no_grad():
            predictions = data.to_original(model.forecast(data.test_input, config.future))
    return RunResult(history, predictions, data.test_input.shape[0], out)


class _Sigint:
    """SIGINT state during training: `pressed` after the first Ctrl-C; a second one raises only inside `hard()`."""

    def __init__(self) -> None:
        self.count = 0
        self._hard = False

    @property
    def pressed(self) -> bool:
        return self.count > 0

    def handle(self, signum: int, frame: Any) -> None:
        self.count += 1
        if self.count > 1 and self._hard:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def hard(self) -> Iterator[None]:
        self._hard = True
        try:
            yield
        finally:
            self._hard = False


@contextlib.contextmanager
def _deferred_sigint() -> Iterator[_Sigint]:
    """Turn Ctrl-C into a flag that the loop checks between closure evaluations and after each saved step.

    So an interruption never lands inside a checkpoint write or half-way through an optimizer update.
    Outside the main thread (where Python delivers no SIGINT) it installs nothing.
    """
    sigint = _Sigint()
    if threading.current_thread() is not threading.main_thread():
        yield sigint
        return
    previous = signal.signal(signal.SIGINT, sigint.handle)
    try:
        yield sigint
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclass
class _Boundary:
    """The run's state at the start of a step: params, optimizer state and history, copied."""

    params: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    history: list[dict[str, Any]]


def _snapshot(model: Any, optimizer: torch.optim.Optimizer, history: list[dict[str, Any]]) -> _Boundary:
    params = {key: value.detach().clone() for key, value in model.state().items()}
    return _Boundary(params, copy.deepcopy(optimizer.state_dict()), list(history))


def _save_boundary(out: Path, config: TrainConfig, data: Dataset, boundary: _Boundary) -> None:
    """Save the step boundary (atomically; SIGINT ignored while writing): what --resume continues from."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if threading.current_thread() is threading.main_thread() else None
    try:
        config_dict = dataclasses.asdict(config)
        write_json(out / "metrics.json", {"config": config_dict, "history": boundary.history})
        save_checkpoint(out, Checkpoint(boundary.params, boundary.optimizer, config_dict, boundary.history, len(boundary.history), (data.mean, data.std)))
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _interrupted_message(out: Path, completed: int, during: int | None) -> str:
    where = f"during step {during} (that partial step is discarded)" if during is not None else f"after step {completed - 1}"
    return (
        f"interrupted {where}; the state after {completed} completed step(s) is saved in {out / CHECKPOINT}; "
        f"resume with: cells train --resume {out}"
    )


def check_resume(config: TrainConfig, checkpoint: Checkpoint, out: Path) -> None:
    """Before a resumed run builds anything: the checkpoint's params and optimizer state fit `config` (CheckpointError otherwise)."""
    check_params_fit(config, checkpoint.params, out)
    if checkpoint.optimizer:
        shapes = [value.shape for value in split_buffers(config.arch, checkpoint.params)[0].values()]
        check_optimizer_state(checkpoint.optimizer, make_optimizer(config, [torch.empty(shape, device="meta", requires_grad=True) for shape in shapes]), out)


def check_params_fit(config: TrainConfig, params: dict[str, torch.Tensor], out: Path) -> None:
    """The checkpoint's params must be exactly the keys and shapes of a `config.arch` predictor of this size."""
    expected = init_predictor(config.arch, 1, config.hidden, layers=config.layers, device="meta")
    missing, extra = [key for key in expected if key not in params], [key for key in params if key not in expected]
    what = f"a {config.layers}-layer {config.arch} predictor with hidden {config.hidden}"
    if missing or extra:
        key = (missing or extra)[0]
        raise CheckpointError(f"{out}: the checkpoint's params do not fit {what}: {'missing' if missing else 'unexpected'} key {key!r}")
    for key, value in expected.items():
        if tuple(params[key].shape) != tuple(value.shape):
            raise CheckpointError(f"{out}: params[{key!r}]: expected shape {tuple(value.shape)} for {what}, got {tuple(params[key].shape)}")


def check_optimizer_state(state: Any, optimizer: torch.optim.Optimizer, out: Path) -> None:
    """Validate a saved optimizer state_dict against the fresh `optimizer` before loading it (CheckpointError otherwise)."""

    def bad(where: str, expected: str, got: Any) -> CheckpointError:
        if isinstance(got, torch.Tensor):
            shown = f"shape {tuple(got.shape)}"
        elif isinstance(got, (list, dict)) and not (isinstance(got, list) and all(isinstance(item, (str, int)) for item in got)):
            shown = type(got).__name__
        else:
            shown = repr(got)
        return CheckpointError(f"{out}: optimizer state {where}: expected {expected}, got {shown}")

    fresh = optimizer.state_dict()
    if not isinstance(state, dict) or set(state) != {"state", "param_groups"}:
        raise bad("", "a dict with 'state' and 'param_groups'", state)
    groups = state["param_groups"]
    if not isinstance(groups, list) or len(groups) != len(fresh["param_groups"]):
        raise bad("'param_groups'", f"a list of {len(fresh['param_groups'])} group(s)", groups)
    for index, (group, reference) in enumerate(zip(groups, fresh["param_groups"])):
        if not isinstance(group, dict) or set(group) != set(reference):
            raise bad(f"param_groups[{index}]", f"keys {sorted(reference)}", sorted(group) if isinstance(group, dict) else group)
        for key, value in reference.items():
            got = group[key]
            if key == "params" and got != value:
                raise bad(f"param_groups[{index}]['params']", str(value), got)
            if isinstance(value, bool) or value is None or isinstance(value, str):
                ok = isinstance(got, bool) if isinstance(value, bool) else (got is None or isinstance(got, str))
            elif isinstance(value, (int, float)):
                ok = isinstance(got, (int, float)) and not isinstance(got, bool) and math.isfinite(got)
            else:  # betas: a pair of numbers
                ok = isinstance(got, (list, tuple)) and len(got) == len(value) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in got)
            if not ok:
                raise bad(f"param_groups[{index}][{key!r}]", f"a value like {value!r}", got)
    if groups[0].get("line_search_fn") not in (None, "strong_wolfe"):
        raise bad("param_groups[0]['line_search_fn']", "None or 'strong_wolfe'", groups[0]["line_search_fn"])
    per_param = state["state"]
    tensors = optimizer.param_groups[0]["params"]
    if not isinstance(per_param, dict) or not all(isinstance(k, int) and 0 <= k < len(tensors) for k in per_param):
        raise bad("'state'", f"a dict keyed by parameter indices 0..{len(tensors) - 1}", per_param)

    def tensor(where: str, value: Any, shape: tuple[int, ...]) -> None:
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or tuple(value.shape) != shape:
            raise bad(where, f"a floating-point tensor of shape {shape}", value)

    def number(where: str, value: Any, integer: bool = False) -> None:
        if isinstance(value, torch.Tensor) and not integer and value.numel() == 1 and value.is_floating_point():
            return
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            raise bad(where, "an int" if integer else "a number", value)

    if isinstance(optimizer, torch.optim.LBFGS):
        if set(per_param) - {0}:
            raise bad("'state'", "LBFGS state under parameter 0 only", sorted(per_param))
        lbfgs = per_param.get(0, {})
        size = sum(t.numel() for t in tensors)
        allowed = {"func_evals", "n_iter", "d", "t", "old_dirs", "old_stps", "ro", "H_diag", "prev_flat_grad", "prev_loss", "al"}
        if not isinstance(lbfgs, dict) or set(lbfgs) - allowed:
            raise bad("state[0]", f"LBFGS keys among {sorted(allowed)}", sorted(lbfgs) if isinstance(lbfgs, dict) else lbfgs)
        for key in ("func_evals", "n_iter"):
            if key in lbfgs:
                number(f"state[0][{key!r}]", lbfgs[key], integer=True)
        for key in ("t", "H_diag", "prev_loss"):
            if key in lbfgs:
                number(f"state[0][{key!r}]", lbfgs[key])
        for key in ("d", "prev_flat_grad"):
            if key in lbfgs:
                tensor(f"state[0][{key!r}]", lbfgs[key], (size,))
        history_size = groups[0]["history_size"]
        for key in ("old_dirs", "old_stps", "ro", "al"):
            value = lbfgs.get(key, [])
            if not isinstance(value, list) or len(value) > max(history_size, 0):
                raise bad(f"state[0][{key!r}]", f"a list of at most {history_size} entries", value)
            for position, item in enumerate(value):
                if key in ("old_dirs", "old_stps"):
                    tensor(f"state[0][{key!r}][{position}]", item, (size,))
                elif not (key == "al" and item is None):
                    number(f"state[0][{key!r}][{position}]", item)
        if len(lbfgs.get("old_dirs", [])) != len(lbfgs.get("old_stps", [])) or len(lbfgs.get("ro", [])) != len(lbfgs.get("old_dirs", [])):
            raise bad("state[0]", "'old_dirs', 'old_stps' and 'ro' of one length", [len(lbfgs.get(k, [])) for k in ("old_dirs", "old_stps", "ro")])
    else:  # Adam: per parameter, moments of the parameter's shape
        for index, entry in per_param.items():
            shape = tuple(tensors[index].shape)
            if not isinstance(entry, dict) or not {"step", "exp_avg", "exp_avg_sq"} <= set(entry) <= {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}:
                raise bad(f"state[{index}]", "Adam keys 'step', 'exp_avg', 'exp_avg_sq'", sorted(entry) if isinstance(entry, dict) else entry)
            number(f"state[{index}]['step']", entry["step"])
            for key in set(entry) - {"step"}:
                tensor(f"state[{index}][{key!r}]", entry[key], shape)


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
