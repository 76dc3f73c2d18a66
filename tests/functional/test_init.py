"""init_params / init_layers draw torch.nn's default weights bit for bit; initial_carry is zeros of the right shapes."""

from __future__ import annotations

import pytest
import torch

import functional
from functional import LSTMCarry

ARCHS = list(functional.ARCHS)
NN_ARCHS = [arch for arch in ARCHS if functional.ARCHS[arch].layered]  # torch.nn's init is the oracle; sru's is in test_sru.py
DTYPES = [torch.float32, torch.float64]
LAYERED = [  # (num_layers, bidirectional, proj_size)
    (1, False, 0),
    (1, True, 0),
    (2, False, 0),
    (2, True, 0),
    (2, True, 2),
    (1, False, 3),
]


def assert_bitwise_equal(params: dict[str, torch.Tensor], module: torch.nn.Module) -> None:
    state = module.state_dict()
    assert list(params) == list(state), "key order must be torch's state_dict order"
    assert list(params) == [name for name, _ in module.named_parameters()]
    for key, value in state.items():
        assert params[key].dtype == value.dtype, key
        assert params[key].shape == value.shape, key
        assert torch.equal(params[key], value), key


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("arch", NN_ARCHS)
def test_init_params_equals_torch_cell_under_global_seed(oracle, arch, dtype, bias):
    torch.manual_seed(1234)
    module = oracle.nn_cell(arch, 5, 7, bias=bias, dtype=dtype)
    torch.manual_seed(1234)
    params = functional.init_params(arch, 5, 7, bias=bias, dtype=dtype)
    assert_bitwise_equal(params, module)
    # and both consumed the global stream identically: the next draws agree too
    after_functional = torch.rand(3)
    torch.manual_seed(1234)
    oracle.nn_cell(arch, 5, 7, bias=bias, dtype=dtype)
    assert torch.equal(after_functional, torch.rand(3))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("arch", NN_ARCHS)
def test_init_params_with_generator(oracle, arch, dtype, bias):
    torch.manual_seed(99)
    global_state = torch.get_rng_state()
    params = functional.init_params(arch, 4, 6, bias=bias, dtype=dtype, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), global_state), "an explicit generator must leave the global RNG alone"
    again = functional.init_params(arch, 4, 6, bias=bias, dtype=dtype, generator=torch.Generator().manual_seed(7))
    other = functional.init_params(arch, 4, 6, bias=bias, dtype=dtype, generator=torch.Generator().manual_seed(8))
    assert list(params) == list(again) == list(other)
    assert all(torch.equal(params[k], again[k]) for k in params)
    assert all(not torch.equal(params[k], other[k]) for k in params)
    # a fresh generator seeded s draws the same stream as the global RNG after manual_seed(s)
    torch.manual_seed(7)
    assert_bitwise_equal(params, oracle.nn_cell(arch, 4, 6, bias=bias, dtype=dtype))


@pytest.mark.parametrize("arch", NN_ARCHS)
def test_init_params_default_dtype_and_bounds(arch):
    params = functional.init_params(arch, 3, 9, generator=torch.Generator().manual_seed(0))
    bound = 1 / 9**0.5
    for key, value in params.items():
        assert value.dtype == torch.get_default_dtype(), key
        assert value.abs().max().item() <= bound, key
        assert value.abs().max().item() > bound / 2, key  # spread over the range, not e.g. all zeros


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "arch, structure",
    [(arch, s) for arch in NN_ARCHS for s in LAYERED if arch == "lstm" or not s[2]],  # proj_size is LSTM-only
    ids=lambda v: v if isinstance(v, str) else f"L{v[0]}{'bi' if v[1] else 'uni'}P{v[2]}",
)
def test_init_layers_equals_torch_layers(oracle, arch, structure, dtype, bias):
    num_layers, bidirectional, proj_size = structure
    extra = {"proj_size": proj_size} if proj_size else {}
    torch.manual_seed(2024)
    module = oracle.nn_layers(arch, 3, 5, num_layers=num_layers, bidirectional=bidirectional, bias=bias, dtype=dtype, **extra)
    kwargs = dict(num_layers=num_layers, bidirectional=bidirectional, bias=bias, proj_size=proj_size, dtype=dtype)
    torch.manual_seed(2024)
    assert_bitwise_equal(functional.init_layers(arch, 3, 5, **kwargs), module)
    # with an explicit generator seeded alike, the same values again
    assert_bitwise_equal(functional.init_layers(arch, 3, 5, generator=torch.Generator().manual_seed(2024), **kwargs), module)
    other = functional.init_layers(arch, 3, 5, generator=torch.Generator().manual_seed(2025), **kwargs)
    assert not torch.equal(other["weight_ih_l0"], module.state_dict()["weight_ih_l0"])


@pytest.mark.parametrize("batch_shape", [(), (3,), (2, 3)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("arch", ARCHS)
def test_initial_carry(arch, dtype, batch_shape):
    carry = functional.initial_carry(arch, batch_shape, 6, dtype=dtype)
    if arch == "lstm":
        assert isinstance(carry, LSTMCarry)
        parts = {"h": carry.h, "c": carry.c}
        h, c = carry  # unpacks like torch's (h, c)
        assert h is carry.h and c is carry.c
    else:
        assert isinstance(carry, torch.Tensor)
        parts = {"h": carry}
    for name, tensor in parts.items():
        assert tensor.shape == (*batch_shape, 6), name
        assert tensor.dtype == dtype, name
        assert not tensor.any(), name


def test_initial_carry_lstm_projection():
    carry = functional.initial_carry("lstm", (4,), 6, dtype=torch.float64, proj_size=2)
    assert isinstance(carry, LSTMCarry)
    assert carry.h.shape == (4, 2) and carry.c.shape == (4, 6)
    assert not carry.h.any() and not carry.c.any()
