"""`scan`: unroll a step function over time, like `jax.lax.scan`, with optional per-sequence lengths."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from functional.validate import shape_str


def _time_length(leaves: list[torch.Tensor]) -> int:
    if not leaves or not all(isinstance(leaf, torch.Tensor) for leaf in leaves):
        raise ValueError("xs: expected a tensor (T, *B, I) or a tuple/dict of such tensors")
    lengths = {leaf.shape[0] if leaf.dim() else None for leaf in leaves}
    if None in lengths or len(lengths) != 1:
        raise ValueError(f"xs: every tensor needs the same leading time dimension T, got shapes {[shape_str(leaf.shape) for leaf in leaves]}")
    (steps,) = lengths
    if steps == 0:
        raise ValueError("xs: expected at least one time step (T >= 1), got T = 0")
    return steps


def _step_masks(steps: int, lengths: torch.Tensor | None, mask: torch.Tensor | None, device: torch.device) -> tuple[torch.Tensor, ...] | None:
    """One boolean `(*B,)` mask per step: True where the step is real, False where it is padding."""
    if lengths is not None and mask is not None:
        raise ValueError("lengths, mask: give one of them, not both")
    if lengths is not None:
        lengths = torch.as_tensor(lengths, device=device)
        if lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
            raise ValueError(f"lengths: expected an integer tensor of shape (*B,), got dtype {lengths.dtype}")
        if lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > steps):
            raise ValueError(f"lengths: expected values in [0, T={steps}], got min {int(lengths.min())}, max {int(lengths.max())}")
        time = torch.arange(steps, device=device).reshape((steps,) + (1,) * lengths.dim())
        mask = time < lengths  # (T, *B)
    if mask is None:
        return None
    if mask.dtype != torch.bool or mask.dim() == 0 or mask.shape[0] != steps:
        raise ValueError(f"mask: expected a bool tensor (T={steps}, *B), got {mask.dtype} of shape {shape_str(mask.shape)}")
    return mask.unbind(0)


def _where(mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor | float) -> torch.Tensor:
    """`new` where `mask` (broadcast over trailing feature dims), else `old`."""
    if mask.dim() > new.dim() or tuple(new.shape[: mask.dim()]) != tuple(mask.shape):
        raise ValueError(f"lengths/mask: batch shape {shape_str(mask.shape)} does not lead the carry/output shape {shape_str(new.shape)}")
    return torch.where(mask.reshape(mask.shape + (1,) * (new.dim() - mask.dim())), new, old)


def scan(
    step: Callable[[Any, Any], tuple[Any, Any]],
    carry: Any,
    xs: Any,
    *,
    reverse: bool = False,
    lengths: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[Any, Any]:
    """Apply `carry, y = step(carry, x)` along the leading (time) axis of `xs`.

    Args:
        step: `(carry, x_t) -> (carry, y_t)`; carry and `y_t` may be tensors or tuples/dicts of them.
        carry: the initial carry.
        xs: `(T, *B, I)`, or a tuple/dict of tensors sharing the leading `T`.
        reverse: run from `t = T-1` down to 0; `ys[t]` still belongs to `xs[t]`.
        lengths: `(*B,)` integers in `[0, T]`: steps `t >= lengths[b]` are padding. Padding keeps the
            carry and emits zeros, as `torch.nn` does with a PackedSequence (in reverse, each sequence
            starts from its own last real step).
        mask: `(T, *B)` bool, the general form of `lengths` (True = real step).

    Returns:
        `(carry, ys)` with `ys` the outputs stacked along a new leading axis `(T, ...)`.

    Example:
        >>> carry, ys = scan(lambda h, x: gru_cell(params, h, x), h0, xs)
    """
    leaves, spec = tree_flatten(xs)
    steps = _time_length(leaves)
    masks = _step_masks(steps, lengths, mask, leaves[0].device)
    # unbind, never xs[t]: indexing a tensor step by step makes the backward pass O(T^2).
    inputs = [tree_unflatten(list(slices), spec) for slices in zip(*(leaf.unbind(0) for leaf in leaves))]
    outputs: list[Any] = [None] * steps
    for t in (reversed(range(steps)) if reverse else range(steps)):
        new_carry, y = step(carry, inputs[t])
        if masks is not None:
            # leaf by leaf, keeping the step's structure (a plain `(h, c)` may come back as LSTMCarry)
            new_leaves, new_spec = tree_flatten(new_carry)
            old_leaves = tree_flatten(carry)[0]
            if len(new_leaves) != len(old_leaves):
                raise ValueError(f"carry: step returned {len(new_leaves)} tensors, the carry holds {len(old_leaves)}")
            new_carry = tree_unflatten([_where(masks[t], new, old) for new, old in zip(new_leaves, old_leaves)], new_spec)
            y = tree_map(lambda value, m=masks[t]: _where(m, value, 0.0), y)
        carry, outputs[t] = new_carry, y
    return carry, tree_map(lambda *ys: torch.stack(ys), *outputs)
