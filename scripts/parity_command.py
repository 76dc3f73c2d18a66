"""`cells parity`: prove functional == torch.nn for every arch, and that vmap works where nn cannot."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from parity.suite import parity_rows, vmap_rows


def parity(seed: int = typer.Option(0, help="Seed for params, inputs and cotangents.")) -> None:
    """Compare every registered arch with torch.nn (outputs, final carry, gradients); exit 1 on any failure."""
    console = Console()
    table = Table(title="functional vs torch.nn: max |Δ| / max |torch value|")
    for column in ("arch", "form", "dtype", "Δ out", "Δ grad", "tol out/grad", "ok"):
        table.add_column(column, justify="right" if column.startswith("Δ") else "left", no_wrap=True)
    failures = 0
    for row in parity_rows(seed=seed):
        dtype = str(row.dtype).removeprefix("torch.")
        if row.report is None:
            table.add_row(row.arch, row.form, dtype, "-", "-", "-", f"[yellow]skipped[/]: {row.skipped}")
            continue
        failures += not row.passed
        out_tol, grad_tol = row.tolerances
        table.add_row(
            row.arch, row.form, dtype, f"{row.report.relative_out:.2e}", f"{row.report.relative_grad:.2e}", f"{out_tol:.0e}/{grad_tol:.0e}",
            "[green]yes[/]" if row.passed else "[red]NO[/]",
        )
    console.print(table)

    vmap_table = Table(title="vmap over K stacked param sets vs a loop (float64)")
    for column in ("arch", "K", "max |Δ|", "ok"):
        vmap_table.add_column(column)
    for row in vmap_rows(seed=seed):
        failures += not row.passed
        vmap_table.add_row(row.arch, str(row.members), f"{row.max_difference:.2e}", "[green]yes[/]" if row.passed else "[red]NO[/]")
    console.print(vmap_table)
    console.print("(torch.nn cells cannot do this: vmap has no batching rule for aten::lstm_cell)")
    if failures:
        console.print(f"[red]{failures} check(s) failed[/]")
        raise typer.Exit(1)
    console.print("[green]all parity checks passed[/]")
