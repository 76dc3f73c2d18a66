"""Shared fixtures for the functional and parity tests: torch.nn is the oracle.

Helpers are handed out through the `oracle` fixture (not imported from this file), so that other
test folders may add their own conftest.py without clashing with a module named `conftest`.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_flatten

# The tests use tiny tensors: one intra-op thread is fastest, and on a small, busy machine two OpenMP threads
# contending for the cores make each op ~100x slower.
torch.set_num_threads(1)

# arch -> (torch.nn cell class, torch.nn layered class, constructor keywords); written out here on
# purpose rather than taken from parity.TORCH_MODULES, so the functional tests do not trust the code under test.
NN_MODULES = {
    "rnn_tanh": (nn.RNNCell, nn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (nn.RNNCell, nn.RNN, {"nonlinearity": "relu"}),
    "lstm": (nn.LSTMCell, nn.LSTM, {}),
    "gru": (nn.GRUCell, nn.GRU, {}),
}


def nn_cell(arch: str, input_size: int, hidden_size: int, **kwargs) -> nn.Module:
    cell_class, _, extra = NN_MODULES[arch]
    return cell_class(input_size, hidden_size, **extra, **kwargs)


def nn_layers(arch: str, input_size: int, hidden_size: int, **kwargs) -> nn.Module:
    _, layered_class, extra = NN_MODULES[arch]
    return layered_class(input_size, hidden_size, **extra, **kwargs)


def params_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of a module's parameters, in its own (state_dict) order."""
    return {key: value.detach().clone() for key, value in module.named_parameters()}


def leaves(tree) -> list[torch.Tensor]:
    return tree_flatten(tree)[0]


def assert_close(actual, expected, rtol: float, what: str = "") -> None:
    """Same pytree structure, shapes and dtypes; max |actual - expected| <= rtol * max |expected| (over all leaves)."""
    got, want = leaves(actual), leaves(expected)
    assert len(got) == len(want), f"{what}: {len(got)} leaves vs {len(want)}"
    scale = max((leaf.detach().abs().max().item() for leaf in want if leaf.numel()), default=0.0)
    for index, (a, e) in enumerate(zip(got, want)):
        assert a.shape == e.shape, f"{what}[{index}]: shape {tuple(a.shape)} vs {tuple(e.shape)}"
        assert a.dtype == e.dtype, f"{what}[{index}]: dtype {a.dtype} vs {e.dtype}"
        if a.numel():
            difference = (a.detach() - e.detach()).abs().max().item()
            assert difference <= rtol * scale, f"{what}[{index}]: max |difference| {difference:.3e} > {rtol:.0e} * scale {scale:.3e}"


@pytest.fixture
def oracle() -> SimpleNamespace:
    return SimpleNamespace(
        NN_MODULES=NN_MODULES, nn_cell=nn_cell, nn_layers=nn_layers, params_of=params_of, leaves=leaves, assert_close=assert_close
    )


@pytest.fixture
def sru_package():
    """The optional `sru` package (the SRU oracle), or a skip when it is not installed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns that its CUDA kernels cannot be compiled on a CPU machine
        return pytest.importorskip("sru")
