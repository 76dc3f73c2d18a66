"""The one error format of every `cells` command: `error: ...` on one line of stderr, then an exit code."""

from __future__ import annotations

import typer
from rich.console import Console

errors = Console(stderr=True)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one line to stderr and return the Exit to raise."""
    errors.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code)
