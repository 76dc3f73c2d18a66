"""Whole-sequence recurrences (functional/bptt.py): values and hand-derived gradients against the step-wise
scan through autograd and against torch.nn; gradcheck; torch.func grad / vmap / vmap(grad); shapes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.func import grad, vmap
from torch.utils._pytree import tree_map

import functional
import functional.bptt as bptt
from functional import LSTMCarry, scan, stack_params
from functional.predictor import init_predictor, predict

ARCHS = [arch for arch, spec in functional.ARCHS.items() if spec.sequence is not None]
F64 = torch.float64
OUT_TOL, GRAD_TOL = 1e-12, 1e-10
I, H, T, B = 3, 4, 6, 2
CHUNKS = {"one_chunk": bptt._CHUNK_ELEMENTS, "many_chunks": 1}  # 1 element: every step its own chunk


@pytest.fixture(params=list(CHUNKS))
def chunking(request, monkeypatch):
    monkeypatch.setattr(bptt, "_CHUNK_ELEMENTS", CHUNKS[request.param])


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def make_params(arch, bias=True, seed=0, input_size=I):
    return functional.init_params(arch, input_size, H, generator=torch.Generator().manual_seed(seed), dtype=F64, bias=bias)


def random_carry(arch, batch_shape, seed=10):
    h = randn(*batch_shape, H, seed=seed)
    return LSTMCarry(h, randn(*batch_shape, H, seed=seed + 1)) if arch == "lstm" else h


def step_wise(arch, params, carry, xs):
    """The reference: the hoisted projection and a scan of the one-step recurrence, through autograd."""
    spec = functional.get_arch(arch)
    return scan(lambda c, x: spec.recurrence(params, c, x), carry, spec.project(params, xs))


def sequence(arch, params, carry, xs):
    return functional.get_arch(arch).sequence(params, carry, xs)


def carry_leaves(carry):
    return list(carry) if isinstance(carry, tuple) else [carry]


def weights(shape, k):
    """Fixed, varied weights (no random draw, so that the loss runs under vmap)."""
    return torch.cos(torch.arange(torch.Size(shape).numel(), dtype=F64) * (0.37 + k)).reshape(shape)


def loss_of(carry, ys):
    """A loss that weighs every output and the final carry differently, so no gradient is trivially zero."""
    return sum((leaf * weights(leaf.shape, k)).sum() for k, leaf in enumerate([ys, *carry_leaves(carry)]))


def run_and_grad(fn, arch, params, carry, xs):
    """Outputs and gradients wrt `xs`, every carry leaf and every param (autograd)."""
    params = {key: value.clone().requires_grad_() for key, value in params.items()}
    leaves = [leaf.clone().requires_grad_() for leaf in carry_leaves(carry)]
    carry = LSTMCarry(*leaves) if arch == "lstm" else leaves[0]
    xs = xs.clone().requires_grad_()
    final, ys = fn(arch, params, carry, xs)
    grads = torch.autograd.grad(loss_of(final, ys), [xs, *leaves, *params.values()])
    return (final, ys), dict(zip(["xs", *[f"carry{k}" for k in range(len(leaves))], *params], grads))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("arch", ARCHS)
def test_sequence_matches_step_wise_scan(oracle, arch, bias, chunking):
    params, carry, xs = make_params(arch, bias), random_carry(arch, (B,)), randn(T, B, I, seed=1)
    got, got_grads = run_and_grad(sequence, arch, params, carry, xs)
    want, want_grads = run_and_grad(step_wise, arch, params, carry, xs)
    oracle.assert_close(got, want, OUT_TOL, "outputs")
    assert got_grads.keys() == want_grads.keys()
    for key in want_grads:
        oracle.assert_close(got_grads[key], want_grads[key], GRAD_TOL, f"d/d{key}")


@pytest.mark.parametrize("arch", ARCHS)
def test_sequence_matches_torch_nn_cell_loop(oracle, arch, chunking):
    torch.manual_seed(0)
    cell = oracle.nn_cell(arch, I, H, dtype=F64)
    params = oracle.params_of(cell)
    carry, xs = random_carry(arch, (B,)), randn(T, B, I, seed=1)

    def torch_loop(arch, params, carry, xs):  # the oracle: torch.nn's cell stepped by hand
        state, ys = tuple(carry) if arch == "lstm" else carry, []
        for x in xs.unbind(0):
            state = torch.func.functional_call(cell, params, (x, state))
            ys.append(state[0] if arch == "lstm" else state)
        return (LSTMCarry(*state) if arch == "lstm" else state), torch.stack(ys)

    got, got_grads = run_and_grad(sequence, arch, params, carry, xs)
    want, want_grads = run_and_grad(torch_loop, arch, params, carry, xs)
    oracle.assert_close(got, want, OUT_TOL, "outputs")
    for key in want_grads:
        oracle.assert_close(got_grads[key], want_grads[key], GRAD_TOL, f"d/d{key}")


@pytest.mark.parametrize("arch", ARCHS)
def test_predictor_gradients_equal_the_scan_path(oracle, arch, monkeypatch, chunking):
    params = init_predictor(arch, 1, H, layers=2, generator=torch.Generator().manual_seed(0), dtype=F64)
    inputs, target = randn(T, B, 1, seed=2), randn(T + 2, B, 1, seed=3)

    def loss(p):
        outputs, _ = predict(arch, p, inputs, future=2)
        return ((outputs - target) ** 2).mean()

    got = grad(loss)(params)
    monkeypatch.setitem(functional.ARCHS, arch, dataclasses.replace(functional.ARCHS[arch], sequence=None))
    want = grad(loss)(params)
    for key in want:
        oracle.assert_close(got[key], want[key], GRAD_TOL, f"d/d{key}")


@pytest.mark.parametrize("arch", ARCHS)
def test_gradcheck(arch, chunking):
    params = make_params(arch, input_size=2)
    keys = list(params)
    carry, xs = random_carry(arch, (2,)), randn(3, 2, 2, seed=1)
    count = len(carry_leaves(carry))

    def fn(xs, *tensors):
        leaves, values = tensors[:count], tensors[count:]
        state = LSTMCarry(*leaves) if arch == "lstm" else leaves[0]
        final, ys = sequence(arch, dict(zip(keys, values)), state, xs)
        return (ys, *(final if arch == "lstm" else (final,)))

    inputs = [t.clone().requires_grad_() for t in (xs, *carry_leaves(carry), *params.values())]
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("arch", ARCHS)
def test_func_grad_vmap_and_per_sample_grads(oracle, arch):
    params_list = [make_params(arch, seed=k) for k in range(3)]
    carry, xs = random_carry(arch, (B,)), randn(T, B, I, seed=1)

    def loss(params, xs, carry):
        final, ys = sequence(arch, params, carry, xs)
        return loss_of(final, ys)

    # torch.func.grad equals autograd
    _, want = run_and_grad(sequence, arch, params_list[0], carry, xs)
    got = grad(loss)(params_list[0], xs, carry)
    for key in params_list[0]:
        oracle.assert_close(got[key], want[key], GRAD_TOL, f"grad d/d{key}")
    # vmap over stacked param sets equals a loop
    got_final, got_ys = vmap(lambda p: sequence(arch, p, carry, xs))(stack_params(params_list))
    for k, params in enumerate(params_list):
        want_final, want_ys = step_wise(arch, params, carry, xs)
        oracle.assert_close(got_ys[k], want_ys, OUT_TOL, f"vmap ys[{k}]")
        oracle.assert_close(tree_map(lambda leaf: leaf[k], got_final), want_final, OUT_TOL, f"vmap carry[{k}]")
    # vmap(grad) over stacked param sets equals a loop of grads
    got = vmap(grad(loss), in_dims=(0, None, None))(stack_params(params_list), xs, carry)
    for k, params in enumerate(params_list):
        want = grad(loss)(params, xs, carry)
        for key in params:
            oracle.assert_close(got[key][k], want[key], GRAD_TOL, f"vmap(grad) d/d{key}[{k}]")
    # per-sample grads: vmap(grad) over the batch of unbatched sequences equals a loop
    per_sample = vmap(grad(loss), in_dims=(None, 1, 0))(params_list[0], xs, carry)
    for b in range(B):
        want = grad(loss)(params_list[0], xs[:, b], tree_map(lambda leaf: leaf[b], carry))
        for key in want:
            oracle.assert_close(per_sample[key][b], want[key], GRAD_TOL, f"per-sample d/d{key}[{b}]")


@pytest.mark.parametrize("batch_shape", [(), (2, 3)], ids=["unbatched", "batch_2x3"])
@pytest.mark.parametrize("arch", ARCHS)
def test_any_batch_shape(oracle, arch, batch_shape):
    params, carry, xs = make_params(arch), random_carry(arch, batch_shape), randn(T, *batch_shape, I, seed=1)
    got, got_grads = run_and_grad(sequence, arch, params, carry, xs)
    want, want_grads = run_and_grad(step_wise, arch, params, carry, xs)
    assert got[1].shape == (T, *batch_shape, H)
    oracle.assert_close(got, want, OUT_TOL, "outputs")
    for key in want_grads:
        oracle.assert_close(got_grads[key], want_grads[key], GRAD_TOL, f"d/d{key}")


@pytest.mark.parametrize("arch", ARCHS)
def test_single_step(oracle, arch):
    params, carry, xs = make_params(arch), random_carry(arch, (B,)), randn(1, B, I, seed=1)
    got, got_grads = run_and_grad(sequence, arch, params, carry, xs)
    want, want_grads = run_and_grad(step_wise, arch, params, carry, xs)
    oracle.assert_close(got, want, OUT_TOL, "outputs")
    for key in want_grads:
        oracle.assert_close(got_grads[key], want_grads[key], GRAD_TOL, f"d/d{key}")


@pytest.mark.parametrize("arch", ARCHS)
def test_only_the_final_carry_or_only_the_outputs_used(oracle, arch):
    params, carry, xs = make_params(arch), random_carry(arch, (B,)), randn(T, B, I, seed=1)
    for pick in (lambda final, ys: ys.sum(), lambda final, ys: sum(leaf.sum() for leaf in (final if isinstance(final, tuple) else (final,)))):
        got = grad(lambda p: pick(*sequence(arch, p, carry, xs)))(params)
        want = grad(lambda p: pick(*step_wise(arch, p, carry, xs)))(params)
        for key in want:
            oracle.assert_close(got[key], want[key], GRAD_TOL, f"d/d{key}")


@pytest.mark.parametrize("arch", ARCHS)
def test_saturated_gates_stay_finite(oracle, arch):
    params, carry, xs = make_params(arch), random_carry(arch, (B,)), 300 * randn(T, B, I, seed=1)
    got, got_grads = run_and_grad(sequence, arch, params, carry, xs)
    want, want_grads = run_and_grad(step_wise, arch, params, carry, xs)
    for key in want_grads:
        assert torch.isfinite(want_grads[key]).all()
        assert torch.isfinite(got_grads[key]).all(), key
        oracle.assert_close(got_grads[key], want_grads[key], GRAD_TOL, f"d/d{key}")


@pytest.mark.parametrize("arch", ARCHS)
def test_sequence_does_not_mutate_its_inputs(arch):
    params, carry, xs = make_params(arch), random_carry(arch, (B,)), randn(T, B, I, seed=1)
    before = [t.clone() for t in (xs, *carry_leaves(carry), *params.values())]
    sequence(arch, params, carry, xs)
    grad(lambda p: sequence(arch, p, carry, xs)[1].sum())(params)
    after = [xs, *carry_leaves(carry), *params.values()]
    assert all(torch.equal(a, b) for a, b in zip(after, before))


def test_lstm_with_projection_falls_back_to_the_scan(oracle):
    params = functional.get_arch("lstm").init(I, H, proj_size=2, generator=torch.Generator().manual_seed(0), dtype=F64)
    carry, xs = LSTMCarry(randn(B, 2, seed=3), randn(B, H, seed=4)), randn(T, B, I, seed=1)
    oracle.assert_close(sequence("lstm", params, carry, xs), step_wise("lstm", params, carry, xs), OUT_TOL, "outputs")


def test_archs_with_a_sequence():
    assert ARCHS == ["rnn_tanh", "rnn_relu", "lstm", "gru"]
    assert functional.ARCHS["sru"].sequence is None


@pytest.mark.parametrize("arch", ARCHS)
def test_no_grad_path_equals_the_differentiable_one(oracle, arch, chunking):
    """Without grad mode the sequence skips the autograd.Function and saves nothing: same values, also under vmap."""
    params_list = [make_params(arch, seed=k) for k in range(2)]
    carry, xs = random_carry(arch, (B,)), randn(T, B, I, seed=1)
    want = sequence(arch, params_list[0], carry, xs)
    with torch.no_grad():
        oracle.assert_close(sequence(arch, params_list[0], carry, xs), want, 0.0, "no_grad")
        got = vmap(lambda p: sequence(arch, p, carry, xs))(stack_params(params_list))
    for k, params in enumerate(params_list):
        oracle.assert_close(tree_map(lambda leaf: leaf[k], got), step_wise(arch, params, carry, xs), OUT_TOL, f"vmap no_grad [{k}]")
