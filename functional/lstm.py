"""The LSTM cell (torch.nn.LSTMCell; with `weight_hr`, one layer of torch.nn.LSTM's proj_size)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from functional.params import Params, add_matmul, check_cell_params, gates_projection
from functional.validate import check_dtype, check_input, check_shape


class LSTMCarry(NamedTuple):
    """The LSTM state; a tuple, so torch's `(h, c)` unpacks from it."""

    h: torch.Tensor  # (*B, H), or (*B, P) with a projection
    c: torch.Tensor  # (*B, H)


def lstm_recurrence(params: Params, carry: LSTMCarry, x_projected: torch.Tensor) -> tuple[LSTMCarry, torch.Tensor]:
    """One step given the input already projected (`x W_ih^T + b_ih + b_hh`, `(*B, 4H)`); unchecked."""
    h, c = carry
    gates = add_matmul(x_projected, h, params["weight_hh"])  # (*B, 4H), torch's order i, f, g, o
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    if "weight_hr" in params:
        h = h @ params["weight_hr"].T  # (*B, P)
    return LSTMCarry(h, c), h


def lstm_cell(params: Params, carry: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> tuple[LSTMCarry, torch.Tensor]:
    r"""One step of an LSTM, as `torch.nn.LSTMCell`.

    .. math::
        (i, f, g, o) &= x W_{ih}^T + b_{ih} + h W_{hh}^T + b_{hh} \\
        c' &= \sigma(f) \odot c + \sigma(i) \odot \tanh(g) \\
        h' &= \sigma(o) \odot \tanh(c') \quad (\text{then } h' W_{hr}^T \text{ if } W_{hr} \text{ is given})

    Args:
        params: `weight_ih (4H, I)`, `weight_hh (4H, H)`, `bias_ih (4H,)`, `bias_hh (4H,)` (no biases
            when bias-free); optionally `weight_hr (P, H)` as in `nn.LSTM(proj_size=P)`, then
            `weight_hh` is `(4H, P)`.
        carry: `(h, c)` with `h: (*B, H)` (or `(*B, P)`) and `c: (*B, H)`.
        x: input `(*B, I)`; `B` may be empty (unbatched) or any batch shape.

    Returns:
        `(LSTMCarry(h', c'), h')`.
    """
    sizes = check_cell_params(params, gates=4, allow_projection=True)
    batch_shape = check_input("x", x, sizes.input_size, sizes.dtype)
    if not isinstance(carry, tuple) or len(carry) != 2:
        raise ValueError(f"carry: expected a pair (h, c), got {type(carry).__name__}")
    h, c = carry
    check_shape("carry.h", h, batch_shape + (sizes.output_size,), "batch shape of x, hidden_size")
    check_shape("carry.c", c, batch_shape + (sizes.hidden_size,), "batch shape of x, hidden_size")
    check_dtype("carry.h", h, sizes.dtype)
    check_dtype("carry.c", c, sizes.dtype)
    return lstm_recurrence(params, LSTMCarry(h, c), gates_projection(params, x))
