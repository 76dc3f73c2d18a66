"""The Simple Recurrent Unit (asappresearch/sru 2.6.0 `SRUCell`): one matmul for all steps, an elementwise scan."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from functional.params import Params, affine, draw_uniform
from functional.scan import scan
from functional.validate import check_dtype, check_input, check_keys, check_shape

SRU_KEYS = {"weight", "weight_c", "bias", "scale_x"}


def sru_sizes(params: Params, prefix: str = "") -> tuple[int, int, int]:
    """Check SRU params; return `(input_size, hidden_size, num_matrices)` (3, or 4 when I != H).

    `prefix` names the keys in messages as the caller's dict has them (`"cells.0."`).
    """
    check_keys(params, SRU_KEYS)
    weight_c = params["weight_c"]
    if not isinstance(weight_c, torch.Tensor) or weight_c.dim() != 1 or weight_c.shape[0] % 2:
        raise ValueError(f"params['{prefix}weight_c']: expected shape (2*hidden_size,), got {tuple(weight_c.shape) if isinstance(weight_c, torch.Tensor) else type(weight_c).__name__}")
    hidden_size = weight_c.shape[0] // 2
    weight = params["weight"]
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"params['{prefix}weight']: expected shape (input_size, k*{hidden_size}), got {tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    input_size = weight.shape[0]
    matrices = 3 if input_size == hidden_size else 4
    check_shape(f"params['{prefix}weight']", weight, (input_size, matrices * hidden_size), f"input_size, {matrices}*hidden_size: {matrices} matrices since input_size {'==' if matrices == 3 else '!='} hidden_size")
    check_shape(f"params['{prefix}bias']", params["bias"], (2 * hidden_size,), "b_f then b_r")
    check_shape(f"params['{prefix}scale_x']", params["scale_x"], (1,))
    for key in ("weight_c", "bias"):
        check_dtype(f"params[{prefix + key!r}]", params[key], weight.dtype)
    return input_size, hidden_size, matrices


def sru_projection(params: Params, x: torch.Tensor) -> torch.Tensor:
    """All of SRU's input work, for one step `(*B, I)` or a whole sequence `(T, *B, I)` in one matmul.

    Returns `(..., 4H)`: `[U0, U1 + b_f, U2 + b_r, x']` where `U = x W` (the sru package interleaves
    the k matrices per hidden unit: column `d*k + j` is matrix j of unit d) and the highway input
    `x' = x * scale_x` (k = 3) or `U3` (k = 4, input and hidden sizes differ).
    """
    weight = params["weight"]
    hidden_size = params["weight_c"].shape[0] // 2
    matrices = weight.shape[1] // hidden_size
    u = affine(x, weight.T).unflatten(-1, (hidden_size, matrices))  # (..., H, k)
    forget_bias, reset_bias = params["bias"].chunk(2)
    highway = u[..., 3] if matrices == 4 else x * params["scale_x"].to(x.dtype)
    return torch.cat([u[..., 0], u[..., 1] + forget_bias, u[..., 2] + reset_bias, highway], dim=-1)


def sru_recurrence(params: Params, c: torch.Tensor, projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The elementwise step on `sru_projection`'s output `(*B, 4H)`; unchecked."""
    u0, u1, u2, highway = projected.chunk(4, dim=-1)
    v_f, v_r = params["weight_c"].chunk(2)
    f = torch.sigmoid(u1 + v_f * c)
    r = torch.sigmoid(u2 + v_r * c)  # the reset gate also reads c_{t-1}
    c = f * c + (1 - f) * u0
    h = r * c + (1 - r) * highway
    return c, h


