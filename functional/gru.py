"""The GRU cell (torch.nn.GRUCell), with torch's placement of `b_hn` inside `r *`."""

from __future__ import annotations

import torch

from functional.params import Params, check_cell_params, hidden_projection, input_projection
from functional.validate import check_dtype, check_input, check_shape


def gru_recurrence(params: Params, h: torch.Tensor, x_projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One step given the input already projected (`x W_ih^T + b_ih`, `(*B, 3H)`); unchecked."""
    x_r, x_z, x_n = x_projected.chunk(3, dim=-1)  # each (*B, H)
    h_r, h_z, h_n = hidden_projection(params, h).chunk(3, dim=-1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    h = (1 - z) * n + z * h
    return h, h


def gru_cell(params: Params, h: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""One step of a GRU, as `torch.nn.GRUCell`.

    .. math::
        r &= \sigma(W_{ir} x + b_{ir} + W_{hr} h + b_{hr}) \\
        z &= \sigma(W_{iz} x + b_{iz} + W_{hz} h + b_{hz}) \\
        n &= \tanh(W_{in} x + b_{in} + r \odot (W_{hn} h + b_{hn})) \\
        h' &= (1 - z) \odot n + z \odot h

    Args:
        params: `weight_ih (3H, I)`, `weight_hh (3H, H)`, `bias_ih (3H,)`, `bias_hh (3H,)` (no
            biases when bias-free), gate blocks in torch's order r, z, n.
        h: carry `(*B, H)`.
        x: input `(*B, I)`; `B` may be empty (unbatched) or any batch shape.

    Returns:
        `(h', h')`: the new carry and the output, both `(*B, H)`.
    """
    sizes = check_cell_params(params, gates=3)
    batch_shape = check_input("x", x, sizes.input_size, sizes.dtype)
    check_shape("h", h, batch_shape + (sizes.hidden_size,), "batch shape of x, hidden_size")
    check_dtype("h", h, sizes.dtype)
    return gru_recurrence(params, h, input_projection(params, x))
