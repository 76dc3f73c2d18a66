"""The `cells` command: one Typer app, one module per command."""

from __future__ import annotations

import typer

from scripts.bench import bench
from scripts.gradflow_command import gradflow
from scripts.parity_command import parity
from scripts.train_command import compare, predict, train

app = typer.Typer(help="Functional recurrent cells for PyTorch: train, compare and prove parity with torch.nn.", no_args_is_help=True, add_completion=False)


@app.callback()
def main() -> None:
    """Functional recurrent cells for PyTorch: train, compare and prove parity with torch.nn."""


app.command()(train)
app.command()(compare)
app.command()(predict)
app.command()(parity)
app.command()(bench)
app.command()(gradflow)

if __name__ == "__main__":
    app()
