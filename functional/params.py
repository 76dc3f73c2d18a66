"""Parameter dicts of one cell: torch's keys and shapes, checked in one place."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch

from functional.validate import check_dtype, check_keys, check_shape

Params = Mapping[str, torch.Tensor]


class CellSizes(NamedTuple):
    """What a cell's params say about it."""

    input_size: int  # I
    hidden_size: int  # H
    output_size: int  # H, or proj_size for an LSTM with `weight_hr`
    bias: bool
    dtype: torch.dtype


def cell_param_shapes(gates: int, input_size: int, hidden_size: int, *, bias: bool = True, proj_size: int = 0) -> dict[str, tuple[int, ...]]:
    """Torch's keys and shapes for one cell with `gates` blocks of `hidden_size` rows (G*H)."""
    output_size = proj_size or hidden_size
    shapes = {
        "weight_ih": (gates * hidden_size, input_size),
        "weight_hh": (gates * hidden_size, output_size),
    }
    if bias:
        shapes["bias_ih"] = (gates * hidden_size,)
        shapes["bias_hh"] = (gates * hidden_size,)
    if proj_size:
        shapes["weight_hr"] = (proj_size, hidden_size)
    return shapes


def check_cell_params(params: Params, gates: int, *, allow_projection: bool = False, name: str = "params", prefix: str = "", suffix: str = "") -> CellSizes:
    """Check keys, shapes and dtypes of one cell's params; return the sizes they imply.

    `prefix`/`suffix` name the keys in messages as the caller's dict has them (`"cells.0."`,
    `"_l1_reverse"` -> `params['weight_ih_l1_reverse']`).
    """
    bias = isinstance(params, Mapping) and ("bias_ih" in params or "bias_hh" in params)
    required = {"weight_ih", "weight_hh"} | ({"bias_ih", "bias_hh"} if bias else set())
    check_keys(params, required, {"weight_hr"} if allow_projection else set(), name)
    weight_ih = params["weight_ih"]
    if not isinstance(weight_ih, torch.Tensor) or weight_ih.dim() != 2 or weight_ih.shape[0] % gates:
        shape = tuple(weight_ih.shape) if isinstance(weight_ih, torch.Tensor) else type(weight_ih).__name__
        raise ValueError(f"{name}['{prefix}weight_ih{suffix}']: expected shape ({gates}*hidden_size, input_size), got {shape}")
    hidden_size, input_size = weight_ih.shape[0] // gates, weight_ih.shape[1]
    proj_size = params["weight_hr"].shape[0] if "weight_hr" in params and params["weight_hr"].dim() == 2 else 0
    expected = cell_param_shapes(gates, input_size, hidden_size, bias=bias, proj_size=proj_size)
    if "weight_hr" in params and not proj_size:
        expected["weight_hr"] = (0, hidden_size)  # any 2-D shape; reported as the error below
    for key, shape in expected.items():
        check_shape(f"{name}[{prefix + key + suffix!r}]", params[key], shape)
        check_dtype(f"{name}[{prefix + key + suffix!r}]", params[key], weight_ih.dtype)
    return CellSizes(input_size, hidden_size, proj_size or hidden_size, bias, weight_ih.dtype)


def affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x W^T + b` for `x: (..., I)`, `W: (O, I)` -> `(..., O)`, as one 2-D (add)mm over all leading dims."""
    flat = x.reshape(-1, x.shape[-1])  # (N, I); a whole sequence (T, *B, I) becomes one matmul
    out = flat @ weight.T if bias is None else torch.addmm(bias, flat, weight.T)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def add_matmul(base: torch.Tensor, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`base + h W^T`, fused into one addmm when `h` is a 2-D batch."""
    if h.dim() == 2 and base.dim() == 2:
        return torch.addmm(base, h, weight.T)
    return base + h @ weight.T


def input_projection(params: Params, x: torch.Tensor) -> torch.Tensor:
    """`x W_ih^T + b_ih`, for one step `(*B, I)` or a whole sequence `(T, *B, I)` at once -> `(..., G*H)`."""
    return affine(x, params["weight_ih"], params.get("bias_ih"))


def gates_projection(params: Params, x: torch.Tensor) -> torch.Tensor:
    """`x W_ih^T + (b_ih + b_hh)`: the input's share of RNN/LSTM gates, both biases folded in -> `(..., G*H)`."""
    bias = params["bias_ih"] + params["bias_hh"] if "bias_ih" in params else None
    return affine(x, params["weight_ih"], bias)


def hidden_projection(params: Params, h: torch.Tensor) -> torch.Tensor:
    """`h W_hh^T + b_hh`: `(*B, H) -> (*B, G*H)`."""
    return affine(h, params["weight_hh"], params.get("bias_hh"))


def draw_uniform(tensor: torch.Tensor, low: float, high: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """`tensor.uniform_(low, high)`, except on the meta device (shape-only templates): no draw there, so
    building a template stays legal inside `torch.func.vmap` (which refuses random ops)."""
    return tensor if tensor.is_meta else tensor.uniform_(low, high, generator=generator)
