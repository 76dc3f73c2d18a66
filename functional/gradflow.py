"""Gradient flow through time: how much the loss at the last step depends on the state at each step.

For the predictor (stacked cells and a linear head; see `functional.predictor`), with
`L = MSE(prediction_{T-1}, target_{T-1})` the loss at the last step only, this computes
`||dL/ds_t||` where `s_t` is the carry a layer hands from step `t-1` to step `t` (`s_0` is the
initial carry; for an LSTM `s_t = (h, c)`). It is the gradient of `L` with respect to a zero
perturbation added to that carry, taken with `torch.func.grad`: every later path counts (through
time, and up through the layers above at later steps); the copy of `h_{t-1}` that already went up
to the next layer is held fixed, so the number measures what the layer remembers through time.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.func import grad
from torch.utils._pytree import tree_map

from functional.jacobian import flatten_state, unflatten_state
from functional.predictor import predictor_cells
from functional.registry import get_arch
from functional.validate import check_input


def _state_gradients(arch: str, params: Mapping[str, torch.Tensor], inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`dL/ds_t` for every layer and step: `(layers, T, *B, S)`."""
    spec = get_arch(arch)
    cells = predictor_cells(params)
    if not cells or "head.weight" not in params:
        raise ValueError("params: expected predictor params with 'cells.<k>.*', 'head.weight' and 'head.bias' keys (see init_predictor)")
    input_size, hidden_size = spec.sizes(cells[0], "cells.0.")
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2 or inputs.shape[0] < 1:
        raise ValueError(f"inputs: expected shape (T >= 1, *B, {input_size}), got {tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__}")
    batch_shape = check_input("inputs", inputs, input_size, params["head.weight"].dtype)[1:]
    output_shape = (*inputs.shape[:-1], params["head.weight"].shape[0])
    if not isinstance(targets, torch.Tensor) or tuple(targets.shape) != output_shape:
        raise ValueError(f"targets: expected shape {output_shape}, got {tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__}")
    zero_carry = spec.initial_carry(batch_shape, hidden_size, dtype=inputs.dtype, device=inputs.device)
    state_size = flatten_state(zero_carry).shape[-1]
    steps = inputs.shape[0]

    def last_step_loss(perturbations: torch.Tensor) -> torch.Tensor:  # (layers, T, *B, S) -> scalar
        hidden = inputs
        for layer, cell in enumerate(cells):
            projected = spec.project(cell, hidden)  # (T, *B, G*H)
            carry, outputs = zero_carry, []
            for t, (x_t, delta) in enumerate(zip(projected.unbind(0), perturbations[layer].unbind(0))):
                carry = tree_map(torch.add, carry, unflatten_state(delta, zero_carry))  # s_t + 0: the variable we differentiate by
                carry, y = spec.recurrence(cell, carry, x_t)
                outputs.append(y)
            hidden = torch.stack(outputs)  # (T, *B, H)
        prediction = hidden[-1] @ params["head.weight"].T + params["head.bias"]
        return ((prediction - targets[-1]) ** 2).mean()

    zeros = torch.zeros((len(cells), steps, *batch_shape, state_size), dtype=inputs.dtype, device=inputs.device)
    return grad(last_step_loss)(zeros)


def state_gradient_norms(arch: str, params: Mapping[str, torch.Tensor], inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`||dL/ds_t||` of the last step's loss with respect to each layer's state entering each step.

    Args:
        params: predictor params (`cells.<k>.*`, `head.*`; see `init_predictor`).
        inputs: `(T, *B, I)`; targets: `(T, *B, O)` (only the last step enters the loss).

    Returns:
        `(layers, T)`: entry `[k, t]` is the 2-norm, over the batch and the state components, of
        `dL/ds_t` for layer k (an LSTM's state is `(h, c)`). Entry `t = T-1` is one step away from the
        loss; a decay towards `t = 0` is the vanishing gradient.
    """
    gradients = _state_gradients(arch, params, inputs, targets)
    return gradients.flatten(start_dim=2).norm(dim=-1)

