"""torch.func.vmap over stacked param sets and over inputs; stack_params / unstack_params."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, vmap

import functional
from functional import LSTMCarry, run_layers, stack_params, unstack_params

ARCHS = list(functional.ARCHS)
LAYERED_ARCHS = [arch for arch in ARCHS if functional.ARCHS[arch].layered]  # run_layers has no sru form
F64 = torch.float64
TOL = 1e-12
K, I, H, B = 3, 4, 5, 2


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def random_carry(arch, batch_shape, seed=10):
    h = randn(*batch_shape, H, seed=seed)
    return LSTMCarry(h, randn(*batch_shape, H, seed=seed + 1)) if arch == "lstm" else h


def param_sets(arch, count=K):
    generator = torch.Generator().manual_seed(0)
    return [functional.init_params(arch, I, H, generator=generator, dtype=F64) for _ in range(count)]


def stack_trees(trees):
    return torch.utils._pytree.tree_map(lambda *leaves: torch.stack(leaves), *trees)


@pytest.mark.parametrize("arch", ARCHS)
def test_vmap_over_param_sets_equals_loop(oracle, arch):
    cell = functional.get_arch(arch).cell
    params_list = param_sets(arch)
    x, carry = randn(B, I, seed=1), random_carry(arch, (B,))
    got_carry, got_y = vmap(cell, in_dims=(0, None, None))(stack_params(params_list), carry, x)
    looped = [cell(params, carry, x) for params in params_list]
    assert got_y.shape == (K, B, H)
    oracle.assert_close(got_y, torch.stack([y for _, y in looped]), TOL, "y")
    oracle.assert_close(got_carry, stack_trees([c for c, _ in looped]), TOL, "carry")


@pytest.mark.parametrize("arch", ARCHS)
def test_vmap_over_param_sets_and_carries_equals_loop(oracle, arch):
    cell = functional.get_arch(arch).cell
    params_list = param_sets(arch)
    x = randn(B, I, seed=1)
    carries = [random_carry(arch, (B,), seed=20 + k) for k in range(K)]
    got_carry, got_y = vmap(cell, in_dims=(0, 0, None))(stack_params(params_list), stack_trees(carries), x)
    looped = [cell(params, carry, x) for params, carry in zip(params_list, carries)]
    oracle.assert_close(got_y, torch.stack([y for _, y in looped]), TOL, "y")
    oracle.assert_close(got_carry, stack_trees([c for c, _ in looped]), TOL, "carry")


@pytest.mark.parametrize("arch", ARCHS)
def test_vmap_over_inputs_of_an_unbatched_cell_equals_batched_call(oracle, arch):
    cell = functional.get_arch(arch).cell
    params = param_sets(arch, 1)[0]
    xs, carry = randn(B + 2, I, seed=2), random_carry(arch, (B + 2,))
    got_carry, got_y = vmap(cell, in_dims=(None, 0, 0))(params, carry, xs)  # each call sees x: (I,), h: (H,)
    want_carry, want_y = cell(params, carry, xs)
    oracle.assert_close(got_y, want_y, TOL, "y")
    oracle.assert_close(got_carry, want_carry, TOL, "carry")


@pytest.mark.parametrize("arch", LAYERED_ARCHS)
def test_vmap_of_run_layers_over_param_sets_equals_loop(oracle, arch):
    generator = torch.Generator().manual_seed(0)
    params_list = [functional.init_layers(arch, I, H, num_layers=2, bidirectional=True, generator=generator, dtype=F64) for _ in range(K)]
    xs = randn(6, B, I, seed=3)
    got_out, got_final = vmap(lambda p: run_layers(arch, p, xs))(stack_params(params_list))
    looped = [run_layers(arch, p, xs) for p in params_list]
    oracle.assert_close(got_out, torch.stack([out for out, _ in looped]), TOL, "outputs")
    oracle.assert_close(got_final, stack_trees([final for _, final in looped]), TOL, "final carry")


@pytest.mark.parametrize("arch", ARCHS)
def test_vmap_of_grad_gives_per_member_gradients(oracle, arch):
    """Ensemble gradients in one call: vmap(grad(loss)) over stacked params equals grad per member."""
    cell = functional.get_arch(arch).cell
    params_list = param_sets(arch)
    x, carry, target = randn(B, I, seed=1), random_carry(arch, (B,)), randn(B, H, seed=5)

    def loss(params):
        return ((cell(params, carry, x)[1] - target) ** 2).sum()

    got = vmap(grad(loss))(stack_params(params_list))
    want = stack_params([grad(loss)(params) for params in params_list])
    assert list(got) == list(want)
    oracle.assert_close([got[k] for k in want], list(want.values()), TOL, "grads")


@pytest.mark.parametrize("arch", ARCHS)
def test_stack_unstack_round_trip(arch):
    params_list = param_sets(arch)
    stacked = stack_params(params_list)
    assert list(stacked) == list(params_list[0])
    for key, value in stacked.items():
        assert value.shape == (K, *params_list[0][key].shape)
        for k in range(K):
            assert torch.equal(value[k], params_list[k][key])
    unstacked = unstack_params(stacked)
    assert len(unstacked) == K
    for original, back in zip(params_list, unstacked):
        assert list(back) == list(original)
        assert all(torch.equal(back[key], original[key]) for key in original)
    again = stack_params(unstacked)
    assert list(again) == list(stacked) and all(torch.equal(again[key], stacked[key]) for key in stacked)


def test_stack_of_one_and_layered_params():
    layered = functional.init_layers("lstm", I, H, num_layers=2, proj_size=2, generator=torch.Generator().manual_seed(0), dtype=F64)
    stacked = stack_params([layered])
    assert all(stacked[key].shape == (1, *value.shape) for key, value in layered.items())
    (back,) = unstack_params(stacked)
    assert list(back) == list(layered) and all(torch.equal(back[k], layered[k]) for k in layered)
