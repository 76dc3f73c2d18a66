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


def plot_forecast(paths: list[Path], predictions: np.ndarray, known: int, *, title: str = TITLE, truth: np.ndarray | None = None, overlay: np.ndarray | None = None, labels: tuple[str, str] = ("", "")) -> None:
    """`predictions: (known + future, M)`: solid for the first `known` steps, dotted after.

    `truth: (future, M)` (held-out values) is drawn in grey; `overlay` is a second prediction of the
    same shape (e.g. torch's next to functional's), drawn dashed and thinner.
    """
    figure = plt.figure(figsize=(30, 10))
    plt.title(title, fontsize=30)
    plt.xlabel("x", fontsize=20)
    plt.ylabel("y", fontsize=20)
    plt.xticks(fontsize=20)
    plt.yticks(fontsize=20)
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
