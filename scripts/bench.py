"""`cells bench`: time the functional predictor against torch.nn cell loops and fused nn.LSTM/GRU/RNN on the example's workload."""

from __future__ import annotations

import gc
import itertools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

if __package__ in (None, ""):  # run as `python scripts/bench.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import typer
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.func import grad_and_value

from functional.predictor import init_predictor, predict, predictor_cells
from functional.transforms import mse
from parity.convert import TORCH_MODULES, to_torch
from parity.predictor import to_torch_predictor
from scripts.data import sine_waves
from scripts.errors import fail

DTYPES = {"float64": torch.float64, "float32": torch.float32}
ARCHS = ("lstm", "gru", "rnn_tanh")  # the default; any arch with both an nn cell and a fused nn layer may be asked for
IMPLEMENTATIONS = ("functional", "cell_loop", "fused")  # predict + torch.func | the example's nn cells stepped in Python | nn.LSTM/GRU/RNN
PASSES = ("forward", "grad")  # forward under no_grad | forward + gradient of the MSE loss wrt every parameter


@dataclass(frozen=True)
class Workload:
    """`sequences` sine waves of `length` steps (input size 1), two stacked cells and a linear head."""

    sequences: int
    length: int


FULL = Workload(97, 999)  # W: pytorch/examples time_sequence_prediction (data[3:, :-1] -> data[3:, 1:])
QUICK = Workload(16, 200)
LAYERS = 2
# Issue 6's targets on W for lstm and gru: functional forward+grad time / baseline forward+backward time <= limit.
TARGETS = (("float64", "cell_loop", 0.5), ("float64", "fused", 1.0), ("float32", "fused", 1.5))
TARGET_ARCHS = ("lstm", "gru")
# Same loss (and gradient) from every implementation before anything is timed: relative tolerances per dtype.
LOSS_TOLERANCE = {"float64": 1e-10, "float32": 1e-4}
GRAD_TOLERANCE = {"float64": 1e-8, "float32": 1e-2}


class Mismatch(RuntimeError):
    """Two implementations disagree: the benchmark would not compare like with like."""


@dataclass
class Row:
    """One (arch, dtype, hidden) measurement: medians and every repetition in ms, ratios, and the agreement check."""

    arch: str
    dtype: str
    hidden: int
    loss: float
    loss_relative_difference: float  # max over implementations and passes, against functional forward+grad
    grad_relative_difference: float  # max |Δ| / max |g| over all parameters, against functional forward+grad
    median_ms: dict[str, dict[str, float]]  # implementation -> pass -> median
    times_ms: dict[str, dict[str, list[float]]]  # implementation -> pass -> every timed repetition
    ratios: dict[str, dict[str, float]]  # pass -> {"cell_loop": functional / cell loop, "fused": functional / fused}


class FusedPredictor(nn.Module):
    """`nn.LSTM/GRU/RNN(num_layers=2)` and an `nn.Linear` head: the example's model as one fused layer call."""

    def __init__(self, rnn: nn.Module, head: nn.Linear):
        super().__init__()
        self.rnn, self.head = rnn, head

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """`inputs: (T, B, I)` -> `(T, B, O)`."""
        return self.head(self.rnn(inputs)[0])


def to_fused(arch: str, params: dict[str, torch.Tensor]) -> tuple[FusedPredictor, dict[str, str]]:
    """The fused module holding copies of predictor params, and a map from its parameter names to the params' keys."""
    names = {f"rnn.{key}_l{layer}": f"cells.{layer}.{key}" for layer, cell in enumerate(predictor_cells(params)) for key in cell}
    names.update({"head.weight": "head.weight", "head.bias": "head.bias"})
    rnn = to_torch(arch, {name.removeprefix("rnn."): params[key] for name, key in names.items() if name.startswith("rnn.")})
    weight = params["head.weight"]
    head = nn.Linear(weight.shape[1], weight.shape[0], dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(params["head.bias"])
    return FusedPredictor(rnn, head), names


def workload_data(workload: Workload, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`(inputs, target)`, each `(length, sequences, 1)`: the example's sine waves (series 3.. as in its training split)."""
    waves = sine_waves(length=max(1000, workload.length + 1), count=max(100, workload.sequences + 3))[3 : 3 + workload.sequences, : workload.length + 1]
    series = torch.from_numpy(waves.T.copy()).to(dtype).unsqueeze(-1)  # (length + 1, sequences, 1)
    return series[:-1], series[1:]


Call = Callable[[], tuple[torch.Tensor, Optional[dict[str, torch.Tensor]]]]  # () -> (loss, grads keyed like params, or None)


def implementations(arch: str, params: dict[str, torch.Tensor], inputs: torch.Tensor, target: torch.Tensor) -> dict[tuple[str, str], Call]:
    """`(implementation, pass) -> call`; each call returns `(loss, grads keyed like params or None)`."""
    cell_loop = to_torch_predictor(arch, params)
    fused, fused_names = to_fused(arch, params)

    def functional_forward():
        with torch.no_grad():
            return mse(predict(arch, params, inputs)[0], target), None

    def functional_grad():  # what `cells train --imp functional` does for every closure evaluation
        grads, loss = grad_and_value(lambda p: mse(predict(arch, p, inputs)[0], target))(params)
        return loss, grads

    def module_calls(module: nn.Module, names: dict[str, str]):
        def forward():
            with torch.no_grad():
                return mse(module(inputs), target), None

        def grad():  # what `cells train --imp torch` does
            module.zero_grad(set_to_none=True)
            loss = mse(module(inputs), target)
            loss.backward()
            return loss.detach(), {names[name]: parameter.grad for name, parameter in module.named_parameters()}

        return forward, grad

    calls = {("functional", "forward"): functional_forward, ("functional", "grad"): functional_grad}
    for name, module, names in (("cell_loop", cell_loop, {key: key for key in params}), ("fused", fused, fused_names)):
        calls[(name, "forward")], calls[(name, "grad")] = module_calls(module, names)
    return calls


def _relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value - reference).abs().max() / reference.abs().max().clamp_min(torch.finfo(reference.dtype).tiny)).item()


