"""parity.convert: params <-> torch.nn modules, bitwise and in torch's key order; clear errors otherwise."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import functional
import parity
from parity import TORCH_MODULES, arch_of, from_torch, is_layered, load_params, to_torch

ARCHS = list(TORCH_MODULES)
DTYPES = [torch.float32, torch.float64]
LAYERED = [(1, False, 0), (2, True, 0), (2, False, 0), (2, True, 2)]  # (num_layers, bidirectional, proj_size)


def zeros(*shape):
    return torch.zeros(*shape, dtype=torch.float64)


def raises(message, function, *args, **kwargs):
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        function(*args, **kwargs)
    assert info.type is ValueError
    return str(info.value)


def make_cell(arch, bias=True, dtype=torch.float64, seed=0):
    cell_class, _, keywords = TORCH_MODULES[arch]
    torch.manual_seed(seed)
    return cell_class(3, 5, bias=bias, dtype=dtype, **keywords)


def make_layers(arch, num_layers, bidirectional, proj_size=0, bias=True, dtype=torch.float64, seed=0):
    _, layered_class, keywords = TORCH_MODULES[arch]
    extra = {"proj_size": proj_size} if proj_size else {}
    torch.manual_seed(seed)
    return layered_class(3, 5, num_layers=num_layers, bidirectional=bidirectional, bias=bias, dtype=dtype, **keywords, **extra)


def assert_same_params(params, module):
    named = dict(module.named_parameters())
    assert list(params) == list(named) == list(module.state_dict())
    for key, value in named.items():
        assert params[key].dtype == value.dtype and torch.equal(params[key], value.detach()), key


def test_torch_modules_table_covers_the_registry():
    """Every layered arch has its torch.nn pair; the one other arch, sru, converts to the sru package's SRUCell (test_sru.py)."""
    assert set(TORCH_MODULES) == {arch for arch, spec in functional.ARCHS.items() if spec.layered}
    assert set(functional.ARCHS) - set(TORCH_MODULES) == {"sru"}
    assert TORCH_MODULES["rnn_tanh"] == (nn.RNNCell, nn.RNN, {"nonlinearity": "tanh"})
    assert TORCH_MODULES["rnn_relu"] == (nn.RNNCell, nn.RNN, {"nonlinearity": "relu"})
    assert TORCH_MODULES["lstm"][:2] == (nn.LSTMCell, nn.LSTM)
    assert TORCH_MODULES["gru"][:2] == (nn.GRUCell, nn.GRU)
    assert parity.convert.torch_modules("gru") is TORCH_MODULES["gru"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("arch", ARCHS)
def test_cell_round_trip(arch, bias, dtype):
    module = make_cell(arch, bias, dtype)
    params = from_torch(module)
    assert not is_layered(params)
    assert_same_params(params, module)
    rebuilt = to_torch(arch, params)
    assert type(rebuilt) is type(module)
    assert (rebuilt.input_size, rebuilt.hidden_size, rebuilt.bias) == (3, 5, bias)
    assert getattr(rebuilt, "nonlinearity", None) == getattr(module, "nonlinearity", None)
    assert_same_params(params, rebuilt)
    again = from_torch(rebuilt)
    assert list(again) == list(params) and all(torch.equal(again[k], params[k]) for k in params)
    assert arch_of(module) == arch_of(rebuilt) == arch


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(
    "arch, structure",
    [(arch, s) for arch in ARCHS for s in LAYERED if arch == "lstm" or not s[2]],
    ids=lambda v: v if isinstance(v, str) else f"L{v[0]}{'bi' if v[1] else 'uni'}P{v[2]}",
)
def test_layered_round_trip(arch, structure, bias, dtype):
    num_layers, bidirectional, proj_size = structure
    module = make_layers(arch, num_layers, bidirectional, proj_size, bias, dtype)
    params = from_torch(module)
    assert is_layered(params)
    assert_same_params(params, module)
    rebuilt = to_torch(arch, params)
    assert type(rebuilt) is type(module)
    for attribute in ("input_size", "hidden_size", "num_layers", "bidirectional", "bias", "proj_size", "batch_first"):
        assert getattr(rebuilt, attribute, None) == getattr(module, attribute, None), attribute
    assert getattr(rebuilt, "nonlinearity", None) == getattr(module, "nonlinearity", None)
    assert_same_params(params, rebuilt)
    again = from_torch(rebuilt)
    assert list(again) == list(params) and all(torch.equal(again[k], params[k]) for k in params)
    assert arch_of(module) == arch_of(rebuilt) == arch


@pytest.mark.parametrize("arch", ARCHS)
def test_functional_init_converts_to_the_torch_module_with_the_same_values(arch):
    params = functional.init_layers(arch, 3, 5, num_layers=2, bidirectional=True, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert_same_params(params, to_torch(arch, params))
    cell = functional.init_params(arch, 3, 5, generator=torch.Generator().manual_seed(1))
    assert_same_params(cell, to_torch(arch, cell))


@pytest.mark.parametrize("arch", ARCHS)
def test_conversions_copy_rather_than_alias(arch):
    module = make_cell(arch)
    params = from_torch(module)
    snapshot = {k: v.clone() for k, v in params.items()}
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(1.0)
    assert all(torch.equal(params[k], snapshot[k]) for k in params), "from_torch must copy"
    rebuilt = to_torch(arch, params)
    with torch.no_grad():
        for parameter in rebuilt.parameters():
            parameter.mul_(0.0)
    assert all(torch.equal(params[k], snapshot[k]) for k in params), "to_torch must not write into params"
    assert all(not p.requires_grad for p in params.values())


def test_arch_of_every_module_kind():
    assert arch_of(nn.RNNCell(2, 3)) == "rnn_tanh"
    assert arch_of(nn.RNNCell(2, 3, nonlinearity="relu")) == "rnn_relu"
    assert arch_of(nn.RNN(2, 3)) == "rnn_tanh"
    assert arch_of(nn.RNN(2, 3, nonlinearity="relu")) == "rnn_relu"
    assert arch_of(nn.LSTMCell(2, 3)) == arch_of(nn.LSTM(2, 3)) == "lstm"
    assert arch_of(nn.GRUCell(2, 3)) == arch_of(nn.GRU(2, 3)) == "gru"


@pytest.mark.parametrize("module", [nn.Linear(2, 3), nn.Sequential(nn.GRU(2, 3)), nn.Conv1d(1, 1, 1)], ids=lambda m: type(m).__name__)
def test_from_torch_rejects_a_non_recurrent_module(module):
    message = f"module: expected one of nn.RNNCell/LSTMCell/GRUCell/RNN/LSTM/GRU or sru.SRUCell, got {type(module).__name__}"
    raises(message, from_torch, module)
    raises(message, arch_of, module)


@pytest.mark.parametrize("arch", ARCHS)
def test_to_torch_rejects_mismatched_cell_params(arch):
    params = from_torch(make_cell(arch))
    g = functional.get_arch(arch).gates
    raises(f"params['weight_hh']: expected shape ({g * 5}, 5), got ({g * 5}, 4)", to_torch, arch, {**params, "weight_hh": zeros(g * 5, 4)})
    raises(f"params['bias_hh']: expected shape ({g * 5},), got ({g * 5 + 1},)", to_torch, arch, {**params, "bias_hh": zeros(g * 5 + 1)})
    raises("params: missing key 'bias_ih'", to_torch, arch, {k: v for k, v in params.items() if k != "bias_ih"})
    raises("params: unexpected key 'extra'", to_torch, arch, {**params, "extra": params["bias_ih"]})


@pytest.mark.parametrize("arch", ARCHS)
def test_to_torch_rejects_mismatched_layered_params(arch):
    params = from_torch(make_layers(arch, 2, True))
    g = functional.get_arch(arch).gates
    raises(
        f"params['weight_hh_l1_reverse']: expected shape ({g * 5}, 5), got ({g * 5}, 6)",
        to_torch, arch, {**params, "weight_hh_l1_reverse": zeros(g * 5, 6)},
    )
    raises("params: missing key 'bias_hh_l1'", to_torch, arch, {k: v for k, v in params.items() if k != "bias_hh_l1"})
    raises("params: unexpected key 'weight_ih_l9'", to_torch, arch, {**params, "weight_ih_l9": params["weight_ih_l1"]})


def test_to_torch_rejects_a_projection_on_a_cell_and_an_unknown_arch():
    params = functional.init_params("lstm", 3, 5)
    projected = {**params, "weight_hh": torch.zeros(20, 2), "weight_hr": torch.zeros(2, 5)}
    raises("params: 'weight_hr' (a projection) has no torch.nn.LSTMCell counterpart", to_torch, "lstm", projected)
    raises("arch: expected one of", to_torch, "transformer", params)


def test_load_params_checks_keys_and_shapes():
    module = nn.GRUCell(3, 4, dtype=torch.float64)
    good = {k: torch.randn(v.shape, dtype=torch.float64) for k, v in module.named_parameters()}
    raises("params['weight_hh']: expected shape (12, 4), got (12, 5)", load_params, module, {**good, "weight_hh": zeros(12, 5)})
    raises("params['bias_ih']: expected shape (12,), got (4, 3)", load_params, module, {**good, "bias_ih": zeros(4, 3)})
    raises(
        "params: missing key 'bias_hh' needed by GRUCell (expected keys ['bias_hh', 'bias_ih', 'weight_hh', 'weight_ih'])",
        load_params, module, {k: v for k, v in good.items() if k != "bias_hh"},
    )
    raises("params: unexpected key 'weight_hr' for GRUCell", load_params, module, {**good, "weight_hr": zeros(2, 4)})
    before = {k: v.detach().clone() for k, v in module.named_parameters()}
    with pytest.raises(ValueError):
        load_params(module, {**good, "weight_hh": zeros(12, 5)})
    assert all(torch.equal(p.detach(), before[k]) for k, p in module.named_parameters()), "a rejected load must not half-write the module"
    assert load_params(module, good) is module
    assert_same_params(good, module)
