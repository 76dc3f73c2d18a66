"""Params <-> torch.nn modules: the same tensors on both sides, checked key by key and shape by shape."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from functional.layers import layer_structure
from functional.params import Params, check_cell_params
from functional.registry import get_arch
from functional.sru import sru_sizes
from functional.validate import shape_str
from parity.sru import check_sru_settings, is_sru_module, sru_step_class

# arch -> (cell class, layered class, constructor keywords)
TORCH_MODULES: dict[str, tuple[type[nn.Module], type[nn.Module], dict]] = {
    "rnn_tanh": (nn.RNNCell, nn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (nn.RNNCell, nn.RNN, {"nonlinearity": "relu"}),
    "lstm": (nn.LSTMCell, nn.LSTM, {}),
    "gru": (nn.GRUCell, nn.GRU, {}),
}


def is_layered(params: Params) -> bool:
    """Layered params use `nn.RNN/LSTM/GRU` keys (`weight_ih_l0`); cell params use `weight_ih`."""
    return isinstance(params, Mapping) and "weight_ih_l0" in params


def torch_modules(arch: str) -> tuple[type[nn.Module], type[nn.Module], dict]:
    """`(cell class, layered class, keywords)` for a registered arch with a torch.nn counterpart."""
    get_arch(arch)
    if arch not in TORCH_MODULES:
        raise ValueError(f"arch: {arch!r} has no torch.nn counterpart; expected one of {sorted(TORCH_MODULES)}")
    return TORCH_MODULES[arch]


def load_params(module: nn.Module, params: Params) -> nn.Module:
    """Copy `params` into `module` after checking that keys and shapes match exactly (nanoGPT's discipline)."""
    expected = module.state_dict(keep_vars=True)  # parameters and buffers (SRU's scale_x)
    missing, extra = sorted(expected.keys() - params.keys()), sorted(params.keys() - expected.keys())
    if missing:
        raise ValueError(f"params: missing key {missing[0]!r} needed by {type(module).__name__} (expected keys {sorted(expected)})")
    if extra:
        raise ValueError(f"params: unexpected key {extra[0]!r} for {type(module).__name__} (expected keys {sorted(expected)})")
    for key, parameter in expected.items():
        if tuple(params[key].shape) != tuple(parameter.shape):
            raise ValueError(f"params[{key!r}]: expected shape {shape_str(parameter.shape)}, got {shape_str(params[key].shape)}")
    with torch.no_grad():
        for key, parameter in expected.items():
            parameter.copy_(params[key])
    return module


def to_torch(arch: str, params: Params) -> nn.Module:
    """The `torch.nn` module holding the same tensors: a cell for cell params, `nn.RNN/LSTM/GRU` for layered ones.

    For `sru` it is the sru package's `SRUCell` (which also steps like an nn cell; see parity.sru).
    """
    if arch == "sru":
        input_size, hidden_size, _ = sru_sizes(params)
        weight = params["weight"]
        module = sru_step_class()(input_size, hidden_size).to(device=weight.device, dtype=weight.dtype)
        return load_params(module, params)
    cell_class, layered_class, keywords = torch_modules(arch)
    if is_layered(params):
        s = layer_structure(arch, params)
        if s.proj_size:
            keywords = {**keywords, "proj_size": s.proj_size}
        module = layered_class(s.input_size, s.hidden_size, num_layers=s.num_layers, bias=s.bias, bidirectional=s.bidirectional, dtype=s.dtype, **keywords)
    else:
        sizes = check_cell_params(params, get_arch(arch).gates, allow_projection=get_arch(arch).supports_projection)
        if "weight_hr" in params:
            raise ValueError("params: 'weight_hr' (a projection) has no torch.nn.LSTMCell counterpart; use layered params for nn.LSTM(proj_size=...)")
        module = cell_class(sizes.input_size, sizes.hidden_size, bias=sizes.bias, dtype=sizes.dtype, **keywords)
    device = next(iter(params.values())).device
    return load_params(module.to(device), params)


def arch_of(module: nn.Module) -> str:
    """The registry name of a torch.nn recurrent module (or an sru.SRUCell)."""
    if is_sru_module(module):
        return "sru"
    if isinstance(module, (nn.RNNCell, nn.RNN)):
        return "rnn_" + module.nonlinearity
    for arch, (cell_class, layered_class, _) in TORCH_MODULES.items():
        if type(module) in (cell_class, layered_class):
            return arch
    raise ValueError(f"module: expected one of nn.RNNCell/LSTMCell/GRUCell/RNN/LSTM/GRU or sru.SRUCell, got {type(module).__name__}")


def from_torch(module: nn.Module) -> dict[str, torch.Tensor]:
    """Params (torch's keys) holding copies of `module`'s tensors; `to_torch(arch_of(m), from_torch(m))` rebuilds it exactly."""
    if arch_of(module) == "sru":
        check_sru_settings(module)
    return {key: tensor.detach().clone() for key, tensor in module.state_dict(keep_vars=True).items()}