def check_agreement(label: str, dtype: str, results: dict[tuple[str, str], tuple[torch.Tensor, Optional[dict]]]) -> tuple[float, float, float]:
    """`(loss, loss Δ, grad Δ)` against functional forward+grad; raises Mismatch beyond LOSS_TOLERANCE / GRAD_TOLERANCE."""
    loss, grads = results[("functional", "grad")]
    loss_difference = max(_relative(other, loss) for other, _ in results.values())
    grad_difference = max(
        _relative(other[key], grads[key]) for (_, pass_), (_, other) in results.items() if pass_ == "grad" for key in grads
    )
    if not loss_difference <= LOSS_TOLERANCE[dtype]:  # `not <=` also catches nan
        worst = max(results, key=lambda key: _relative(results[key][0], loss))
        raise Mismatch(f"{label}: {worst[0]} {worst[1]} loss {results[worst][0].item():.12e} differs from functional's {loss.item():.12e} "
                       f"by {loss_difference:.1e} relative (> {LOSS_TOLERANCE[dtype]:.0e}); the implementations do not compute the same model")
    if not grad_difference <= GRAD_TOLERANCE[dtype]:
        raise Mismatch(f"{label}: gradients differ by {grad_difference:.1e} relative (> {GRAD_TOLERANCE[dtype]:.0e}) between functional, cell loop and fused")
    return loss.item(), loss_difference, grad_difference


def measure(arch: str, dtype: str, hidden: int, workload: Workload, reps: int, *, seed: int = 0, on_round: Callable[[int], None] = lambda done: None) -> Row:
    """Check that all implementations agree (this is also the warm-up), then time `reps` interleaved rounds.

    `on_round(k)` is called before round k (0: the warm-up and check; 1..reps: the timed rounds).
    """
    on_round(0)
    generator = torch.Generator().manual_seed(seed)
    drawn = init_predictor(arch, 1, hidden, layers=LAYERS, generator=generator)  # float32 draws, then cast, as the example
    params = {key: value.to(DTYPES[dtype]) for key, value in drawn.items()}
    inputs, target = workload_data(workload, DTYPES[dtype])
    calls = implementations(arch, params, inputs, target)
    loss, loss_difference, grad_difference = check_agreement(f"{arch} {dtype} hidden {hidden}", dtype, {key: call() for key, call in calls.items()})
    keys = list(calls)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in keys}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # as timeit does: a collection would land on whichever call happens to be running
    try:
        for rep in range(reps):
            on_round(rep + 1)
            for key in keys[rep % len(keys) :] + keys[: rep % len(keys)]:  # round-robin, starting one further each round
                start = time.perf_counter()
                calls[key]()
                times[key].append((time.perf_counter() - start) * 1e3)
    finally:
        if gc_was_enabled:
            gc.enable()
    median = {imp: {pass_: statistics.median(times[(imp, pass_)]) for pass_ in PASSES} for imp in IMPLEMENTATIONS}
    ratios = {pass_: {base: median["functional"][pass_] / median[base][pass_] for base in ("cell_loop", "fused")} for pass_ in PASSES}
    return Row(arch, dtype, hidden, loss, loss_difference, grad_difference, median,
               {imp: {pass_: times[(imp, pass_)] for pass_ in PASSES} for imp in IMPLEMENTATIONS}, ratios)


