"""Figures in the style of the PyTorch example: solid input, dotted forecast, one colour per series."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

COLORS = ("r", "g", "b", "c", "m", "y", "k")
TITLE = "Predict future values for time sequences\n(Dashed lines are predicted values)"


def _save(figure: Any, paths: list[Path]) -> None:
    for path in paths:
        figure.savefig(path)
    plt.close(figure)


def _forecast_figure(title: str) -> Any:
    """The example's wide figure: big title and ticks, x and y axes."""
    figure = plt.figure(figsize=(30, 10))
    plt.title(title, fontsize=30)
    plt.xlabel("x", fontsize=20)
    plt.ylabel("y", fontsize=20)
    plt.xticks(fontsize=20)
    plt.yticks(fontsize=20)
    return figure


def plot_forecast(paths: list[Path], predictions: np.ndarray, known: int, *, title: str = TITLE, truth: np.ndarray | None = None, overlay: np.ndarray | None = None, labels: tuple[str, str] = ("", "")) -> None:
    """`predictions: (known + future, M)`: solid for the first `known` steps, dotted after.

    `truth: (future, M)` (held-out values) is drawn in grey; `overlay` is a second prediction of the
    same shape (e.g. torch's next to functional's), drawn dashed and thinner.
    """
    figure = _forecast_figure(title)
    steps = np.arange(predictions.shape[0])
    for series in range(predictions.shape[1]):
        color = COLORS[series % len(COLORS)]
        label = f"{labels[0]} series {series}" if labels[0] else None
        plt.plot(steps[:known], predictions[:known, series], color, linewidth=2.0, label=label)
        plt.plot(steps[known:], predictions[known:, series], color + ":", linewidth=2.0)
        if overlay is not None:
            plt.plot(steps, overlay[:, series], color + "--", linewidth=1.0, alpha=0.8, label=f"{labels[1]} series {series}" if labels[1] else None)
        if truth is not None:
            plt.plot(steps[known : known + len(truth)], truth[:, series], color="0.5", linewidth=1.0, label="truth" if series == 0 else None)
    if labels[0] or truth is not None:
        plt.legend(fontsize=16)
    _save(figure, paths)


def plot_losses(paths: list[Path], history: list[dict[str, Any]], title: str) -> None:
    """Train and test loss per step on a log scale."""
    figure = plt.figure(figsize=(8, 5))
    steps = [entry["step"] for entry in history]
    for key in ("train_loss", "test_loss", "forecast_loss"):
        values = [entry.get(key) for entry in history]
        if any(value is not None for value in values):
            plt.semilogy(steps, values, marker="o", label=key.replace("_", " "))
    plt.xlabel("step")
    plt.ylabel("MSE")
    plt.title(title)
    plt.legend()
    plt.grid(True, which="both", alpha=0.3)
    _save(figure, paths)


def plot_ensemble_forecast(paths: list[Path], predictions: np.ndarray, known: int, *, title: str, truth: np.ndarray | None = None) -> None:
    """`predictions: (K, known + future, M)`: each series' member mean (solid, then dotted) and its min-max band."""
    figure = _forecast_figure(title)
    steps = np.arange(predictions.shape[1])
    mean, low, high = predictions.mean(0), predictions.min(0), predictions.max(0)
    for series in range(predictions.shape[2]):
        color = COLORS[series % len(COLORS)]
        plt.plot(steps[:known], mean[:known, series], color, linewidth=2.0)
        plt.plot(steps[known:], mean[known:, series], color + ":", linewidth=2.0)
        plt.fill_between(steps, low[:, series], high[:, series], color=color, alpha=0.2, linewidth=0, label=f"series {series}: min-max of {predictions.shape[0]} members")
        if truth is not None:
            plt.plot(steps[known : known + len(truth)], truth[:, series], color="0.5", linewidth=1.0, label="truth" if series == 0 else None)
    plt.legend(fontsize=16)
    _save(figure, paths)


def plot_ensemble_losses(paths: list[Path], history: list[dict[str, Any]], title: str) -> None:
    """Each member's train loss (solid) and test loss (dashed) per step, log scale."""
    figure = plt.figure(figsize=(8, 5))
    steps = [entry["step"] for entry in history]
    train, test = np.array([entry["train_loss"] for entry in history]), np.array([entry["test_loss"] for entry in history])
    for member in range(train.shape[1]):
        color = f"C{member % 10}"
        plt.semilogy(steps, train[:, member], color=color, label=f"member {member} train")
        plt.semilogy(steps, test[:, member], color=color, linestyle="--", alpha=0.7)
    plt.xlabel("step")
    plt.ylabel("MSE (dashed: test)")
    plt.title(title)
    plt.legend(fontsize=8)
    plt.grid(True, which="both", alpha=0.3)
    _save(figure, paths)


def plot_gradflow(paths: list[Path], results: dict[str, Any], title: str) -> None:
    """Left: `||dL/ds_t||` of the top cell against the distance to the loss (log); right: the step Jacobian's norm along the trajectory.

    `results[arch]["init" | "trained"]` hold `state_gradient_norms` (layers, T) and `jacobian_norms_median` (T,);
    dashed lines are at init, solid after training.
    """
    floor = 1e-30  # below this every curve is just the same straight decay (and float64 underflows near 1e-308)
    figure, (flow, jacobian) = plt.subplots(1, 2, figsize=(16, 6), gridspec_kw={"width_ratios": [3, 2]})
    reach, peak = 1, floor  # the largest distance at which some curve is still above the floor; the largest norm
    for index, (arch, entry) in enumerate(results.items()):
        color = f"C{index % 10}"
        for when, style in (("init", "--"), ("trained", "-")):
            if when not in entry:
                continue
            norms = np.asarray(entry[when]["state_gradient_norms"])[-1]  # top cell, (T,)
            distance = norms.shape[0] - np.arange(norms.shape[0])  # s_t is T - t steps before the loss
            label = f"{arch} ({when})" + (" (diverged: init only)" if when == "init" and "diverged" in entry else "")
            above = distance[norms > floor]
            reach, peak = max(reach, int(above.max()) if above.size else 1), max(peak, float(norms.max()))
            flow.semilogy(distance, np.maximum(norms, np.finfo(float).tiny), color=color, linestyle=style, label=label)
            jacobian.plot(np.asarray(entry[when]["jacobian_norms_median"]), color=color, linestyle=style, label=f"{arch} ({when})")
    flow.set_ylim(floor, peak * 10)
    flow.set_xlim(0, reach * 1.05)
    flow.set_xlabel("steps between the state and the loss (T - t)")
    flow.set_ylabel("||dL/ds_t|| (top cell)")
    flow.set_title("how much the last step's loss depends on the state at t")
    flow.grid(True, which="major", alpha=0.3)
    flow.legend(fontsize=8, ncol=2)
    jacobian.set_xlabel("step t")
    jacobian.set_ylabel("median ||ds_t/ds_{t-1}||_2 (top cell)")
    jacobian.set_title("spectral norm of one step's Jacobian")
    jacobian.grid(True, alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    _save(figure, paths)
