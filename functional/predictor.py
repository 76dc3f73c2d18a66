"""A sequence predictor: stacked cells and a linear head; forecasts by feeding its output back in."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from functional.params import Params, draw_uniform
from functional.registry import get_arch
from functional.scan import scan
from functional.validate import check_input, check_shape


def linear_init(input_size: int, output_size: int, *, generator=None, dtype=None, device=None) -> dict[str, torch.Tensor]:
    """`weight (O, I)`, `bias (O,)` drawn exactly as `torch.nn.Linear` draws them (same bounds, same order)."""
    gain = math.sqrt(2.0 / (1 + 5))  # kaiming_uniform_(a=sqrt(5)), torch's default for Linear
    weight_bound = math.sqrt(3.0) * gain / math.sqrt(input_size)
    bias_bound = 1 / math.sqrt(input_size)
    dtype = dtype or torch.get_default_dtype()
    weight = draw_uniform(torch.empty(output_size, input_size, dtype=dtype, device=device), -weight_bound, weight_bound, generator)
    bias = draw_uniform(torch.empty(output_size, dtype=dtype, device=device), -bias_bound, bias_bound, generator)
    return {"weight": weight, "bias": bias}


def init_predictor(
    arch: str, input_size: int = 1, hidden_size: int = 51, *, layers: int = 2, output_size: int = 1, generator=None, dtype=None, device=None
) -> dict[str, torch.Tensor]:
    """Params `cells.<k>.<key>` for `layers` stacked cells and `head.weight`, `head.bias`.

    Drawn in the order of the PyTorch example's module (cell 1, cell 2, ..., then the head), so under
    `torch.manual_seed` they equal that module's weights bit for bit.
    """
    if layers < 1:
        raise ValueError(f"layers: expected a positive int, got {layers}")
    spec = get_arch(arch)
    params: dict[str, torch.Tensor] = {}
    for layer in range(layers):
        cell = spec.init(input_size if layer == 0 else hidden_size, hidden_size, generator=generator, dtype=dtype, device=device)
        params.update({f"cells.{layer}.{key}": value for key, value in cell.items()})
    head = linear_init(hidden_size, output_size, generator=generator, dtype=dtype, device=device)
    params.update({f"head.{key}": value for key, value in head.items()})
    return params


def predictor_cells(params: Params) -> list[dict[str, torch.Tensor]]:
    """The per-layer cell params (`cells.1.weight_ih` -> `[..., {"weight_ih": ...}]`)."""
    cells: list[dict[str, torch.Tensor]] = []
    while any(key.startswith(f"cells.{len(cells)}.") for key in params):
        prefix = f"cells.{len(cells)}."
        cells.append({key[len(prefix) :]: value for key, value in params.items() if key.startswith(prefix)})
    return cells


def _check_predictor(arch: str, params: Params) -> tuple[list[dict[str, torch.Tensor]], int, int]:
    if not isinstance(params, Mapping) or "head.weight" not in params or "head.bias" not in params:
        raise ValueError("params: expected predictor params with 'cells.<k>.*', 'head.weight' and 'head.bias' keys (see init_predictor)")
    cells = predictor_cells(params)
    if not cells:
        raise ValueError("params: expected at least one cell ('cells.0.weight_ih', ...), got none")
    spec = get_arch(arch)
    input_size, hidden_size = spec.sizes(cells[0], "cells.0.")
    template = init_predictor(arch, input_size, hidden_size, layers=len(cells), output_size=params["head.weight"].shape[0], device="meta")
    extra = sorted(params.keys() - template.keys())
    if extra:
        raise ValueError(f"params: unexpected key {extra[0]!r} for a {len(cells)}-layer {arch} predictor")
    for key, value in template.items():
        if key not in params:
            raise ValueError(f"params: missing key {key!r} for a {len(cells)}-layer {arch} predictor")
        check_shape(f"params[{key!r}]", params[key], tuple(value.shape))
    return cells, input_size, hidden_size


def predict(arch: str, params: Params, inputs: torch.Tensor, *, future: int = 0, carry: list[Any] | None = None) -> tuple[torch.Tensor, list[Any]]:
    """Run the predictor over `inputs` (teacher forcing), then forecast `future` more steps.

    Each layer runs over all T steps at once (the arch's `sequence`, with its hand-derived backward,
    or one input matmul for the whole sequence and a scan of its `recurrence`), which equals the
    step-interleaved loop of the PyTorch example. The forecast feeds each output back as the next
    input, so it needs `output_size == input_size`.

    Args:
        inputs: `(T, *B, I)`, time-major.
        future: how many steps to forecast after the inputs.
        carry: one carry per layer; zeros if None.

    Returns:
        `(outputs, carry)`: `outputs: (T + future, *B, O)` and the final per-layer carries.
    """
    spec = get_arch(arch)
    cells, input_size, hidden_size = _check_predictor(arch, params)
    if not isinstance(future, int) or future < 0:
        raise ValueError(f"future: expected an int >= 0, got {future!r}")
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2:
        raise ValueError(f"inputs: expected shape (T, *B, {input_size}), got {tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__}")
    if inputs.shape[0] < 1:
        raise ValueError(f"inputs: expected at least one time step (T >= 1), got T = 0 in shape {tuple(inputs.shape)}")
    batch_shape = check_input("inputs", inputs, input_size, params["head.weight"].dtype)[1:]
    if future and params["head.weight"].shape[0] != input_size:
        raise ValueError(f"future: forecasting feeds outputs back, so output_size must equal input_size {input_size}, got {params['head.weight'].shape[0]}")
    if carry is None:
        carry = [spec.initial_carry(batch_shape, hidden_size, dtype=inputs.dtype, device=inputs.device) for _ in cells]
    carry = list(carry)

    def head(h: torch.Tensor) -> torch.Tensor:
        return h @ params["head.weight"].T + params["head.bias"]

    hidden = inputs
    for layer, cell in enumerate(cells):
        if spec.sequence is not None:  # the whole sequence at once, with a hand-derived backward
            carry[layer], hidden = spec.sequence(cell, carry[layer], hidden)
        else:
            projected = spec.project(cell, hidden)  # (T, *B, G*H): all steps in one matmul
            carry[layer], hidden = scan(lambda c, x, cell=cell: spec.recurrence(cell, c, x), carry[layer], projected)
    outputs = [head(hidden)]  # (T, *B, O)
    output = outputs[0][-1]
    forecast = []
    for _ in range(future):
        x = output
        for layer, cell in enumerate(cells):
            carry[layer], x = spec.recurrence(cell, carry[layer], spec.project(cell, x))
        output = head(x)
        forecast.append(output)
    if forecast:
        outputs.append(torch.stack(forecast))
    return torch.cat(outputs), carry
