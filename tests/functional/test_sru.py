"""The SRU cell: step form == sequence form, the sru package's own reference recurrence and init as oracles, and its errors.

Tests that need the optional `sru` package take the `sru_package` fixture (a skip without it); the rest run anywhere.
"""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from torch.func import grad, vmap

import functional
from functional import init_layers, init_params, initial_carry, run_layers, scan, sru_cell, sru_init, sru_sequence, stack_params
from functional.layers import layer_structure
from functional.sru import sru_sizes

F64 = torch.float64
OUT_TOL, GRAD_TOL = 1e-12, 1e-10
SIZES = [(4, 4), (3, 5), (6, 4)]  # (input_size, hidden_size): 3 matrices when equal, else 4 (the highway projection U3)
SIZE_IDS = ["I4H4k3", "I3H5k4", "I6H4k4"]
LAYERED_ARCHS = sorted(arch for arch, spec in functional.ARCHS.items() if spec.layered)


def randn(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def sru_params(input_size, hidden_size, *, rescale=True, seed=0, dtype=F64):
    """sru_init's params with a random bias (init's is zero, which would hide a swapped b_f / b_r)."""
    params = sru_init(input_size, hidden_size, generator=torch.Generator().manual_seed(seed), dtype=dtype, rescale=rescale)
    params["bias"] = randn(2 * hidden_size, seed=seed + 100, dtype=dtype)
    return params


def scanned_cell(params, c0, xs, **kwargs):
    return scan(lambda c, x: sru_cell(params, c, x), c0, xs, **kwargs)


def raises(message: str, function, *args, **kwargs) -> str:
    """Assert a ValueError (exactly) whose message contains `message` verbatim."""
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        function(*args, **kwargs)
    assert info.type is ValueError
    return str(info.value)


# --- the registry entry ------------------------------------------------------------------------------------


def test_registry_entry():
    spec = functional.get_arch("sru")
    assert spec.name == "sru" and spec.cell is sru_cell
    assert not spec.layered and spec.buffers == frozenset({"scale_x"}) and not spec.supports_projection
    params = sru_params(3, 5)
    assert spec.sizes(params) == (3, 5)
    assert list(init_params("sru", 3, 5)) == ["weight", "weight_c", "bias", "scale_x"]  # sru.SRUCell's state_dict order


@pytest.mark.parametrize("sizes", SIZES, ids=SIZE_IDS)
def test_matrix_count_follows_the_sizes(sizes):
    input_size, hidden_size = sizes
    matrices = 3 if input_size == hidden_size else 4
    params = init_params("sru", input_size, hidden_size, dtype=F64)
    assert params["weight"].shape == (input_size, matrices * hidden_size)
    assert params["weight_c"].shape == params["bias"].shape == (2 * hidden_size,)
    assert params["scale_x"].shape == (1,)
    assert sru_sizes(params) == (input_size, hidden_size, matrices)


# --- step form == sequence form ------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_shape", [(3,), (), (2, 3)], ids=["B3", "unbatched", "B2x3"])
@pytest.mark.parametrize("rescale", [True, False], ids=["rescale", "norescale"])
@pytest.mark.parametrize("sizes", SIZES, ids=SIZE_IDS)
def test_sequence_equals_scanned_cell(oracle, sizes, rescale, batch_shape):
    input_size, hidden_size = sizes
    params = sru_params(input_size, hidden_size, rescale=rescale)
    xs, c0 = randn(6, *batch_shape, input_size, seed=1), randn(*batch_shape, hidden_size, seed=2)
    got_c, got_hs = sru_sequence(params, c0, xs)
    want_c, want_hs = scanned_cell(params, c0, xs)
    assert got_hs.shape == (6, *batch_shape, hidden_size) and got_c.shape == (*batch_shape, hidden_size)
    oracle.assert_close(got_hs, want_hs, OUT_TOL, "hs")
    oracle.assert_close(got_c, want_c, OUT_TOL, "c_T")
    assert want_hs.abs().max() > 0.1  # not a comparison of zeros


@pytest.mark.parametrize("rescale", [True, False], ids=["rescale", "norescale"])
@pytest.mark.parametrize("sizes", SIZES, ids=SIZE_IDS)
def test_sequence_gradients_equal_scanned_cell(oracle, sizes, rescale):
    input_size, hidden_size = sizes
    params = sru_params(input_size, hidden_size, rescale=rescale)
    xs, c0 = randn(5, 3, input_size, seed=1), randn(3, hidden_size, seed=2)
    h_weight, c_weight = randn(5, 3, hidden_size, seed=3), randn(3, hidden_size, seed=4)

    def loss(run):
        return lambda p, c, x: (lambda c_T, hs: (hs * h_weight).sum() + (c_T * c_weight).sum())(*run(p, c, x))

    got = grad(loss(sru_sequence), argnums=(0, 1, 2))(params, c0, xs)
    want = grad(loss(scanned_cell), argnums=(0, 1, 2))(params, c0, xs)
    assert list(got[0]) == list(params)
    oracle.assert_close([got[0][k] for k in params], [want[0][k] for k in params], GRAD_TOL, "grad params")
    oracle.assert_close(got[1], want[1], GRAD_TOL, "grad c0")
    oracle.assert_close(got[2], want[2], GRAD_TOL, "grad xs")
    if input_size != hidden_size:  # the 4-matrix form reads U3, never scale_x
        assert not got[0]["scale_x"].any()
    else:
        assert got[0]["scale_x"].abs().item() > 0


@pytest.mark.parametrize("sizes", SIZES[:2], ids=SIZE_IDS[:2])
def test_sequence_with_lengths_equals_scanned_cell_with_lengths(oracle, sizes):
    input_size, hidden_size = sizes
    params = sru_params(input_size, hidden_size)
    xs, c0, lengths = randn(6, 4, input_size, seed=1), randn(4, hidden_size, seed=2), torch.tensor([6, 2, 0, 5])
    got_c, got_hs = sru_sequence(params, c0, xs, lengths=lengths)
    want_c, want_hs = scanned_cell(params, c0, xs, lengths=lengths)
    oracle.assert_close(got_hs, want_hs, OUT_TOL, "hs")
    oracle.assert_close(got_c, want_c, OUT_TOL, "c_T")
    assert not got_hs[2:, 1].any() and not got_hs[:, 2].any()  # padding emits zeros
    assert torch.equal(got_c[2], c0[2])  # a zero-length sequence keeps its carry


# --- rescale ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", SIZES, ids=SIZE_IDS)
def test_rescale_off_means_scale_x_one_and_unscaled_weights(sizes):
    input_size, hidden_size = sizes
    on = sru_init(input_size, hidden_size, generator=torch.Generator().manual_seed(3), dtype=F64)
    off = sru_init(input_size, hidden_size, generator=torch.Generator().manual_seed(3), dtype=F64, rescale=False)
    assert on["scale_x"].item() == math.sqrt(3.0)  # sqrt(1 + 2 exp(highway_bias = 0))
    assert off["scale_x"].dtype == F64 and torch.equal(off["scale_x"], torch.ones(1, dtype=F64))
    assert torch.equal(on["weight_c"], off["weight_c"]) and torch.equal(on["bias"], off["bias"])
    on_w = on["weight"].view(input_size, hidden_size, -1)
    off_w = off["weight"].view(input_size, hidden_size, -1)
    assert torch.equal(on_w[..., :3], off_w[..., :3])
    if input_size != hidden_size:  # rescale scales the highway projection U3 by sqrt(3), and only that
        assert torch.equal(on_w[..., 3], off_w[..., 3] * math.sqrt(3.0))


def test_rescale_scales_the_highway_input_when_sizes_match(oracle):
    """k = 3: h = r c + (1 - r) x * scale_x, so with c held at zero and b_r = 0 the two scales differ by exactly (1 - r) x (scale - 1)."""
    on = sru_params(4, 4, rescale=True)
    off = {**on, "scale_x": torch.ones(1, dtype=F64)}
    x, c = randn(3, 4, seed=1), torch.zeros(3, 4, dtype=F64)
    _, h_on = sru_cell(on, c, x)
    _, h_off = sru_cell(off, c, x)
    u = (x @ on["weight"]).view(3, 4, 3)
    r = torch.sigmoid(u[..., 2] + on["bias"][4:])
    oracle.assert_close(h_on - h_off, (1 - r) * x * (math.sqrt(3.0) - 1), OUT_TOL, "highway term")


# --- the sru package's reference recurrence as the oracle ------------------------------------------------------


def reference(sru_package, params, c0, xs, rescale):
    """sru.ops.elementwise_recurrence_naive (pure Python) on U = x W, as SRUCell.forward calls it; grad mode selects it."""
    u = xs @ params["weight"]
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Running SRU on CPU with grad_enabled=True"
        h, c = sru_package.ops.elementwise_recurrence_naive(
            u, xs, params["weight_c"], params["bias"], c0, 0, params["weight_c"].shape[0] // 2, False, True, params["scale_x"] if rescale else None
        )
    return c, h


@pytest.mark.parametrize("rescale", [True, False], ids=["rescale", "norescale"])
@pytest.mark.parametrize("sizes", SIZES, ids=SIZE_IDS)
def test_sequence_matches_the_package_reference_recurrence(oracle, sru_package, sizes, rescale):
    input_size, hidden_size = sizes
    params = sru_params(input_size, hidden_size, rescale=rescale)
    xs, c0 = randn(7, 3, input_size, seed=1), randn(3, hidden_size, seed=2)
    want_c, want_hs = reference(sru_package, params, c0, xs, rescale)
    got_c, got_hs = sru_sequence(params, c0, xs)
    assert got_hs.shape == want_hs.shape == (7, 3, hidden_size)
    oracle.assert_close(got_hs, want_hs, OUT_TOL, "hs")
    oracle.assert_close(got_c, want_c, OUT_TOL, "c_T")
    # and the step form, one cell call per step, agrees with the package too
    step_c, step_hs = scanned_cell(params, c0, xs)
    oracle.assert_close(step_hs, want_hs, OUT_TOL, "hs (cell)")
    oracle.assert_close(step_c, want_c, OUT_TOL, "c_T (cell)")


@pytest.mark.parametrize("sizes", SIZES[:2], ids=SIZE_IDS[:2])
def test_sequence_gradients_match_the_package_reference_recurrence(oracle, sru_package, sizes):
    input_size, hidden_size = sizes
    params = sru_params(input_size, hidden_size)
    xs, c0 = randn(5, 3, input_size, seed=1), randn(3, hidden_size, seed=2)
    h_weight, c_weight = randn(5, 3, hidden_size, seed=3), randn(3, hidden_size, seed=4)
    keys = ["weight", "weight_c", "bias"]  # scale_x is a buffer the package never differentiates

    def objective(c_T, hs):
        return (hs * h_weight).sum() + (c_T * c_weight).sum()

    got = grad(lambda p, c, x: objective(*sru_sequence(p, c, x)), argnums=(0, 1, 2))(params, c0, xs)
    leaves = {k: params[k].clone().requires_grad_() for k in keys}
    c_leaf, x_leaf = c0.clone().requires_grad_(), xs.clone().requires_grad_()
    with torch.enable_grad():
        total = objective(*reference(sru_package, {**params, **leaves}, c_leaf, x_leaf, True))
    want = torch.autograd.grad(total, [*leaves.values(), c_leaf, x_leaf])
    oracle.assert_close([got[0][k] for k in keys], list(want[:3]), GRAD_TOL, "grad params")
    oracle.assert_close(got[1], want[3], GRAD_TOL, "grad c0")
    oracle.assert_close(got[2], want[4], GRAD_TOL, "grad xs")


# --- init: the package's SRUCell.reset_parameters, bit for bit ----------------------------------------------------


def assert_state_equal(params, module):
    state = module.state_dict()
    assert list(params) == list(state), "key order must be the SRUCell state_dict order"
    for key, value in state.items():
        assert params[key].dtype == value.dtype and params[key].shape == value.shape, key
        assert torch.equal(params[key], value), key


@pytest.mark.parametrize("sizes", SIZES, ids=SIZE_IDS)
def test_init_params_equals_sru_cell_under_global_seed(sru_package, sizes):
    input_size, hidden_size = sizes
    torch.manual_seed(1234)
    module = sru_package.SRUCell(input_size, hidden_size)
    torch.manual_seed(1234)
    params = init_params("sru", input_size, hidden_size)
    assert params["weight"].dtype == torch.float32
    assert_state_equal(params, module)
    after_functional = torch.rand(3)  # both consumed the global stream identically
    torch.manual_seed(1234)
    sru_package.SRUCell(input_size, hidden_size)
    assert torch.equal(after_functional, torch.rand(3))


@pytest.mark.parametrize("sizes", SIZES, ids=SIZE_IDS)
def test_sru_init_without_rescale_equals_sru_cell_without_rescale(sru_package, sizes):
    input_size, hidden_size = sizes
    torch.manual_seed(5)
    module = sru_package.SRUCell(input_size, hidden_size, rescale=False)
    torch.manual_seed(5)
    assert_state_equal(sru_init(input_size, hidden_size, rescale=False), module)
    assert module.scale_x.item() == 1.0


@pytest.mark.parametrize("sizes", SIZES[:2], ids=SIZE_IDS[:2])
def test_init_params_with_a_generator(sru_package, sizes):
    input_size, hidden_size = sizes
    torch.manual_seed(99)
    global_state = torch.get_rng_state()
    params = init_params("sru", input_size, hidden_size, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), global_state), "an explicit generator must leave the global RNG alone"
    other = init_params("sru", input_size, hidden_size, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(params["weight"], other["weight"]) and not torch.equal(params["weight_c"], other["weight_c"])
    torch.manual_seed(7)
    assert_state_equal(params, sru_package.SRUCell(input_size, hidden_size))


def test_init_params_dtype():
    params = init_params("sru", 3, 5, dtype=F64)
    assert all(value.dtype == F64 for value in params.values())
    assert params["scale_x"].item() == math.sqrt(3.0)
    assert not params["bias"].any()  # highway_bias 0


# --- arch-generic properties, for both forms -----------------------------------------------------------------------


@pytest.mark.parametrize("sizes", SIZES[:2], ids=SIZE_IDS[:2])
def test_vmap_over_stacked_params_equals_loop(oracle, sizes):
    input_size, hidden_size = sizes
    params_list = [sru_params(input_size, hidden_size, seed=s) for s in range(3)]
    x, c = randn(2, input_size, seed=1), randn(2, hidden_size, seed=2)
    got_c, got_h = vmap(sru_cell, in_dims=(0, None, None))(stack_params(params_list), c, x)
    looped = [sru_cell(p, c, x) for p in params_list]
    oracle.assert_close(got_h, torch.stack([h for _, h in looped]), OUT_TOL, "h")
    oracle.assert_close(got_c, torch.stack([c for c, _ in looped]), OUT_TOL, "c")
    xs = randn(4, 2, input_size, seed=3)
    seq_c, seq_hs = vmap(sru_sequence, in_dims=(0, None, None))(stack_params(params_list), c, xs)
    looped = [sru_sequence(p, c, xs) for p in params_list]
    oracle.assert_close(seq_hs, torch.stack([hs for _, hs in looped]), OUT_TOL, "hs")
    oracle.assert_close(seq_c, torch.stack([c for c, _ in looped]), OUT_TOL, "c_T")


@pytest.mark.parametrize("sizes", SIZES[:2], ids=SIZE_IDS[:2])
def test_neither_form_mutates_its_inputs(sizes):
    input_size, hidden_size = sizes
    params = sru_params(input_size, hidden_size)
    xs, c0 = randn(4, 2, input_size, seed=1), randn(2, hidden_size, seed=2)
    before = ({k: v.clone() for k, v in params.items()}, xs.clone(), c0.clone())
    c, h = sru_cell(params, c0, xs[0])
    c_T, hs = sru_sequence(params, c0, xs)
    for out in (c, h, c_T, hs):
        out.add_(1.0)  # the results do not alias the inputs
    assert list(params) == list(before[0]) and all(torch.equal(params[k], before[0][k]) for k in params)
    assert torch.equal(xs, before[1]) and torch.equal(c0, before[2])


def test_zero_initial_carry():
    c0 = initial_carry("sru", (3,), 5, dtype=F64)
    assert isinstance(c0, torch.Tensor) and c0.shape == (3, 5) and c0.dtype == F64 and not c0.any()
    params = sru_params(4, 5)
    c, h = sru_cell(params, c0, randn(3, 4, seed=1))
    assert c.shape == h.shape == (3, 5)


# --- bad input -------------------------------------------------------------------------------------------------------

I, H, B = 3, 4, 2


@pytest.mark.parametrize("key", ["weight", "weight_c", "bias", "scale_x"])
def test_missing_key(key):
    params = sru_params(I, H)
    del params[key]
    for run, inputs in ((sru_cell, (torch.zeros(B, H, dtype=F64), torch.zeros(B, I, dtype=F64))), (sru_sequence, (torch.zeros(B, H, dtype=F64), torch.zeros(5, B, I, dtype=F64)))):
        message = raises(f"params: missing key {key!r}", run, params, *inputs)
        assert "expected keys ['bias', 'scale_x', 'weight', 'weight_c']" in message


def test_extra_key():
    params = sru_params(I, H)
    raises("params: unexpected key 'weight_ih'", sru_cell, {**params, "weight_ih": params["weight"]}, torch.zeros(B, H, dtype=F64), torch.zeros(B, I, dtype=F64))


def test_wrong_param_shapes():
    params, c, x = sru_params(I, H), torch.zeros(B, H, dtype=F64), torch.zeros(B, I, dtype=F64)
    raises(
        f"params['weight']: expected shape ({I}, {4 * H}) (input_size, 4*hidden_size: 4 matrices since input_size != hidden_size), got ({I}, {4 * H - 1})",
        sru_cell, {**params, "weight": torch.zeros(I, 4 * H - 1, dtype=F64)}, c, x,
    )
    raises(f"params['weight']: expected shape (input_size, k*{H}), got ({4 * H},)", sru_cell, {**params, "weight": torch.zeros(4 * H, dtype=F64)}, c, x)
    raises(f"params['weight_c']: expected shape (2*hidden_size,), got ({2 * H + 1},)", sru_cell, {**params, "weight_c": torch.zeros(2 * H + 1, dtype=F64)}, c, x)
    raises(f"params['bias']: expected shape ({2 * H},) (b_f then b_r), got ({2 * H + 2},)", sru_cell, {**params, "bias": torch.zeros(2 * H + 2, dtype=F64)}, c, x)
    raises("params['scale_x']: expected shape (1,), got ()", sru_cell, {**params, "scale_x": torch.tensor(1.0, dtype=F64)}, c, x)
    # equal sizes take 3 matrices: a 4-matrix weight is refused, naming why
    square = sru_params(H, H)
    raises(
        f"params['weight']: expected shape ({H}, {3 * H}) (input_size, 3*hidden_size: 3 matrices since input_size == hidden_size), got ({H}, {4 * H})",
        sru_sequence, {**square, "weight": torch.zeros(H, 4 * H, dtype=F64)}, c, torch.zeros(5, B, H, dtype=F64),
    )


def test_wrong_input_size():
    params, c = sru_params(I, H), torch.zeros(B, H, dtype=F64)
    raises(f"x: expected shape (*B, {I}) with input_size {I}, got ({B}, {I + 1})", sru_cell, params, c, torch.zeros(B, I + 1, dtype=F64))
    raises(f"xs: expected shape (*B, {I}) with input_size {I}, got (5, {B}, {I + 1})", sru_sequence, params, c, torch.zeros(5, B, I + 1, dtype=F64))
    raises(f"xs: expected shape (T, *B, {I}), got ({I},)", sru_sequence, params, c, torch.zeros(I, dtype=F64))
    raises(f"xs: expected shape (T, *B, {I}), got list", sru_sequence, params, c, [[0.0] * I])


def test_wrong_carry_shape():
    params = sru_params(I, H)
    raises(f"c: expected shape ({B}, {H}) (batch shape of x, hidden_size), got ({B}, {H + 1})", sru_cell, params, torch.zeros(B, H + 1, dtype=F64), torch.zeros(B, I, dtype=F64))
    raises(f"c: expected shape ({H},) (batch shape of x, hidden_size), got ({B}, {H})", sru_cell, params, torch.zeros(B, H, dtype=F64), torch.zeros(I, dtype=F64))
    raises(
        f"c: expected shape ({B}, {H}) (batch shape of xs, hidden_size), got (3, {H})",
        sru_sequence, params, torch.zeros(3, H, dtype=F64), torch.zeros(5, B, I, dtype=F64),
    )


def test_dtype_mismatch():
    params, c, x = sru_params(I, H), torch.zeros(B, H, dtype=F64), torch.zeros(B, I, dtype=F64)
    expected = "expected dtype torch.float64 (the params' dtype), got torch.float32"
    raises(f"x: {expected}", sru_cell, params, c, x.float())
    raises(f"c: {expected}", sru_cell, params, c.float(), x)
    raises(f"xs: {expected}", sru_sequence, params, c, torch.zeros(5, B, I))
    for key in ("weight_c", "bias"):
        raises(f"params[{key!r}]: {expected}", sru_cell, {**params, key: params[key].float()}, c, x)
        raises(f"params[{key!r}]: {expected}", sru_sequence, {**params, key: params[key].float()}, c, torch.zeros(5, B, I, dtype=F64))


def test_sequence_refuses_a_carry_of_another_dtype():
    params = sru_params(I, H)
    raises("c: expected dtype torch.float64 (the params' dtype), got torch.float32", sru_sequence, params, torch.zeros(B, H), torch.zeros(5, B, I, dtype=F64))


def test_bias_false_is_refused():
    message = "bias: SRU always has its gate biases (b_f, b_r); got bias=False"
    raises(message, init_params, "sru", I, H, bias=False)
    raises(message, sru_init, I, H, bias=False)


def test_layered_forms_are_refused():
    message = f"arch: 'sru' has no layered (nn.RNN-style) form; expected one of {LAYERED_ARCHS}"
    raises(message, init_layers, "sru", I, H)
    raises(message, init_layers, "sru", I, H, num_layers=2, bidirectional=True)
    raises(message, run_layers, "sru", sru_params(I, H), torch.zeros(5, B, I, dtype=F64))
    raises(message, run_layers, "sru", init_layers("gru", I, H, dtype=F64), torch.zeros(5, B, I, dtype=F64))
    raises(message, layer_structure, "sru", sru_params(I, H))
