"""What pure cells buy: ensembles and per-sample gradients as one `torch.func.vmap` call.

`torch.nn` RNN cells cannot do either without a Python loop (there is no batching rule for
`aten::lstm_cell`); here both are a transform of the same loss function.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.func import grad, grad_and_value, vmap

from functional.predictor import predict

Loss = Callable[..., torch.Tensor]  # (params, *args) -> scalar


def mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((prediction - target) ** 2).mean()


def predictor_loss(arch: str) -> Loss:
    """`loss(params, inputs (T, *B, I), targets (T, *B, O))`: the MSE of the predictor's teacher-forced outputs."""

    def loss(params: Mapping[str, torch.Tensor], inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return mse(predict(arch, params, inputs)[0], targets)

    return loss


def ensemble_grad_and_value(loss: Loss, stacked: Mapping[str, torch.Tensor], *args: Any, constants: Mapping[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Gradient and loss of K models at once: `vmap(grad_and_value(loss))` over params stacked on axis 0.

    Args:
        loss: `(params, *args) -> scalar` for one model.
        stacked: `{key: (K, ...)}` (see `stack_params`), the members' trainable params.
        *args: shared by all members (inputs, targets), not stacked.
        constants: `{key: (K, ...)}` params that are part of each model but not differentiated
            (e.g. SRU's `scale_x`); merged into the params `loss` sees.

    Returns:
        `(grads {key: (K, ...)}, losses (K,))`; member k's entries equal `grad_and_value(loss)` of
        member k alone.
    """
    constants = dict(constants or {})

    def member_loss(trainable: dict[str, torch.Tensor], fixed: dict[str, torch.Tensor], *member_args: Any) -> torch.Tensor:
        return loss({**trainable, **fixed}, *member_args)

    _check_stacked("stacked", {**stacked, **constants})
    return vmap(grad_and_value(member_loss), in_dims=(0, 0) + (None,) * len(args))(dict(stacked), constants, *args)


def per_sample_grads(loss: Loss, params: Mapping[str, torch.Tensor], inputs: torch.Tensor, targets: torch.Tensor, *, batch_dim: int = 1) -> dict[str, torch.Tensor]:
    """The gradient of `loss` for each sequence of a batch: `vmap(grad(loss))` over `batch_dim`.

    Args:
        loss: `(params, inputs, targets) -> scalar`, written for one unbatched sequence
            (`predictor_loss(arch)` works for any batch shape, including none).
        inputs, targets: time-major `(T, N, ...)` with the N sequences along `batch_dim` (1 by default).

    Returns:
        `{key: (N, *params[key].shape)}`: entry n is `grad(loss)(params, inputs[:, n], targets[:, n])`.
    """
    for name, value in (("inputs", inputs), ("targets", targets)):
        if not isinstance(value, torch.Tensor) or value.dim() <= batch_dim:
            raise ValueError(f"{name}: expected a tensor with a batch axis {batch_dim}, got {tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
    if inputs.shape[batch_dim] != targets.shape[batch_dim]:
        raise ValueError(f"targets: expected {inputs.shape[batch_dim]} sequences along axis {batch_dim} (as inputs), got {targets.shape[batch_dim]}")
    return vmap(grad(loss), in_dims=(None, batch_dim, batch_dim))(dict(params), inputs, targets)


def _check_stacked(name: str, stacked: Mapping[str, torch.Tensor]) -> int:
    sizes = {key: value.shape[0] if isinstance(value, torch.Tensor) and value.dim() else None for key, value in stacked.items()}
    if not sizes or None in sizes.values() or len(set(sizes.values())) != 1:
        raise ValueError(f"{name}: expected tensors sharing a leading member axis K (see stack_params), got leading sizes {sizes}")
    return next(iter(sizes.values()))
