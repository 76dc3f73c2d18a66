"""Ensembles and per-sample gradients (one vmap call) equal loops of single-model gradients."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, grad_and_value

import functional
from functional.predictor import init_predictor
from functional.transforms import ensemble_grad_and_value, per_sample_grads, predictor_loss

ARCHS = list(functional.ARCHS)
F64 = torch.float64
TOL = 1e-10
T, N, H, K = 7, 3, 5, 3


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def members(arch, count=K):
    generator = torch.Generator().manual_seed(1)
    return [init_predictor(arch, 1, H, layers=2, generator=generator, dtype=F64) for _ in range(count)]


def split_constants(arch, params):
    """Trainable params and constants (SRU's scale_x), as cells train splits them."""
    constants = functional.get_arch(arch).buffers
    trainable = {key: value for key, value in params.items() if key.rsplit(".", 1)[-1] not in constants}
    return trainable, {key: value for key, value in params.items() if key not in trainable}


@pytest.mark.parametrize("arch", ARCHS)
def test_ensemble_grad_and_value_equals_loop_of_members(oracle, arch):
    loss = predictor_loss(arch)
    inputs, targets = randn(T, N, 1, seed=2), randn(T, N, 1, seed=3)
    params_list = members(arch)
    split = [split_constants(arch, params) for params in params_list]
    grads, losses = ensemble_grad_and_value(
        loss, functional.stack_params([trainable for trainable, _ in split]), inputs, targets,
        constants=functional.stack_params([constants for _, constants in split]) if split[0][1] else None,
    )
    assert losses.shape == (K,)
    for k, (trainable, constants) in enumerate(split):
        want_grads, want_loss = grad_and_value(lambda p, c=constants: loss({**p, **c}, inputs, targets))(trainable)
        oracle.assert_close(losses[k], want_loss, TOL, f"member {k} loss")
        assert grads.keys() == want_grads.keys()
        for key in want_grads:
            oracle.assert_close(grads[key][k], want_grads[key], TOL, f"member {k} grad {key}")


@pytest.mark.parametrize("arch", ARCHS)
def test_per_sample_grads_equal_loop_of_single_sequences(oracle, arch):
    loss = predictor_loss(arch)
    params = members(arch, 1)[0]
    inputs, targets = randn(T, N, 1, seed=4), randn(T, N, 1, seed=5)
    got = per_sample_grads(loss, params, inputs, targets)
    for n in range(N):
        want = grad(loss)(params, inputs[:, n], targets[:, n])
        for key in params:
            assert got[key].shape == (N, *params[key].shape)
            oracle.assert_close(got[key][n], want[key], TOL, f"sequence {n} grad {key}")


def test_per_sample_grads_average_to_the_batch_gradient(oracle):
    """MSE is a mean over sequences, so the mean of per-sequence gradients is the batch gradient."""
    loss = predictor_loss("gru")
    params = members("gru", 1)[0]
    inputs, targets = randn(T, N, 1, seed=6), randn(T, N, 1, seed=7)
    got = per_sample_grads(loss, params, inputs, targets)
    want = grad(loss)(params, inputs, targets)
    for key in params:
        oracle.assert_close(got[key].mean(0), want[key], TOL, key)


def test_per_sample_grads_batch_first(oracle):
    loss = predictor_loss("lstm")
    params = members("lstm", 1)[0]
    inputs, targets = randn(N, T, 1, seed=8), randn(N, T, 1, seed=9)
    got = per_sample_grads(loss, params, inputs, targets, batch_dim=0)
    want = grad(loss)(params, inputs[1], targets[1])
    for key in params:
        oracle.assert_close(got[key][1], want[key], TOL, key)


def test_ensemble_rejects_unstacked_params():
    params = members("gru", 1)[0]
    with pytest.raises(ValueError, match=r"stacked: expected tensors sharing a leading member axis K"):
        ensemble_grad_and_value(predictor_loss("gru"), params, randn(T, N, 1), randn(T, N, 1))


def test_per_sample_grads_rejects_mismatched_batches():
    params = members("gru", 1)[0]
    with pytest.raises(ValueError, match=r"targets: expected 3 sequences along axis 1 \(as inputs\), got 2"):
        per_sample_grads(predictor_loss("gru"), params, randn(T, 3, 1), randn(T, 2, 1))
