"""Input checks shared by every cell: one ValueError naming the argument, expected and actual."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch


def shape_str(shape: Iterable[int]) -> str:
    """`(3, 4)` for a shape, `()` for a scalar."""
    dims = tuple(shape)
    return "(" + ", ".join(str(d) for d in dims) + ("," if len(dims) == 1 else "") + ")"


def check_keys(params: Mapping[str, torch.Tensor], required: set[str], optional: set[str] = frozenset(), name: str = "params") -> None:
    """Raise if `params` lacks a required key or holds one that is neither required nor optional."""
    if not isinstance(params, Mapping):
        raise ValueError(f"{name}: expected a dict of tensors, got {type(params).__name__}")
    missing = sorted(required - params.keys())
    if missing:
        raise ValueError(f"{name}: missing key {missing[0]!r} (expected keys {sorted(required)}, got {sorted(params)})")
    extra = sorted(params.keys() - required - optional)
    if extra:
        raise ValueError(f"{name}: unexpected key {extra[0]!r} (expected keys {sorted(required | optional)}, got {sorted(params)})")


def check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...], what: str = "") -> None:
    """Raise unless `tensor.shape == expected`."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor of shape {shape_str(expected)}, got {type(tensor).__name__}")
    if tuple(tensor.shape) != tuple(expected):
        detail = f" ({what})" if what else ""
        raise ValueError(f"{name}: expected shape {shape_str(expected)}{detail}, got {shape_str(tensor.shape)}")


def check_dtype(name: str, tensor: torch.Tensor, expected: torch.dtype) -> None:
    """Raise unless `tensor` has the params' dtype (torch would raise a matmul error instead)."""
    if tensor.dtype != expected:
        raise ValueError(f"{name}: expected dtype {expected} (the params' dtype), got {tensor.dtype}")


def check_input(name: str, x: torch.Tensor, input_size: int, dtype: torch.dtype) -> tuple[int, ...]:
    """Check `x: (*B, I)` and return its batch shape `B`."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor of shape (*B, {input_size}), got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != input_size:
        raise ValueError(f"{name}: expected shape (*B, {input_size}) with input_size {input_size}, got {shape_str(x.shape)}")
    check_dtype(name, x, dtype)
    return tuple(x.shape[:-1])
