"""run_layers against nn.RNN / nn.LSTM / nn.GRU: outputs, final carries, gradients, dropout."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad

import functional
from functional import LSTMCarry, run_layers

ARCHS = [arch for arch in functional.ARCHS if functional.ARCHS[arch].layered]  # run_layers' archs (sru has no layered form: test_sru.py)
F64 = torch.float64
OUT_TOL, GRAD_TOL = 1e-12, 1e-10
I, H, T, B = 3, 5, 7, 4


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def random_carry(arch, stacked, batch_shape, hidden_size=H, proj_size=0, seed=40):
    h = randn(stacked, *batch_shape, proj_size or hidden_size, seed=seed)
    return LSTMCarry(h, randn(stacked, *batch_shape, hidden_size, seed=seed + 1)) if arch == "lstm" else h


def as_torch_carry(carry):
    return tuple(carry) if isinstance(carry, tuple) else carry


def torch_final(arch, final):
    return list(final) if arch == "lstm" else [final]


def build(oracle, arch, seed=0, **kwargs):
    torch.manual_seed(seed)
    module = oracle.nn_layers(arch, I, H, dtype=F64, **kwargs)
    return module, oracle.params_of(module)


@pytest.mark.parametrize("given_carry", [False, True], ids=["zero_carry", "given_carry"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["time_first", "batch_first"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2], ids=["L1", "L2"])
@pytest.mark.parametrize("arch", ARCHS)
def test_run_layers_matches_torch(oracle, arch, num_layers, bidirectional, bias, batch_first, given_carry):
    module, params = build(oracle, arch, num_layers=num_layers, bidirectional=bidirectional, bias=bias, batch_first=batch_first)
    directions = 2 if bidirectional else 1
    xs = randn(B, T, I, seed=1) if batch_first else randn(T, B, I, seed=1)
    carry = random_carry(arch, num_layers * directions, (B,)) if given_carry else None
    with torch.no_grad():
        want_out, want_final = module(xs, as_torch_carry(carry))
    got_out, got_final = run_layers(arch, params, xs, carry, batch_first=batch_first)
    assert got_out.shape == ((B, T, directions * H) if batch_first else (T, B, directions * H))
    oracle.assert_close(got_out, want_out, OUT_TOL, "outputs")
    if arch == "lstm":
        assert isinstance(got_final, tuple) and len(got_final) == 2
    oracle.assert_close(oracle.leaves(got_final), torch_final(arch, want_final), OUT_TOL, "final carry")


@pytest.mark.parametrize("given_carry", [False, True], ids=["zero_carry", "given_carry"])
@pytest.mark.parametrize("structure", [(1, False), (2, True)], ids=["L1", "L2bi"])
@pytest.mark.parametrize("arch", ARCHS)
def test_unbatched_sequence_matches_torch(oracle, arch, structure, given_carry):
    num_layers, bidirectional = structure
    # batch_first=True must be ignored for an unbatched (T, I) input, as torch does
    module, params = build(oracle, arch, num_layers=num_layers, bidirectional=bidirectional, batch_first=True)
    stacked = num_layers * (2 if bidirectional else 1)
    xs = randn(T, I, seed=2)
    carry = random_carry(arch, stacked, ()) if given_carry else None
    with torch.no_grad():
        want_out, want_final = module(xs, as_torch_carry(carry))
    got_out, got_final = run_layers(arch, params, xs, carry, batch_first=True)
    oracle.assert_close(got_out, want_out, OUT_TOL, "outputs")
    oracle.assert_close(oracle.leaves(got_final), torch_final(arch, want_final), OUT_TOL, "final carry")


@pytest.mark.parametrize("given_carry", [False, True], ids=["zero_carry", "given_carry"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2], ids=["L1", "L2"])
def test_lstm_projection_matches_torch(oracle, num_layers, bidirectional, given_carry):
    module, params = build(oracle, "lstm", num_layers=num_layers, bidirectional=bidirectional, proj_size=2)
    assert "weight_hr_l0" in params
    stacked = num_layers * (2 if bidirectional else 1)
    xs = randn(T, B, I, seed=3)
    carry = random_carry("lstm", stacked, (B,), proj_size=2) if given_carry else None
    with torch.no_grad():
        want_out, want_final = module(xs, as_torch_carry(carry))
    got_out, got_final = run_layers("lstm", params, xs, carry)
    assert got_out.shape[-1] == 2 * (2 if bidirectional else 1)
    oracle.assert_close(got_out, want_out, OUT_TOL, "outputs")
    oracle.assert_close(list(got_final), list(want_final), OUT_TOL, "final carry")


GRAD_CASES = [(arch, layers, bi, 0) for arch in ARCHS for layers, bi in [(1, False), (2, True)]] + [("lstm", 2, True, 2)]


@pytest.mark.parametrize("use_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("arch, num_layers, bidirectional, proj_size", GRAD_CASES, ids=lambda v: str(v))
def test_gradients_match_torch(oracle, arch, num_layers, bidirectional, proj_size, use_lengths):
    """torch.func.grad of <outputs, W_y> + <final carry, W_c> w.r.t. params, xs, carry vs torch.autograd."""
    extra = {"proj_size": proj_size} if proj_size else {}
    module, params = build(oracle, arch, num_layers=num_layers, bidirectional=bidirectional, **extra)
    directions = 2 if bidirectional else 1
    xs = randn(T, B, I, seed=4)
    carry = random_carry(arch, num_layers * directions, (B,), proj_size=proj_size)
    lengths = torch.tensor([T, 2, 5, 1]) if use_lengths else None
    y_weight = randn(T, B, directions * (proj_size or H), seed=5)
    c_weight = random_carry(arch, num_layers * directions, (B,), proj_size=proj_size, seed=6)

    def objective(out, final):
        return (out * y_weight).sum() + sum((a * w).sum() for a, w in zip(oracle.leaves(final), oracle.leaves(c_weight), strict=True))

    got_params, got_xs, got_carry = grad(lambda p, x, c: objective(*run_layers(arch, p, x, c, lengths=lengths)), argnums=(0, 1, 2))(params, xs, carry)

    xs_leaf = xs.clone().requires_grad_()
    carry_leaves = [leaf.clone().requires_grad_() for leaf in oracle.leaves(carry)]
    torch_carry = tuple(carry_leaves) if arch == "lstm" else carry_leaves[0]
    if use_lengths:
        packed = torch.nn.utils.rnn.pack_padded_sequence(xs_leaf, lengths, enforce_sorted=False)
        out, final = module(packed, torch_carry)
        out = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=T)[0]
    else:
        out, final = module(xs_leaf, torch_carry)
    names = [name for name, _ in module.named_parameters()]
    want = torch.autograd.grad(objective(out, final), [*module.parameters(), xs_leaf, *carry_leaves])

    assert list(got_params) == names
    oracle.assert_close([got_params[n] for n in names], list(want[: len(names)]), GRAD_TOL, "grad params")
    oracle.assert_close(got_xs, want[len(names)], GRAD_TOL, "grad xs")
    oracle.assert_close(oracle.leaves(got_carry), list(want[len(names) + 1 :]), GRAD_TOL, "grad carry")


@pytest.mark.parametrize("arch", ARCHS)
def test_any_batch_shape_equals_flattened_batch(oracle, arch):
    _, params = build(oracle, arch, num_layers=2, bidirectional=True)
    xs = randn(T, 2, 3, I, seed=7)
    carry = random_carry(arch, 4, (2, 3))
    got_out, got_final = run_layers(arch, params, xs, carry)
    flat_carry = type(carry)(*(leaf.reshape(4, 6, -1) for leaf in carry)) if arch == "lstm" else carry.reshape(4, 6, -1)
    want_out, want_final = run_layers(arch, params, xs.reshape(T, 6, I), flat_carry)
    assert got_out.shape == (T, 2, 3, 2 * H)
    oracle.assert_close(got_out.reshape(T, 6, -1), want_out, OUT_TOL, "outputs")
    oracle.assert_close([leaf.reshape(4, 6, -1) for leaf in oracle.leaves(got_final)], oracle.leaves(want_final), OUT_TOL, "final carry")


@pytest.mark.parametrize("arch", ARCHS)
def test_run_layers_does_not_mutate_its_inputs(oracle, arch):
    _, params = build(oracle, arch, num_layers=2, bidirectional=True)
    xs, carry, lengths = randn(T, B, I, seed=8), random_carry(arch, 4, (B,)), torch.tensor([T, 1, 3, 4])
    before = ({k: v.clone() for k, v in params.items()}, xs.clone(), [leaf.clone() for leaf in oracle.leaves(carry)], lengths.clone())
    run_layers(arch, params, xs, carry, lengths=lengths, dropout=0.5, generator=torch.Generator().manual_seed(0))
    assert list(params) == list(before[0]) and all(torch.equal(params[k], before[0][k]) for k in params)
    assert torch.equal(xs, before[1])
    assert all(torch.equal(a, b) for a, b in zip(oracle.leaves(carry), before[2], strict=True))
    assert torch.equal(lengths, before[3])


# --- dropout -----------------------------------------------------------------------------------------


def two_layer(arch, seed=0, hidden_size=H, batch=B):
    params = functional.init_layers(arch, I, hidden_size, num_layers=2, bidirectional=True, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return params, randn(T, batch, I, seed=seed + 1)


@pytest.mark.parametrize("arch", ARCHS)
def test_dropout_off_equals_no_dropout(oracle, arch):
    params, xs = two_layer(arch)
    plain_out, plain_final = run_layers(arch, params, xs)
    for kwargs in ({"dropout": 0.5, "training": False}, {"dropout": 0.0, "training": True}, {"dropout": 1.0, "training": False}):
        out, final = run_layers(arch, params, xs, generator=torch.Generator().manual_seed(1), **kwargs)
        assert torch.equal(out, plain_out), kwargs
        assert all(torch.equal(a, b) for a, b in zip(oracle.leaves(final), oracle.leaves(plain_final), strict=True)), kwargs


@pytest.mark.parametrize("arch", ARCHS)
def test_dropout_is_not_applied_after_the_last_layer(arch):
    """As torch: dropout acts between layers, so a one-layer run is unaffected."""
    params = functional.init_layers(arch, I, H, generator=torch.Generator().manual_seed(0), dtype=F64)
    xs = randn(T, B, I, seed=1)
    out, _ = run_layers(arch, params, xs, dropout=0.9, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, run_layers(arch, params, xs)[0])


@pytest.mark.parametrize("arch", ARCHS)
def test_dropout_is_reproducible_from_the_generator(arch):
    params, xs = two_layer(arch)

    def run(seed):
        return run_layers(arch, params, xs, dropout=0.4, generator=torch.Generator().manual_seed(seed))[0]
    plain = run_layers(arch, params, xs)[0]
    first, again, other = run(5), run(5), run(6)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first, plain)
    assert (first - plain).abs().max() > 1e-3


def test_dropout_zeroes_the_right_fraction_and_rescales_the_rest():
    """Read layer 0's dropped output through an identity-like layer 1: rnn_tanh with W_ih = I, W_hh = 0, no bias."""
    p, hidden, steps, batch = 0.3, 8, 10, 64
    layer0 = functional.init_layers("rnn_tanh", I, hidden, bias=False, generator=torch.Generator().manual_seed(0), dtype=F64)
    params = {**layer0, "weight_ih_l1": torch.eye(hidden, dtype=F64), "weight_hh_l1": torch.zeros(hidden, hidden, dtype=F64)}
    xs = randn(steps, batch, I, seed=1)
    hidden0, _ = run_layers("rnn_tanh", layer0, xs)  # (T, B, H), all nonzero almost surely
    assert hidden0.abs().min() > 0
    out, _ = run_layers("rnn_tanh", params, xs, dropout=p, generator=torch.Generator().manual_seed(2))
    dropped = out == 0
    fraction = dropped.double().mean().item()
    # n = 5120 Bernoulli(0.3) draws: std of the fraction ~ 0.0064, so +-0.05 is a ~7.8 sigma bound
    assert abs(fraction - p) < 0.05, fraction
    # survivors are tanh(h0 / (1 - p)): inverted dropout scaling
    expected = torch.tanh(hidden0 / (1 - p))
    assert torch.allclose(out[~dropped], expected[~dropped], rtol=1e-12, atol=0)
    # p = 1 drops everything
    all_dropped, _ = run_layers("rnn_tanh", params, xs, dropout=1.0, generator=torch.Generator().manual_seed(2))
    assert not all_dropped.any()
    # and torch's own nn.RNN in training mode with the same dropout zeroes a like fraction (a sanity check of the oracle)
    module = torch.nn.RNN(I, hidden, num_layers=2, bias=False, dropout=p, dtype=F64)
    with torch.no_grad():
        for key, value in params.items():
            getattr(module, key).copy_(value)
        torch.manual_seed(3)
        torch_out, _ = module.train()(xs)
    assert abs((torch_out == 0).double().mean().item() - p) < 0.05