def judge_targets(rows: list[Row]) -> list[dict[str, Any]]:
    """Issue 6's targets for every lstm/gru row (meaningful on the full workload W only)."""
    verdicts = []
    for row in rows:
        for dtype, base, limit in TARGETS:
            if row.arch in TARGET_ARCHS and row.dtype == dtype:
                ratio = row.ratios["grad"][base]
                verdicts.append({"arch": row.arch, "dtype": dtype, "hidden": row.hidden, "baseline": base,
                                 "ratio": ratio, "limit": limit, "pass": ratio <= limit})
    return verdicts


def machine() -> dict[str, Any]:
    """Platform, CPU model (from /proc/cpuinfo where there is one), cores, torch version and threads."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


# -- the command ---------------------------------------------------------------------------------------------------



def _split(values: Optional[list[str]]) -> list[str]:
    """The items of a repeatable, comma-separated option."""
    return [item.strip() for value in values or () for item in value.split(",") if item.strip()]


def _choices(option: str, values: Optional[list[str]], default: tuple[str, ...], allowed: tuple[str, ...]) -> list[str]:
    """A repeatable and/or comma-separated choice option, in the given order, without duplicates."""
    items = _split(values) or list(default)
    for item in items:
        if item not in allowed:
            raise fail(f"{option} {item}: expected one of {', '.join(allowed)}")
    return list(dict.fromkeys(items))


def _int(option: str, value: str, minimum: int) -> int:
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < minimum:
        raise fail(f"{option} {value}: expected an int >= {minimum}")
    return number


def _measure_with_status(console: Console, arch: str, dtype: str, hidden: int, workload: Workload, reps: int) -> Row:
    """`measure` with a live status line (round k of reps), then one summary line; a Mismatch is one line and exit 1."""
    start = time.perf_counter()
    label = f"{arch} {dtype} hidden {hidden}"
    with console.status(label) as status:
        try:
            row = measure(arch, dtype, hidden, workload, reps,
                          on_round=lambda done: status.update(f"{label}: " + (f"round {done}/{reps}" if done else "warm-up and agreement check")))
        except Mismatch as error:
            status.stop()
            raise fail(str(error), code=1) from None
    console.print(f"[dim]{label}: loss {row.loss:.10e}, all agree to {row.loss_relative_difference:.0e} (grads {row.grad_relative_difference:.0e}); "
                  f"{time.perf_counter() - start:.1f} s[/]", highlight=False)
    return row


def _table(rows: list[Row], workload: Workload, reps: int) -> Table:
    table = Table(title=f"median of {reps} (ms) on {workload.sequences} sequences x {workload.length} steps; ratios: functional / baseline")
    columns = ("arch", "dtype", "hidden", "fn fwd", "fn grad", "cell fwd", "cell f+b", "fused fwd", "fused f+b",
               "fwd /cell", "fwd /fused", "grad /cell", "grad /fused")
    for column in columns:
        table.add_column(column, justify="left" if column in ("arch", "dtype") else "right", no_wrap=True)
    for row in rows:
        times = [f"{row.median_ms[imp][pass_]:.1f}" for imp in IMPLEMENTATIONS for pass_ in PASSES]
        ratios = [f"{row.ratios[pass_][base]:.2f}x" for pass_ in PASSES for base in ("cell_loop", "fused")]
        table.add_row(row.arch, row.dtype, str(row.hidden), *times, *ratios)
    return table


# Options: ints are parsed here (not by click) so that every bad value is one line and exit 2, like fail().
QuickOption = Annotated[bool, typer.Option("--quick", help=f"{QUICK.sequences} sequences x {QUICK.length} steps, hidden 51, 3 reps: a smoke run.")]
ArchsOption = Annotated[Optional[list[str]], typer.Option(metavar="NAMES", help="Arch(s), repeatable or comma-separated. (default: lstm,gru,rnn_tanh)")]
DTypesOption = Annotated[Optional[list[str]], typer.Option(metavar="DTYPES", help="float64 and/or float32, repeatable or comma-separated. (default: both)")]
HiddensOption = Annotated[Optional[list[str]], typer.Option(metavar="INTS", help="Hidden size(s), repeatable or comma-separated. (default: 51,256; quick: 51)")]
RepsOption = Annotated[Optional[str], typer.Option(metavar="INT", help="Timed rounds after the warm-up, >= 3. (default: 5; 3 with --quick)")]
ThreadsOption = Annotated[str, typer.Option(metavar="INT", help="torch intra-op threads.")]
SequencesOption = Annotated[Optional[str], typer.Option(metavar="INT", help=f"Sequences. (default: {FULL.sequences}; {QUICK.sequences} with --quick)")]
LengthOption = Annotated[Optional[str], typer.Option(metavar="INT", help=f"Time steps per sequence. (default: {FULL.length}; {QUICK.length} with --quick)")]
JsonOption = Annotated[Optional[Path], typer.Option("--json", metavar="FILE", help="Also write config, machine, rows (medians, every rep, ratios), targets.")]


def _print_targets(console: Console, rows: list[Row]) -> list[dict[str, Any]]:
    """Judge issue 6's targets, print them as a PASS/MISS table and a count, and return the verdicts."""
    targets = judge_targets(rows)
    if not targets:
        console.print(f"targets: none measured (they concern {' and '.join(TARGET_ARCHS)})")
        return targets
    table = Table(title="issue 6 targets (functional forward+grad / baseline forward+backward)")
    for column in ("arch", "dtype", "hidden", "baseline", "ratio", "limit", "verdict"):
        table.add_column(column, justify="right" if column in ("hidden", "ratio", "limit") else "left", no_wrap=True)
    for verdict in targets:
        table.add_row(verdict["arch"], verdict["dtype"], str(verdict["hidden"]), verdict["baseline"], f"{verdict['ratio']:.2f}x", f"{verdict['limit']:.1f}x",
                      "[green]PASS[/]" if verdict["pass"] else "[red]MISS[/]")
    console.print(table)
    console.print(f"targets: {sum(verdict['pass'] for verdict in targets)}/{len(targets)} pass")
    return targets


