"""Gradient flow through time and step Jacobians, against torch.nn cells + autograd (SRU: autograd of its step)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.autograd.functional import jacobian

import functional
from functional.gradflow import state_gradient_norms
from functional.jacobian import flatten_state, jacobian_spectral_norms, step_jacobian, unflatten_state
from functional.predictor import init_predictor, predictor_cells

ARCHS = list(functional.ARCHS)
NN_ARCHS = [arch for arch in ARCHS if arch != "sru"]
F64 = torch.float64
TOL = 1e-10
T, B, H, LAYERS = 9, 2, 4, 2


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def predictor_params(arch):
    return init_predictor(arch, 1, H, layers=LAYERS, generator=torch.Generator().manual_seed(3), dtype=F64)


def nn_step(oracle, arch, cell_params):
    """A torch.nn cell holding `cell_params`, as a step `(h, c) or h, x -> new state`."""
    module = oracle.nn_cell(arch, cell_params["weight_ih"].shape[1], H).double()
    module.load_state_dict(cell_params)
    if arch == "lstm":
        return lambda carry, x: tuple(module(x, carry))
    return lambda h, x: module(x, h)


def autograd_state_gradients(step_of_layer, zero_state, params, inputs, targets):
    """The oracle: a zero leaf added to the carry entering every step, `.backward()` of the last-step loss."""
    cells = predictor_cells(params)
    deltas = [[tuple(torch.zeros_like(leaf, requires_grad=True) for leaf in zero_state) for _ in range(T)] for _ in cells]
    hidden = inputs
    for layer, cell in enumerate(cells):
        step = step_of_layer(cell)
        carry, outputs = zero_state, []
        for t in range(T):
            carry = tuple(leaf + delta for leaf, delta in zip(carry, deltas[layer][t]))
            carry = step(carry if len(carry) > 1 else carry[0], hidden[t])
            carry = carry if isinstance(carry, tuple) else (carry,)
            outputs.append(carry[0])
        hidden = torch.stack(outputs)
    prediction = hidden[-1] @ params["head.weight"].T + params["head.bias"]
    ((prediction - targets[-1]) ** 2).mean().backward()
    return torch.stack([torch.stack([torch.cat([delta.grad for delta in deltas[layer][t]], -1).norm() for t in range(T)]) for layer in range(len(cells))])


@pytest.mark.parametrize("arch", NN_ARCHS)
def test_state_gradient_norms_match_torch_nn_autograd(oracle, arch):
    params = predictor_params(arch)
    inputs, targets = randn(T, B, 1, seed=1), randn(T, B, 1, seed=2)
    got = state_gradient_norms(arch, params, inputs, targets)
    zero = (torch.zeros(B, H, dtype=F64),) * (2 if arch == "lstm" else 1)
    want = autograd_state_gradients(lambda cell: nn_step(oracle, arch, cell), zero, params, inputs, targets)
    assert got.shape == (LAYERS, T)
    oracle.assert_close(got, want, TOL, "||dL/ds_t||")


def test_state_gradient_norms_sru_match_autograd_of_its_step(oracle):
    params = predictor_params("sru")
    inputs, targets = randn(T, B, 1, seed=1), randn(T, B, 1, seed=2)
    got = state_gradient_norms("sru", params, inputs, targets)

    cells = predictor_cells(params)
    deltas = [[torch.zeros(B, H, dtype=F64, requires_grad=True) for _ in range(T)] for _ in cells]
    hidden = inputs
    for layer, cell in enumerate(cells):
        c, outputs = torch.zeros(B, H, dtype=F64), []
        for t in range(T):
            c, y = functional.sru_cell(cell, c + deltas[layer][t], hidden[t])  # the carry is c, the output y
            outputs.append(y)
        hidden = torch.stack(outputs)
    prediction = hidden[-1] @ params["head.weight"].T + params["head.bias"]
    ((prediction - targets[-1]) ** 2).mean().backward()
    want = torch.stack([torch.stack([delta.grad.norm() for delta in layer]) for layer in deltas])
    oracle.assert_close(got, want, TOL, "||dL/dc_t||")


def test_rnn_gradient_flow_decays_towards_early_steps():
    """The vanishing gradient: at init, a tanh RNN's dependence on early states is orders of magnitude smaller."""
    params = init_predictor("rnn_tanh", 1, 16, layers=1, generator=torch.Generator().manual_seed(0), dtype=F64)
    inputs = torch.sin(torch.arange(60, dtype=F64) / 5).reshape(60, 1, 1)
    norms = state_gradient_norms("rnn_tanh", params, inputs, torch.roll(inputs, -1, 0))[0]
    assert norms[0] < 1e-6 * norms[-1]


