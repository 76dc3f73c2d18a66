"""The arch table: name -> (init, cell, recurrence, sequence, initial carry); everything else loops over it."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from functional.bptt import gru_sequence, lstm_sequence, rnn_sequence
from functional.gru import gru_cell, gru_recurrence
from functional.lstm import LSTMCarry, lstm_cell, lstm_recurrence
from functional.params import Params, cell_param_shapes, check_cell_params, draw_uniform, gates_projection, input_projection
from functional.rnn import rnn_cell, rnn_recurrence
from functional.sru import sru_cell, sru_init, sru_projection, sru_recurrence, sru_sizes


def uniform_init(
    shapes: dict[str, tuple[int, ...]], hidden_size: int, *, generator: torch.Generator | None = None, dtype: torch.dtype | None = None, device: Any = None
) -> dict[str, torch.Tensor]:
    """Torch's default `U(-1/sqrt(H), 1/sqrt(H))`, drawn key by key in the given (torch's) order."""
    bound = 1.0 / math.sqrt(hidden_size) if hidden_size > 0 else 0.0
    dtype = dtype or torch.get_default_dtype()
    return {key: draw_uniform(torch.empty(shape, dtype=dtype, device=device), -bound, bound, generator) for key, shape in shapes.items()}


def _gated_init(gates: int) -> Callable[..., dict[str, torch.Tensor]]:
    def init(input_size: int, hidden_size: int, *, generator=None, dtype=None, device=None, bias: bool = True, proj_size: int = 0):
        shapes = cell_param_shapes(gates, input_size, hidden_size, bias=bias, proj_size=proj_size)
        return uniform_init(shapes, hidden_size, generator=generator, dtype=dtype, device=device)

    return init


def _zeros_carry(batch_shape: Sequence[int], hidden_size: int, *, dtype=None, device=None, proj_size: int = 0) -> torch.Tensor:
    return torch.zeros((*batch_shape, hidden_size), dtype=dtype, device=device)


def _lstm_zeros_carry(batch_shape: Sequence[int], hidden_size: int, *, dtype=None, device=None, proj_size: int = 0) -> LSTMCarry:
    return LSTMCarry(
        torch.zeros((*batch_shape, proj_size or hidden_size), dtype=dtype, device=device),
        torch.zeros((*batch_shape, hidden_size), dtype=dtype, device=device),
    )


@dataclass(frozen=True)
class Arch:
    """One recurrent architecture, as the rest of the project sees it."""

    name: str
    gates: int  # G: weight_ih is (G*H, I)
    init: Callable[..., dict[str, torch.Tensor]]  # (I, H, *, generator, dtype, device, bias) -> params
    cell: Callable[[Params, Any, torch.Tensor], tuple[Any, torch.Tensor]]  # checked single step
    project: Callable[[Params, torch.Tensor], torch.Tensor]  # x (..., I) -> what `recurrence` consumes (hoisted over T)
    recurrence: Callable[[Params, Any, torch.Tensor], tuple[Any, torch.Tensor]]  # unchecked step on projected x
    initial_carry: Callable[..., Any]  # (batch_shape, H, *, dtype, device) -> zeros
    sizes: Callable[..., tuple[int, int]]  # (cell params, prefix="") -> (input_size, hidden_size), checked
    supports_projection: bool = False  # LSTM's proj_size
    layered: bool = True  # has an nn.RNN/LSTM/GRU-style layered form (run_layers)
    buffers: frozenset[str] = frozenset()  # param keys that are constants, never trained (SRU's scale_x)
    # (params, carry, xs (T, *B, I)) -> (carry, ys (T, *B, H)): the whole sequence, input projection included,
    # with a hand-derived backward (functional/bptt.py); equals scanning `recurrence` over `project(xs)`. None: scan.
    sequence: Callable[[Params, Any, torch.Tensor], tuple[Any, torch.Tensor]] | None = None


def _gated_sizes(gates: int, allow_projection: bool = False) -> Callable[[Params], tuple[int, int]]:
    def sizes(params: Params, prefix: str = "") -> tuple[int, int]:
        checked = check_cell_params(params, gates, allow_projection=allow_projection, prefix=prefix)
        return checked.input_size, checked.hidden_size

    return sizes


ARCHS: dict[str, Arch] = {
    "rnn_tanh": Arch(
        "rnn_tanh", 1, _gated_init(1), partial(rnn_cell, nonlinearity="tanh"), gates_projection, partial(rnn_recurrence, nonlinearity="tanh"),
        _zeros_carry, _gated_sizes(1), sequence=partial(rnn_sequence, nonlinearity="tanh"),
    ),
    "rnn_relu": Arch(
        "rnn_relu", 1, _gated_init(1), partial(rnn_cell, nonlinearity="relu"), gates_projection, partial(rnn_recurrence, nonlinearity="relu"),
        _zeros_carry, _gated_sizes(1), sequence=partial(rnn_sequence, nonlinearity="relu"),
    ),
    "lstm": Arch(
        "lstm", 4, _gated_init(4), lstm_cell, gates_projection, lstm_recurrence, _lstm_zeros_carry, _gated_sizes(4, True),
        supports_projection=True, sequence=lstm_sequence,
    ),
    "gru": Arch("gru", 3, _gated_init(3), gru_cell, input_projection, gru_recurrence, _zeros_carry, _gated_sizes(3), sequence=gru_sequence),
    "sru": Arch(
        "sru", 0, sru_init, sru_cell, sru_projection, sru_recurrence, _zeros_carry, lambda params, prefix="": sru_sizes(params, prefix)[:2], layered=False, buffers=frozenset({"scale_x"})
    ),
}


def split_buffers(arch: str, params: Params) -> tuple[dict[str, Any], dict[str, Any]]:
    """`(trainable, constants)`: the arch's buffers (e.g. SRU's `scale_x`) are part of the model but never trained."""
    buffers = get_arch(arch).buffers
    trainable = {key: value for key, value in params.items() if key.rsplit(".", 1)[-1] not in buffers}
    return trainable, {key: value for key, value in params.items() if key not in trainable}


def get_arch(arch: str) -> Arch:
    """The registry entry for `arch`, or a ValueError listing the choices."""
    if arch not in ARCHS:
        raise ValueError(f"arch: expected one of {sorted(ARCHS)}, got {arch!r}")
    return ARCHS[arch]


def init_params(
    arch: str, input_size: int, hidden_size: int, *, generator: torch.Generator | None = None, dtype: torch.dtype | None = None, device: Any = None, bias: bool = True
) -> dict[str, torch.Tensor]:
    """Params of one cell with torch's keys, shapes and default init.

    Under the same seed, values equal those of the matching `torch.nn` cell bit for bit
    (same distribution, same drawing order).
    """
    for name, size in (("input_size", input_size), ("hidden_size", hidden_size)):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"{name}: expected a positive int, got {size!r}")
    return get_arch(arch).init(input_size, hidden_size, generator=generator, dtype=dtype, device=device, bias=bias)


def initial_carry(arch: str, batch_shape: Sequence[int], hidden_size: int, *, dtype: torch.dtype | None = None, device: Any = None, proj_size: int = 0) -> Any:
    """The zero carry for `arch`: `h: (*batch_shape, H)`, or `LSTMCarry(h, c)` for an LSTM."""
    return get_arch(arch).initial_carry(tuple(batch_shape), hidden_size, dtype=dtype, device=device, proj_size=proj_size)