def sru_cell(params: Params, c: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""One step of the Simple Recurrent Unit, as `sru.SRUCell` (2.6.0, identity activation, skip term on).

    .. math::
        U &= x W \quad (k = 3 \text{ or } 4 \text{ projections: } U_0, U_1, U_2[, U_3]) \\
        f &= \sigma(U_1 + v_f \odot c + b_f), \qquad r = \sigma(U_2 + v_r \odot c + b_r) \\
        c' &= f \odot c + (1 - f) \odot U_0 \\
        h' &= r \odot c' + (1 - r) \odot x', \quad x' = x \cdot \mathrm{scale\_x} \ (k = 3) \text{ or } U_3 \ (k = 4)

    Args:
        params: the sru package's names and layouts: `weight (I, k*H)` (k matrices interleaved per
            hidden unit), `weight_c (2H,)` = `[v_f; v_r]`, `bias (2H,)` = `[b_f; b_r]`, `scale_x (1,)`
            (sqrt(3) with `rescale`, else 1; only read when k = 3). k = 3 needs `I == H`.
        c: carry `(*B, H)`.
        x: input `(*B, I)`.

    Returns:
        `(c', h')`, both `(*B, H)`.
    """
    input_size, hidden_size, _ = sru_sizes(params)
    batch_shape = check_input("x", x, input_size, params["weight"].dtype)
    check_shape("c", c, batch_shape + (hidden_size,), "batch shape of x, hidden_size")
    check_dtype("c", c, params["weight"].dtype)
    return sru_recurrence(params, c, sru_projection(params, x))


def sru_sequence(params: Params, c: torch.Tensor, xs: torch.Tensor, *, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SRU over a whole sequence `xs: (T, *B, I)`: one matmul for every step, then the elementwise scan.

    Returns `(c_T, hs)` with `hs: (T, *B, H)`; equal to scanning `sru_cell` step by step.
    """
    input_size, hidden_size, _ = sru_sizes(params)
    if not isinstance(xs, torch.Tensor) or xs.dim() < 2:
        raise ValueError(f"xs: expected shape (T, *B, {input_size}), got {tuple(xs.shape) if isinstance(xs, torch.Tensor) else type(xs).__name__}")
    batch_shape = check_input("xs", xs, input_size, params["weight"].dtype)[1:]
    check_shape("c", c, batch_shape + (hidden_size,), "batch shape of xs, hidden_size")
    check_dtype("c", c, params["weight"].dtype)
    return scan(lambda carry, projected: sru_recurrence(params, carry, projected), c, sru_projection(params, xs), lengths=lengths)


def sru_init(input_size: int, hidden_size: int, *, generator=None, dtype=None, device=None, bias: bool = True, rescale: bool = True) -> dict[str, torch.Tensor]:
    """sru 2.6.0's `SRUCell.reset_parameters` (defaults: highway_bias 0, no dropout, no layer norm), same draws in the same order."""
    if not bias:
        raise ValueError("bias: SRU always has its gate biases (b_f, b_r); got bias=False")
    dtype = dtype or torch.get_default_dtype()
    matrices = 3 if input_size == hidden_size else 4
    scale = math.sqrt(1 + math.exp(0.0) * 2) if rescale else 1.0
    weight = torch.empty(input_size, hidden_size * matrices, dtype=dtype, device=device)
    draw_uniform(weight, -((3.0 / input_size) ** 0.5), (3.0 / input_size) ** 0.5, generator)
    w = weight.view(input_size, 1, hidden_size, matrices)
    if rescale and matrices == 4:
        w[:, :, :, 3].mul_(scale)
    weight_c = draw_uniform(torch.empty(2 * hidden_size, dtype=dtype, device=device), -(3.0**0.5), 3.0**0.5, generator).mul_(0.5**0.5)
    w[:, :, :, 1].mul_(0.5**0.5)
    w[:, :, :, 2].mul_(0.5**0.5)
    return {
        "weight": weight,
        "weight_c": weight_c,
        "bias": torch.zeros(2 * hidden_size, dtype=dtype, device=device),
        "scale_x": torch.full((1,), scale, dtype=dtype, device=device),
    }


def is_sru_params(params: Params) -> bool:
    return isinstance(params, Mapping) and "weight_c" in params