@pytest.mark.parametrize("arch", NN_ARCHS)
@pytest.mark.parametrize("batch_shape", [(), (B,), (2, 3)], ids=["unbatched", "B", "2x3"])
def test_step_jacobian_matches_autograd_of_the_torch_nn_cell(oracle, arch, batch_shape):
    cell_params = functional.init_params(arch, 3, H, generator=torch.Generator().manual_seed(4), dtype=F64)
    x = randn(*batch_shape, 3, seed=5)
    carry = functional.LSTMCarry(randn(*batch_shape, H, seed=6), randn(*batch_shape, H, seed=7)) if arch == "lstm" else randn(*batch_shape, H, seed=6)
    got = step_jacobian(arch, cell_params, carry, x)
    size = 2 * H if arch == "lstm" else H
    assert got.shape == (*batch_shape, size, size)
    step = nn_step(oracle, arch, cell_params)
    state, flat_x = flatten_state(carry).reshape(-1, size), x.reshape(-1, 3)
    like = functional.initial_carry(arch, (1,), H, dtype=F64)
    for index in range(state.shape[0]):
        def one(s, x_one=flat_x[index : index + 1]):  # (S,) -> (S,) through the nn cell, batch of one
            return flatten_state(step(unflatten_state(s[None], like), x_one))[0]
        want = jacobian(one, state[index])
        oracle.assert_close(got.reshape(-1, size, size)[index], want, TOL, f"J[{index}]")


@pytest.mark.parametrize("arch", ARCHS)
def test_jacobian_spectral_norms_along_a_trajectory(oracle, arch):
    cell_params = functional.init_params(arch, 2, H, generator=torch.Generator().manual_seed(8), dtype=F64)
    inputs = randn(6, B, 2, seed=9)
    got = jacobian_spectral_norms(arch, cell_params, inputs)
    assert got.shape == (6, B)
    cell = functional.get_arch(arch).cell
    carry = functional.initial_carry(arch, (B,), H, dtype=F64)
    for t in range(6):
        J = step_jacobian(arch, cell_params, carry, inputs[t]).numpy()
        want = torch.tensor([np.linalg.norm(J[b], 2) for b in range(B)], dtype=F64)  # numpy's SVD as the norm oracle
        oracle.assert_close(got[t], want, TOL, f"t={t}")
        carry, _ = cell(cell_params, carry, inputs[t])


def test_gradflow_errors_name_the_argument():
    params = predictor_params("gru")
    with pytest.raises(ValueError, match=r"targets: expected shape \(9, 2, 1\), got \(9, 2\)"):
        state_gradient_norms("gru", params, randn(T, B, 1), randn(T, B))
    with pytest.raises(ValueError, match=r"inputs: expected shape \(T >= 1, \*B, 1\)"):
        state_gradient_norms("gru", params, randn(0, B, 1), randn(0, B, 1))
    with pytest.raises(ValueError, match=r"carry: expected batch shape \(2,\) \(that of x\), got \(3,\)"):
        step_jacobian("gru", predictor_cells(params)[0], randn(3, H), randn(B, 1))
