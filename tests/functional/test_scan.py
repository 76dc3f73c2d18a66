"""scan: a Python loop over time; reverse; lengths/mask as torch's PackedSequence; gradients."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import functional
from functional import LSTMCarry, scan

ARCHS = list(functional.ARCHS)  # scanning a cell: every arch
NN_ARCHS = [arch for arch in ARCHS if functional.ARCHS[arch].layered]  # run_layers vs torch.nn's PackedSequence
F64 = torch.float64
OUT_TOL, GRAD_TOL = 1e-12, 1e-10


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


W = randn(3, 4, seed=1)


def tensor_step(h, x):  # h: (B, 4), x: (B, 3)
    h = torch.tanh(h + x @ W)
    return h, 2 * h + 1


def tuple_step(carry, x):
    h, c = carry
    c = 0.5 * c + x @ W
    h = torch.tanh(h + c)
    return (h, c), (h.sum(-1), c * h)


def dict_step(h, x):
    h = torch.tanh(h + x["a"] @ W + x["b"])
    return h, {"out": h, "norm": h.norm(dim=-1)}


def manual_loop(step, carry, xs_list):
    ys = []
    for x in xs_list:
        carry, y = step(carry, x)
        ys.append(y)
    return carry, ys


def stack_outputs(ys):
    first = ys[0]
    if isinstance(first, tuple):
        return tuple(torch.stack([y[i] for y in ys]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: torch.stack([y[k] for y in ys]) for k in first}
    return torch.stack(ys)


def assert_equal_trees(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for k in a:
            assert_equal_trees(a[k], b[k])
    else:
        assert isinstance(b, tuple) and len(a) == len(b)
        for u, v in zip(a, b):
            assert_equal_trees(u, v)


CASES = {
    "tensor": (tensor_step, lambda: randn(2, 4, seed=2), lambda: randn(6, 2, 3, seed=3), lambda xs: list(xs.unbind(0))),
    "tuple": (tuple_step, lambda: (randn(2, 4, seed=2), randn(2, 4, seed=4)), lambda: randn(6, 2, 3, seed=3), lambda xs: list(xs.unbind(0))),
    "dict": (
        dict_step,
        lambda: randn(2, 4, seed=2),
        lambda: {"a": randn(6, 2, 3, seed=3), "b": randn(6, 2, 4, seed=5)},
        lambda xs: [{"a": xs["a"][t], "b": xs["b"][t]} for t in range(6)],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_scan_equals_python_loop(case):
    step, carry, xs, split = CASES[case]
    xs_value = xs()
    got_carry, got_ys = scan(step, carry(), xs_value)
    want_carry, want_ys = manual_loop(step, carry(), split(xs_value))
    assert_equal_trees(got_carry, want_carry)
    assert_equal_trees(got_ys, stack_outputs(want_ys))


@pytest.mark.parametrize("case", list(CASES))
def test_scan_reverse_equals_reversed_loop(case):
    step, carry, xs, split = CASES[case]
    xs_value = xs()
    got_carry, got_ys = scan(step, carry(), xs_value, reverse=True)
    want_carry, want_ys = manual_loop(step, carry(), split(xs_value)[::-1])
    assert_equal_trees(got_carry, want_carry)
    assert_equal_trees(got_ys, stack_outputs(want_ys[::-1]))  # ys[t] still belongs to xs[t]


def test_scan_reverse_equals_flipped_input_and_output():
    xs = randn(5, 2, 3, seed=7)
    got_carry, got_ys = scan(tensor_step, randn(2, 4), xs, reverse=True)
    want_carry, want_ys = scan(tensor_step, randn(2, 4), xs.flip(0))
    assert torch.equal(got_carry, want_carry)
    assert torch.equal(got_ys, want_ys.flip(0))


def test_scan_single_step_and_unbatched():
    xs = randn(1, 3, seed=8)  # T = 1, no batch
    carry, ys = scan(tensor_step, randn(4), xs)
    want_carry, want_y = tensor_step(randn(4), xs[0])
    assert torch.equal(carry, want_carry)
    assert torch.equal(ys, want_y[None])


# --- lengths / mask ----------------------------------------------------------------------------------


def cell_setup(oracle, arch, seed=0):
    torch.manual_seed(seed)
    if arch in oracle.NN_MODULES:
        params = oracle.params_of(oracle.nn_cell(arch, 3, 4, dtype=F64))
    else:  # sru: no torch.nn cell; its own init (3 != 4: the 4-matrix form)
        params = functional.init_params(arch, 3, 4, dtype=F64)
    cell = functional.get_arch(arch).cell
    return params, (lambda c, x: cell(params, c, x))


def random_carry(arch, batch_shape, hidden_size=4, seed=11):
    if arch == "lstm":
        return LSTMCarry(randn(*batch_shape, hidden_size, seed=seed), randn(*batch_shape, hidden_size, seed=seed + 1))
    return randn(*batch_shape, hidden_size, seed=seed)


def select(tree, index):
    return LSTMCarry(*(leaf[index] for leaf in tree)) if isinstance(tree, tuple) else tree[index]


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("arch", ARCHS)
def test_padded_steps_emit_zeros_and_keep_the_carry(oracle, arch, reverse):
    """Each sequence b behaves as if scanned alone over xs[:lengths[b], b]; padding outputs are exactly 0."""
    _, step = cell_setup(oracle, arch)
    xs, lengths = randn(7, 4, 3, seed=3), torch.tensor([7, 3, 0, 1])
    carry0 = random_carry(arch, (4,))
    got_carry, got_ys = scan(step, carry0, xs, lengths=lengths, reverse=reverse)
    assert got_ys.shape == (7, 4, 4)
    for b, length in enumerate(lengths.tolist()):
        assert not got_ys[length:, b].any(), "padding steps must emit zeros"
        if length == 0:  # nothing real: the carry passes through untouched
            for got, start in zip(oracle.leaves(select(got_carry, b)), oracle.leaves(select(carry0, b))):
                assert torch.equal(got, start)
            continue
        want_carry, want_ys = scan(step, select(carry0, b), xs[:length, b], reverse=reverse)
        oracle.assert_close(got_ys[:length, b], want_ys, OUT_TOL, "ys")
        oracle.assert_close(select(got_carry, b), want_carry, OUT_TOL, "carry")


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("arch", ARCHS)
def test_mask_equals_lengths(oracle, arch, reverse):
    _, step = cell_setup(oracle, arch)
    xs, lengths = randn(6, 3, 3, seed=3), torch.tensor([2, 6, 4])
    mask = torch.arange(6)[:, None] < lengths  # (T, B)
    by_lengths = scan(step, random_carry(arch, (3,)), xs, lengths=lengths, reverse=reverse)
    by_mask = scan(step, random_carry(arch, (3,)), xs, mask=mask, reverse=reverse)
    for a, b in zip(oracle.leaves(by_lengths), oracle.leaves(by_mask), strict=True):
        assert torch.equal(a, b)


def test_mask_with_holes_holds_the_carry_at_masked_steps():
    xs = randn(5, 2, 3, seed=3)
    mask = torch.tensor([[True, False], [False, True], [True, True], [False, False], [True, False]])
    got_carry, got_ys = scan(tensor_step, randn(2, 4), xs, mask=mask)
    h, ys = randn(2, 4), []
    for t in range(5):
        new_h, y = tensor_step(h, xs[t])
        m = mask[t][:, None]
        h = torch.where(m, new_h, h)
        ys.append(torch.where(m, y, 0.0))
    assert torch.equal(got_carry, h)
    assert torch.equal(got_ys, torch.stack(ys))


def test_lengths_on_an_unbatched_sequence():
    xs = randn(6, 3, seed=3)
    got_carry, got_ys = scan(tensor_step, randn(4), xs, lengths=torch.tensor(4))
    want_carry, want_ys = scan(tensor_step, randn(4), xs[:4])
    assert torch.equal(got_carry, want_carry)
    assert torch.equal(got_ys[:4], want_ys)
    assert not got_ys[4:].any()


def torch_packed(module, xs, carry, lengths, batch_first=False):
    packed = pack_padded_sequence(xs, lengths, batch_first=batch_first, enforce_sorted=False)
    out, final = module(packed, carry)
    return pad_packed_sequence(out, batch_first=batch_first, total_length=xs.shape[1 if batch_first else 0])[0], final


@pytest.mark.parametrize("batch_first", [False, True], ids=["time_first", "batch_first"])
@pytest.mark.parametrize("structure", [(1, False), (1, True), (2, True)], ids=["L1", "L1bi", "L2bi"])
@pytest.mark.parametrize("arch", NN_ARCHS)
def test_lengths_match_torch_packed_sequence(oracle, arch, structure, batch_first):
    num_layers, bidirectional = structure
    torch.manual_seed(3)
    module = oracle.nn_layers(arch, 3, 4, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first, dtype=F64)
    params = oracle.params_of(module)
    xs = randn(4, 9, 3, seed=5) if batch_first else randn(9, 4, 3, seed=5)
    lengths = torch.tensor([9, 2, 5, 1])
    carry = random_carry(arch, (num_layers * (2 if bidirectional else 1), 4), seed=20)
    with torch.no_grad():
        want_out, want_final = torch_packed(module, xs, tuple(carry) if arch == "lstm" else carry, lengths, batch_first)
    got_out, got_final = functional.run_layers(arch, params, xs, carry, lengths=lengths, batch_first=batch_first)
    oracle.assert_close(got_out, want_out, OUT_TOL, "outputs")
    oracle.assert_close(oracle.leaves(got_final), list(want_final) if arch == "lstm" else [want_final], OUT_TOL, "final carry")
    padding = (torch.arange(9)[:, None] >= lengths).T if batch_first else torch.arange(9)[:, None] >= lengths
    assert not got_out[padding].any()


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_lengths_match_torch_packed_sequence_lstm_projection(oracle, bidirectional):
    torch.manual_seed(4)
    module = oracle.nn_layers("lstm", 3, 5, num_layers=2, bidirectional=bidirectional, proj_size=2, dtype=F64)
    xs, lengths = randn(8, 3, 3, seed=6), torch.tensor([3, 8, 6])
    with torch.no_grad():
        want_out, want_final = torch_packed(module, xs, None, lengths)
    got_out, got_final = functional.run_layers("lstm", oracle.params_of(module), xs, lengths=lengths)
    oracle.assert_close(got_out, want_out, OUT_TOL, "outputs")
    oracle.assert_close(oracle.leaves(got_final), list(want_final), OUT_TOL, "final carry")


def test_lengths_with_a_plain_tuple_lstm_carry(oracle):
    torch.manual_seed(3)
    module = oracle.nn_layers("lstm", 3, 4, dtype=F64)
    xs, lengths = randn(5, 2, 3, seed=5), torch.tensor([3, 5])
    h0, c0 = randn(1, 2, 4, seed=1), randn(1, 2, 4, seed=2)
    with torch.no_grad():
        want_out, want_final = torch_packed(module, xs, (h0, c0), lengths)
    got_out, got_final = functional.run_layers("lstm", oracle.params_of(module), xs, (h0, c0), lengths=lengths)
    oracle.assert_close(got_out, want_out, OUT_TOL, "outputs")
    oracle.assert_close(list(got_final), list(want_final), OUT_TOL, "final carry")


# --- gradients ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_through_scan_equals_autograd_on_a_loop(oracle, arch, reverse, use_lengths):
    """torch.func.grad through scan (w.r.t. params, initial carry, xs) vs .backward-style autograd on a Python loop."""
    params, _ = cell_setup(oracle, arch)
    cell = functional.get_arch(arch).cell
    xs, carry = randn(5, 3, 3, seed=3), random_carry(arch, (3,))
    lengths = torch.tensor([5, 2, 4]) if use_lengths else None
    y_weight, c_weight = randn(5, 3, 4, seed=30), random_carry(arch, (3,), seed=31)

    def objective(final, ys):
        return (ys * y_weight).sum() + sum((a * w).sum() for a, w in zip(oracle.leaves(final), oracle.leaves(c_weight)))

    def loss(p, c, x):
        return objective(*scan(lambda h, v: cell(p, h, v), c, x, reverse=reverse, lengths=lengths))

    got = grad(loss, argnums=(0, 1, 2))(params, carry, xs)

    # reference: per-sequence Python loops over the real steps only, differentiated by autograd
    p_leaf = {k: v.clone().requires_grad_() for k, v in params.items()}
    c_leaves = [leaf.clone().requires_grad_() for leaf in oracle.leaves(carry)]
    x_leaf = xs.clone().requires_grad_()
    total = 0
    for b in range(3):
        length = 5 if lengths is None else int(lengths[b])
        h = LSTMCarry(c_leaves[0][b], c_leaves[1][b]) if arch == "lstm" else c_leaves[0][b]
        ys = [None] * 5
        for t in (reversed(range(length)) if reverse else range(length)):
            h, ys[t] = cell(p_leaf, h, x_leaf[t, b])
        total = total + sum((ys[t] * y_weight[t, b]).sum() for t in range(length))
        total = total + sum((a * w[b]).sum() for a, w in zip(oracle.leaves(h), oracle.leaves(c_weight)))
    inputs = [*p_leaf.values(), *c_leaves, x_leaf]
    want = torch.autograd.grad(total, inputs, allow_unused=True)
    # only a buffer may go unused: sru's scale_x, which the 4-matrix form (input_size != hidden_size) never reads
    unused = {name for name, g in zip([*params, *(f"carry{i}" for i in range(len(c_leaves))), "xs"], want) if g is None}
    assert unused == (set(functional.get_arch(arch).buffers) if arch == "sru" else set()), unused
    want = [torch.zeros_like(i) if g is None else g for i, g in zip(inputs, want)]

    oracle.assert_close([got[0][k] for k in params], list(want[: len(params)]), GRAD_TOL, "grad params")
    oracle.assert_close(oracle.leaves(got[1]), list(want[len(params) : -1]), GRAD_TOL, "grad carry")
    oracle.assert_close(got[2], want[-1], GRAD_TOL, "grad xs")
    if use_lengths:  # padding steps do not influence anything
        for b, length in enumerate(lengths.tolist()):
            assert not got[2][length:, b].any()
