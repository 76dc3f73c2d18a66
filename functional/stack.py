"""Stack K parameter dicts into one (leading axis K) for `torch.func.vmap`, and split them back."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def stack_params(params_list: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """`[{k: (...)}] * K -> {k: (K, ...)}`, like `torch.func.stack_module_state` for param dicts."""
    if not params_list:
        raise ValueError("params_list: expected at least one params dict, got an empty sequence")
    keys = list(params_list[0])
    for index, params in enumerate(params_list):
        if list(params) != keys:
            raise ValueError(f"params_list[{index}]: expected keys {keys}, got {list(params)}")
        for key in keys:
            if params[key].shape != params_list[0][key].shape:
                raise ValueError(f"params_list[{index}][{key!r}]: expected shape {tuple(params_list[0][key].shape)}, got {tuple(params[key].shape)}")
    return {key: torch.stack([params[key] for params in params_list]) for key in keys}


def unstack_params(stacked: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """`{k: (K, ...)} -> [{k: (...)}] * K`, the inverse of `stack_params`."""
    sizes = {value.shape[0] if value.dim() else None for value in stacked.values()}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"stacked: expected every tensor to share a leading axis K, got shapes { {k: tuple(v.shape) for k, v in stacked.items()} }")
    (count,) = sizes
    return [{key: value[index] for key, value in stacked.items()} for index in range(count)]
