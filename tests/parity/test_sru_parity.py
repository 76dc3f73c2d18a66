"""SRU parity with the sru package (2.6.0): compare() forward and gradients, conversions both ways, and the missing-package path.

Tests that need the package take the `sru_package` fixture (a skip without it); the missing-package tests simulate its absence.
"""

from __future__ import annotations

import importlib
import re
import sys
import warnings

import pytest
import torch
from torch import nn

import functional
import parity.sru
import parity.suite
from functional import init_params, sru_init, sru_sequence
from parity import ParityReport, arch_of, compare, from_torch, to_torch
from parity.sru import INSTALL_HINT, SRUMissing, is_sru_module, sru_available
from parity.suite import TOLERANCES, parity_rows

F64 = torch.float64
COMPARE_MODULE = importlib.import_module("parity.compare")  # the attribute parity.compare is the function
SIZES = [(4, 4), (3, 5)]  # 3 matrices (input_size == hidden_size), 4 matrices (the highway projection U3)
SIZE_IDS = ["I4H4k3", "I3H5k4"]
DTYPES = [F64, torch.float32]
T, B = 6, 3
KEYS = ["weight", "weight_c", "bias", "scale_x"]  # sru.SRUCell's state_dict order (scale_x is a buffer)


def randn(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def raises(message, function, *args, **kwargs):
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        function(*args, **kwargs)
    return str(info.value)


def sru_params(input_size, hidden_size, dtype=F64, seed=0):
    """init_params with a random bias (init's zero bias would hide a swapped b_f / b_r)."""
    params = init_params("sru", input_size, hidden_size, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    params["bias"] = randn(2 * hidden_size, seed=seed + 100, dtype=dtype)
    return params


def package_cell(sru_package, input_size, hidden_size, dtype=F64, seed=0, **kwargs):
    """A plain sru.SRUCell in `dtype` with a random bias."""
    torch.manual_seed(seed)
    module = sru_package.SRUCell(input_size, hidden_size, **kwargs).to(dtype)
    with torch.no_grad():
        module.bias.copy_(randn(*module.bias.shape, seed=seed + 100, dtype=dtype))
    return module


def run_package(module, xs, c0=None):
    with torch.enable_grad(), warnings.catch_warnings():  # grad mode: the package's pure-Python path (its CPU kernel is float32-only)
        warnings.simplefilter("ignore")
        h, c = module(xs, c0)
    return h.detach(), c.detach()


def assert_tiny(report: ParityReport, dtype):
    out_tol, grad_tol = TOLERANCES[dtype]
    assert set(report.grads) == {"weight", "weight_c", "bias", "xs", "carry"}  # every trained parameter, not the scale_x buffer
    assert report.out_scale > 0.05 and report.grad_scale > 0.05  # the comparison is not between zeros
    assert report.relative_out <= out_tol, report
    assert report.relative_grad <= grad_tol, report


# --- compare(): forward and gradients against the package's SRUCell ------------------------------------------------------


@pytest.mark.parametrize("given_carry", [False, True], ids=["zero_carry", "given_carry"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sizes", SIZES, ids=SIZE_IDS)
def test_compare_with_rescale(sru_package, sizes, dtype, given_carry):
    input_size, hidden_size = sizes
    params = sru_params(input_size, hidden_size, dtype)
    assert params["scale_x"].item() == pytest.approx(3**0.5)
    carry = randn(B, hidden_size, seed=2, dtype=dtype) if given_carry else None
    assert_tiny(compare("sru", params, randn(T, B, input_size, seed=1, dtype=dtype), carry), dtype)


@pytest.mark.filterwarnings("ignore:Running SRU on CPU with grad_enabled=True")  # a plain SRUCell on the torch side
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sizes", SIZES, ids=SIZE_IDS)
def test_compare_without_rescale(monkeypatch, sru_package, sizes, dtype):
    """An SRUCell(rescale=False) through from_torch: compare() as is, and with its torch side the very rescale=False module."""
    input_size, hidden_size = sizes
    module = package_cell(sru_package, input_size, hidden_size, dtype, rescale=False)
    params = from_torch(module)
    assert torch.equal(params["scale_x"], torch.ones(1, dtype=dtype))
    xs, carry = randn(T, B, input_size, seed=1, dtype=dtype), randn(B, hidden_size, seed=2, dtype=dtype)
    assert_tiny(compare("sru", params, xs, carry), dtype)
    monkeypatch.setattr(COMPARE_MODULE, "to_torch", lambda arch, p: module)  # the package's rescale=False path (x' = x, no scale)
    assert_tiny(compare("sru", params, xs, carry), dtype)


@pytest.mark.filterwarnings("ignore:Running SRU on CPU with grad_enabled=True")
@pytest.mark.parametrize("sizes", SIZES, ids=SIZE_IDS)
def test_compare_against_the_original_package_module(monkeypatch, sru_package, sizes):
    """compare() normally rebuilds the torch side with to_torch; here it runs the SRUCell the params came from."""
    input_size, hidden_size = sizes
    module = package_cell(sru_package, input_size, hidden_size, seed=3)
    monkeypatch.setattr(COMPARE_MODULE, "to_torch", lambda arch, p: module)
    assert_tiny(compare("sru", from_torch(module), randn(T, B, input_size, seed=1), randn(B, hidden_size, seed=2)), F64)


def test_compare_sees_a_perturbed_package_parameter(monkeypatch, sru_package):
    params = sru_params(3, 5)
    xs = randn(T, B, 3, seed=1)
    assert_tiny(compare("sru", params, xs), F64)  # unpatched: tiny
    build = COMPARE_MODULE.to_torch

    def perturbed(arch, p):
        module = build(arch, p)
        with torch.no_grad():
            module.weight_c[0] += 1e-2
        return module

    monkeypatch.setattr(COMPARE_MODULE, "to_torch", perturbed)
    report = compare("sru", params, xs)
    out_tol, grad_tol = TOLERANCES[F64]
    assert report.relative_out > 1e3 * out_tol
    assert report.grads["weight_c"] > 1e3 * grad_tol * report.grad_scale


def test_compare_refuses_lengths(sru_package):
    with pytest.raises(ValueError, match="lengths: SRU parity is checked on full-length sequences"):
        compare("sru", sru_params(3, 5), randn(T, B, 3), lengths=torch.tensor([T, 2, 3]))


def test_compare_an_unbatched_sequence(sru_package):
    params = sru_params(3, 5)
    try:
        report = compare("sru", params, randn(T, 3, seed=1))
    except ValueError as error:  # a clear refusal would do too
        assert "xs" in str(error)
    else:
        assert_tiny(report, F64)


# --- conversions -------------------------------------------------------------------------------------------------------------


def assert_same_state(params, module):
    state = module.state_dict()
    assert list(params) == list(state) == KEYS
    for key, value in state.items():
        assert params[key].dtype == value.dtype and params[key].shape == value.shape, key
        assert torch.equal(params[key], value), key


@pytest.mark.parametrize("rescale", [True, False], ids=["rescale", "norescale"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sizes", SIZES, ids=SIZE_IDS)
def test_round_trip(sru_package, sizes, dtype, rescale):
    input_size, hidden_size = sizes
    module = package_cell(sru_package, input_size, hidden_size, dtype, rescale=rescale)
    params = from_torch(module)
    assert_same_state(params, module)  # scale_x included, bitwise
    assert all(not value.requires_grad for value in params.values())
    rebuilt = to_torch("sru", params)
    assert isinstance(rebuilt, sru_package.SRUCell) and is_sru_module(rebuilt)
    assert (rebuilt.input_size, rebuilt.hidden_size, rebuilt.num_matrices) == (input_size, hidden_size, module.num_matrices)
    assert_same_state(params, rebuilt)
    again = from_torch(rebuilt)
    assert list(again) == KEYS and all(torch.equal(again[key], params[key]) for key in KEYS)
    assert arch_of(module) == arch_of(rebuilt) == "sru"
    # the rebuilt module computes what the original does
    xs = randn(T, B, input_size, seed=1, dtype=dtype)
    for a, b in zip(run_package(module, xs), run_package(rebuilt, xs)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("sizes", SIZES, ids=SIZE_IDS)
def test_init_params_converts_to_an_sru_cell_with_the_same_values(sru_package, sizes):
    params = init_params("sru", *sizes, generator=torch.Generator().manual_seed(1))
    assert_same_state(params, to_torch("sru", params))


def test_conversions_copy_rather_than_alias(sru_package):
    module = package_cell(sru_package, 3, 5)
    params = from_torch(module)
    snapshot = {k: v.clone() for k, v in params.items()}
    with torch.no_grad():
        for tensor in module.state_dict(keep_vars=True).values():
            tensor.add_(1.0)
    assert all(torch.equal(params[k], snapshot[k]) for k in params), "from_torch must copy"
    rebuilt = to_torch("sru", params)
    with torch.no_grad():
        for tensor in rebuilt.state_dict(keep_vars=True).values():
            tensor.mul_(0.0)
    assert all(torch.equal(params[k], snapshot[k]) for k in params), "to_torch must not write into params"


def test_the_step_cell_steps_like_an_nn_cell(sru_package):
    """to_torch's SRUCell also takes one step (B, I) with an nn-style (h, c) carry and returns (h, c), each (B, H)."""
    params = sru_params(3, 5)
    module = to_torch("sru", params)
    xs, c0 = randn(4, B, 3, seed=1), randn(B, 5, seed=2)
    carry, hs = (torch.zeros(B, 5, dtype=F64), c0), []
    with torch.no_grad():
        for x in xs:
            carry = module(x, carry)
            hs.append(carry[0])
    want_c, want_hs = sru_sequence(params, c0, xs)
    assert carry[0].shape == carry[1].shape == (B, 5)
    torch.testing.assert_close(torch.stack(hs), want_hs, rtol=0, atol=1e-12 * want_hs.abs().max().item())
    torch.testing.assert_close(carry[1], want_c, rtol=0, atol=1e-12 * want_c.abs().max().item())


def test_arch_of_an_sru_cell(sru_package):
    assert arch_of(sru_package.SRUCell(3, 5)) == "sru"
    assert is_sru_module(sru_package.SRUCell(3, 5)) and not is_sru_module(nn.GRUCell(3, 5))
    assert arch_of(nn.GRUCell(3, 5)) == "gru"


def test_to_torch_rejects_bad_sru_params(sru_package):
    params = sru_params(3, 5)
    raises("params: missing key 'scale_x'", to_torch, "sru", {k: v for k, v in params.items() if k != "scale_x"})
    raises("params: unexpected key 'extra'", to_torch, "sru", {**params, "extra": params["bias"]})
    raises(
        "params['weight']: expected shape (3, 20) (input_size, 4*hidden_size: 4 matrices since input_size != hidden_size), got (3, 15)",
        to_torch, "sru", {**params, "weight": torch.zeros(3, 15, dtype=F64)},
    )
    message = raises("params: missing key 'bias'", to_torch, "sru", init_params("gru", 3, 5))
    assert "expected keys ['bias', 'scale_x', 'weight', 'weight_c']" in message


# SRUCell options: which the functional SRU can represent ("equal"), which it must refuse ("refused"); never "different".
PACKAGE_OPTIONS = {
    "defaults": ((6, 4), {}, None),
    "rescale_off": ((4, 4), {"rescale": False}, None),
    "highway_bias": ((4, 4), {"highway_bias": -1.0}, None),
    "v1": ((6, 4), {"v1": True}, None),
    "n_proj": ((6, 4), {"n_proj": 2}, None),
    "layer_norm": ((6, 4), {"layer_norm": True}, None),
    "use_tanh": ((4, 4), {"use_tanh": True}, "tanh activation: the functional cell is identity-only"),
    "no_skip_term": ((4, 4), {"has_skip_term": False}, "no highway term: the functional cell always adds it"),
    "bidirectional": ((6, 4), {"bidirectional": True}, "read back as a unidirectional cell of hidden size 2H"),
}


@pytest.mark.parametrize("option", list(PACKAGE_OPTIONS))
def test_from_torch_never_silently_changes_an_sru_cell(sru_package, option):
    """from_torch (or the cell reading its params) must refuse an SRUCell it cannot represent; otherwise the outputs agree."""
    (input_size, hidden_size), kwargs, _ = PACKAGE_OPTIONS[option]
    module = package_cell(sru_package, input_size, hidden_size, **kwargs).eval()
    xs = randn(T, B, input_size, seed=1)
    want_hs, want_c = run_package(module, xs)
    try:
        params = from_torch(module)
        got_c, got_hs = sru_sequence(params, torch.zeros(B, params["weight_c"].shape[0] // 2, dtype=F64), xs)
    except ValueError as error:
        outcome = f"refused: {error}"
    else:
        same = got_hs.shape == want_hs.shape and (got_hs - want_hs).abs().max() <= 1e-12 * want_hs.abs().max()
        outcome = "equal" if same and (got_c - want_c).abs().max() <= 1e-12 * want_c.abs().max() else "different"
    assert outcome != "different", f"SRUCell({kwargs}): from_torch gave params that compute something else"
    if option in ("n_proj", "layer_norm", "use_tanh", "no_skip_term", "bidirectional"):  # settings sru_cell lacks: refused by name
        assert outcome.startswith("refused: module: SRUCell with"), outcome
    elif option in ("defaults", "rescale_off", "highway_bias", "v1"):
        assert outcome == "equal", outcome


# --- without the package ---------------------------------------------------------------------------------------------------


def test_parity_rows_report_a_skipped_sru_row_without_the_package(monkeypatch):
    monkeypatch.setattr(parity.suite, "sru_available", lambda: False)
    rows = list(parity_rows(input_size=2, hidden_size=3, steps=2, batch=2))
    sru_rows = [row for row in rows if row.arch == "sru"]
    assert [(row.form, row.dtype) for row in sru_rows] == [("cell", dtype) for dtype in TOLERANCES]
    for row in sru_rows:
        assert row.report is None and not row.passed
        assert "pip install 'cells[sru]'" in row.skipped and row.skipped.endswith(INSTALL_HINT)
    others = [row for row in rows if row.arch != "sru"]
    assert {row.arch for row in others} == set(functional.ARCHS) - {"sru"}
    assert all(row.report is not None and not row.skipped and row.passed for row in others)


@pytest.fixture
def without_sru_package(monkeypatch):
    """`import sru` fails (as when the package is absent); the cached module and step class are forgotten, then restored."""
    monkeypatch.setitem(sys.modules, "sru", None)
    parity.sru.sru_package.cache_clear()
    parity.sru.sru_step_class.cache_clear()
    yield
    monkeypatch.undo()
    parity.sru.sru_package.cache_clear()
    parity.sru.sru_step_class.cache_clear()


def test_without_the_package_sru_is_refused_with_the_install_hint(without_sru_package):
    assert not sru_available()
    params = sru_params(3, 5)
    message = raises(INSTALL_HINT, to_torch, "sru", params)
    assert "pip install 'cells[sru]'" in message
    with pytest.raises(SRUMissing):
        parity.sru.sru_package()
    rows = [row for row in parity_rows(input_size=2, hidden_size=3, steps=2, batch=2) if row.arch == "sru"]
    assert len(rows) == len(TOLERANCES) and all(row.report is None and INSTALL_HINT in row.skipped for row in rows)
    # the functional SRU itself needs nothing from the package
    c_T, hs = sru_sequence(params, torch.zeros(B, 5, dtype=F64), randn(T, B, 3))
    assert hs.shape == (T, B, 5) and c_T.shape == (B, 5) and hs.abs().max() > 0
    assert not is_sru_module(nn.GRUCell(3, 5))


def test_sru_init_is_the_default_init():
    """init_params('sru', ...) is sru_init with rescale on (no package needed)."""
    a = init_params("sru", 3, 5, generator=torch.Generator().manual_seed(4), dtype=F64)
    b = sru_init(3, 5, generator=torch.Generator().manual_seed(4), dtype=F64)
    assert list(a) == list(b) == KEYS and all(torch.equal(a[k], b[k]) for k in KEYS)
