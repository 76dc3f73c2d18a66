"""The Elman RNN cell (torch.nn.RNNCell), tanh or relu."""

from __future__ import annotations

import torch

from functional.params import Params, add_matmul, check_cell_params, gates_projection
from functional.validate import check_dtype, check_input, check_shape

NONLINEARITIES = {"tanh": torch.tanh, "relu": torch.relu}


def rnn_recurrence(params: Params, h: torch.Tensor, x_projected: torch.Tensor, *, nonlinearity: str = "tanh") -> tuple[torch.Tensor, torch.Tensor]:
    """One step given the input already projected (`x W_ih^T + b_ih + b_hh`, `(*B, H)`); unchecked."""
    h = NONLINEARITIES[nonlinearity](add_matmul(x_projected, h, params["weight_hh"]))
    return h, h


def rnn_cell(params: Params, h: torch.Tensor, x: torch.Tensor, *, nonlinearity: str = "tanh") -> tuple[torch.Tensor, torch.Tensor]:
    r"""One step of an Elman RNN, as `torch.nn.RNNCell`.

    .. math::
        h' = \phi(x W_{ih}^T + b_{ih} + h W_{hh}^T + b_{hh}),\quad \phi \in \{\tanh, \mathrm{relu}\}

    Args:
        params: `weight_ih (H, I)`, `weight_hh (H, H)`, and `bias_ih (H,)`, `bias_hh (H,)` unless bias-free.
        h: carry `(*B, H)`.
        x: input `(*B, I)`; `B` may be empty (unbatched) or any batch shape.
        nonlinearity: `"tanh"` or `"relu"`.

    Returns:
        `(h', h')`: the new carry and the output, both `(*B, H)`.
    """
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(f"nonlinearity: expected one of {sorted(NONLINEARITIES)}, got {nonlinearity!r}")
    sizes = check_cell_params(params, gates=1)
    batch_shape = check_input("x", x, sizes.input_size, sizes.dtype)
    check_shape("h", h, batch_shape + (sizes.hidden_size,), "batch shape of x, hidden_size")
    check_dtype("h", h, sizes.dtype)
    return rnn_recurrence(params, h, gates_projection(params, x), nonlinearity=nonlinearity)