def bench(
    quick: QuickOption = False,
    arch: ArchsOption = None,
    dtype: DTypesOption = None,
    hidden: HiddensOption = None,
    reps: RepsOption = None,
    threads: ThreadsOption = "1",
    sequences: SequencesOption = None,
    length: LengthOption = None,
    json_path: JsonOption = None,
) -> None:
    """Time functional predict / torch.func.grad against the example's nn cell loop and fused nn.LSTM/GRU/RNN (interleaved, one process)."""
    archs = _choices("--arch", arch, ARCHS, tuple(TORCH_MODULES))
    dtypes = _choices("--dtype", dtype, tuple(DTYPES), tuple(DTYPES))
    hiddens = list(dict.fromkeys(_int("--hidden", item, 1) for item in _split(hidden) or (("51",) if quick else ("51", "256"))))
    reps_n = _int("--reps", reps, 3) if reps is not None else (3 if quick else 5)
    threads_n = _int("--threads", threads, 1)
    base = QUICK if quick else FULL
    workload = Workload(_int("--sequences", sequences, 1) if sequences is not None else base.sequences,
                        _int("--length", length, 1) if length is not None else base.length)
    if json_path is not None and (json_path.is_dir() or not json_path.parent.is_dir()):
        raise fail(f"--json {json_path}: expected a file in an existing directory")

    console = Console()
    if not console.is_terminal:  # piped or captured: do not squeeze the 13 columns into 80
        console = Console(width=max(console.width, 150))
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads_n)
    try:
        info = machine()
        console.print(f"machine: {info['platform']}; {info['cpu']}; {info['cores']} cores ({info['usable_cores']} usable)")
        console.print(f"torch {info['torch']}, {info['torch_threads']} thread(s), python {info['python']}; "
                      f"{workload.sequences} sequences x {workload.length} steps, {LAYERS} stacked cells + linear head, median of {reps_n} after 1 warm-up")
        rows = [_measure_with_status(console, *config, workload, reps_n) for config in itertools.product(archs, dtypes, hiddens)]
    finally:
        torch.set_num_threads(previous_threads)
    console.print(_table(rows, workload, reps_n))
    console.print("fn: functional predict (fwd: under no_grad; grad: torch.func.grad_and_value of the MSE loss)\n"
                  "cell: the example's nn cells stepped in Python; fused: nn.LSTM/GRU/RNN(num_layers=2) + nn.Linear (f+b: forward + .backward())",
                  highlight=False)
    targets = _print_targets(console, rows) if workload == FULL else None
    if targets is None:
        console.print(f"targets: judged on the full workload only ({FULL.sequences} x {FULL.length}: no --quick, --sequences or --length)")
    if json_path is not None:
        config = {"workload": asdict(workload), "full_workload": workload == FULL, "layers": LAYERS, "input_size": 1, "reps": reps_n, "warmup": 1,
                  "threads": threads_n, "archs": archs, "dtypes": dtypes, "hiddens": hiddens, "quick": quick}
        report = {"config": config, "machine": info, "rows": [asdict(row) for row in rows], "targets": targets}
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"wrote {json_path}")


if __name__ == "__main__":
    typer.run(bench)
