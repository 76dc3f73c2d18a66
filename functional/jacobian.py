"""The Jacobian of one cell step with respect to its carry, and its spectral norm along a trajectory.

A step maps the state `s_{t-1}` to `s_t` (`h` for RNN/GRU, `c` for SRU, `(h, c)` flattened to one
vector for an LSTM). Gradients through time are products of these Jacobians, so a spectral norm
below 1 along the trajectory is the vanishing-gradient story told one step at a time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.func import jacrev, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from functional.registry import get_arch
from functional.scan import scan


def flatten_state(carry: Any) -> torch.Tensor:
    """`h (*B, H)` -> itself; `LSTMCarry(h (*B, P), c (*B, H))` -> `(*B, P + H)`."""
    return torch.cat(tree_flatten(carry)[0], dim=-1)


def unflatten_state(state: torch.Tensor, like: Any) -> Any:
    """The inverse of `flatten_state`, with `like`'s structure and sizes."""
    leaves, spec = tree_flatten(like)
    return tree_unflatten(list(state.split([leaf.shape[-1] for leaf in leaves], dim=-1)), spec)


def step_jacobian(arch: str, params: Mapping[str, torch.Tensor], carry: Any, x: torch.Tensor) -> torch.Tensor:
    r"""`J = \partial s_t / \partial s_{t-1}` of one step `carry, _ = cell(params, carry, x)`, by `jacrev`.

    Args:
        params: one cell's params (torch's keys).
        carry: the state entering the step, batch shape `*B` (an `LSTMCarry` for an LSTM).
        x: `(*B, I)`.

    Returns:
        `(*B, S, S)` with `S` the flattened state size (`H`, or `P + H` for an LSTM): one Jacobian
        per batch element (batch elements do not interact).
    """
    cell = get_arch(arch).cell
    state = flatten_state(carry)
    like = tree_flatten(carry)[0][0]
    if state.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"carry: expected batch shape {tuple(x.shape[:-1])} (that of x), got {tuple(state.shape[:-1])}")

    def step(one_state: torch.Tensor, one_x: torch.Tensor) -> torch.Tensor:  # (S,), (I,) -> (S,)
        return flatten_state(cell(params, unflatten_state(one_state, carry), one_x)[0])

    jacobian = jacrev(step)
    for _ in range(like.dim() - 1):  # one vmap per batch dimension: each element's own Jacobian
        jacobian = vmap(jacobian)
    return jacobian(state, x)


def jacobian_spectral_norms(arch: str, params: Mapping[str, torch.Tensor], inputs: torch.Tensor, carry: Any = None) -> torch.Tensor:
    """`||J_t||_2` (largest singular value) of the step Jacobian at every step of a trajectory.

    Args:
        inputs: `(T, *B, I)`; the trajectory starts from `carry` (zeros if None).

    Returns:
        `(T, *B)`: entry t is the spectral norm of `\\partial s_t / \\partial s_{t-1}` on the trajectory.
    """
    spec = get_arch(arch)
    input_size, hidden_size = spec.sizes(params)
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2 or inputs.shape[0] < 1:
        raise ValueError(f"inputs: expected shape (T >= 1, *B, {input_size}), got {tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__}")
    if carry is None:
        proj_size = params["weight_hr"].shape[0] if "weight_hr" in params else 0
        carry = spec.initial_carry(tuple(inputs.shape[1:-1]), hidden_size, dtype=inputs.dtype, device=inputs.device, proj_size=proj_size)

    def step(state: Any, x: torch.Tensor) -> tuple[Any, Any]:
        new_state, _ = spec.cell(params, state, x)
        return new_state, state  # emit the state entering the step

    _, entering = scan(step, carry, inputs)  # each leaf (T, *B, .)
    norms = []
    for t in range(inputs.shape[0]):  # one step at a time: T * B Jacobians of S x S at once would not fit in memory
        carry_t = tree_unflatten([leaf[t] for leaf in tree_flatten(entering)[0]], tree_flatten(entering)[1])
        norms.append(torch.linalg.matrix_norm(step_jacobian(arch, params, carry_t, inputs[t]), ord=2))
    return torch.stack(norms)
