"""Property-based parity: for random sizes, batch shapes, lengths, bias and dtype, every registered arch equals its
reference (torch.nn, or the sru package for SRU) in outputs, final carry and gradients, within parity.suite.TOLERANCES.

The default run checks a few derandomized examples per arch (reproducible in CI); the slow tier checks 200 per arch:

    python -m pytest -m slow tests/parity/test_property_parity.py

The oracle here is written out on purpose (the torch.nn classes by name, a Python loop over steps, autograd), not taken
from parity.compare, so the test does not trust the code under test.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import grad
from torch.utils._pytree import tree_flatten, tree_map

import functional
from functional import init_layers, init_params, initial_carry, run_layers, scan
from parity.suite import TOLERANCES

settings.register_profile("quick", max_examples=6, derandomize=True, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("slow", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)

NN_CELLS = {"rnn_tanh": (nn.RNNCell, {"nonlinearity": "tanh"}), "rnn_relu": (nn.RNNCell, {"nonlinearity": "relu"}), "lstm": (nn.LSTMCell, {}), "gru": (nn.GRUCell, {})}
NN_LAYERS = {"rnn_tanh": (nn.RNN, {"nonlinearity": "tanh"}), "rnn_relu": (nn.RNN, {"nonlinearity": "relu"}), "lstm": (nn.LSTM, {}), "gru": (nn.GRU, {})}
ARCHS = list(functional.ARCHS)


def test_every_registered_arch_has_an_oracle():
    assert set(ARCHS) == set(NN_CELLS) | {"sru"}


@st.composite
def cases(draw, arch: str):
    """One random configuration for `arch`: sizes 1-64, batch shape (), (B,) or (B1, B2), T 1-50, bias, dtype, carry, form."""
    layered = arch != "sru" and draw(st.booleans())
    return {
        "input_size": draw(st.integers(1, 64)),
        "hidden_size": draw(st.integers(1, 64)),
        # nn.RNN/LSTM/GRU take (T, I) or (T, B, I); the cells any batch shape (the nn cell sees it flattened)
        "batch_shape": draw(st.sampled_from([(), (1,), (3,)]) if layered else st.one_of(st.just(()), st.tuples(st.integers(1, 4)), st.tuples(st.integers(1, 3), st.integers(1, 3)))),
        "steps": draw(st.integers(1, 50)),
        "bias": arch == "sru" or draw(st.booleans()),  # SRU always has its gate biases
        "dtype": draw(st.sampled_from([torch.float64, torch.float32])),
        "given_carry": draw(st.booleans()),
        "layered": layered,
        "num_layers": draw(st.integers(1, 2)) if layered else 1,
        "bidirectional": draw(st.booleans()) if layered else False,
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def randn(shape, generator, dtype):
    return torch.randn(shape, generator=generator, dtype=dtype)


def oracle_module(arch: str, case: dict, params: dict[str, torch.Tensor]) -> nn.Module:
    """The reference module holding the same tensors, copied key by key after checking names and shapes."""
    input_size, hidden_size, dtype = case["input_size"], case["hidden_size"], case["dtype"]
    if arch == "sru":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sru = pytest.importorskip("sru")
        module = sru.SRUCell(input_size, hidden_size).to(dtype)
    elif case["layered"]:
        layer_class, keywords = NN_LAYERS[arch]
        module = layer_class(input_size, hidden_size, num_layers=case["num_layers"], bias=case["bias"], bidirectional=case["bidirectional"], dtype=dtype, **keywords)
    else:
        cell_class, keywords = NN_CELLS[arch]
        module = cell_class(input_size, hidden_size, bias=case["bias"], dtype=dtype, **keywords)
    state = module.state_dict()
    assert sorted(state) == sorted(params), (sorted(state), sorted(params))
    with torch.no_grad():
        for key, value in state.items():
            assert value.shape == params[key].shape, key
            value.copy_(params[key])
    return module


def oracle_forward(arch: str, case: dict, module: nn.Module, xs: torch.Tensor, carry):
    """Torch side: `(ys (T, *B, H'), final carry)` in the functional layout."""
    batch_shape = case["batch_shape"]
    if case["layered"]:
        ys, final = module(xs, carry)
        return ys, final
    flat = (math.prod(batch_shape),) if batch_shape else ()
    xs_flat = xs.reshape(xs.shape[0], *flat, xs.shape[-1])
    carry_flat = tree_map(lambda leaf: leaf.reshape(*flat, leaf.shape[-1]), carry)
    if arch == "sru":  # the package's own sequence path; it needs a batch axis
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if not batch_shape:
                ys, c = module(xs_flat.unsqueeze(1), carry_flat.unsqueeze(0))
                ys, c = ys.squeeze(1), c.squeeze(0)
            else:
                ys, c = module(xs_flat, carry_flat)
        return ys.reshape(xs.shape[0], *batch_shape, -1), c.reshape(*batch_shape, -1)
    outputs, state = [], tuple(carry_flat) if arch == "lstm" else carry_flat
    for x in xs_flat.unbind(0):
        state = module(x, state)
        outputs.append(state[0] if arch == "lstm" else state)
    unflat = lambda leaf: leaf.reshape(*batch_shape, leaf.shape[-1])  # noqa: E731
    final = functional.LSTMCarry(unflat(state[0]), unflat(state[1])) if arch == "lstm" else unflat(state)
    return torch.stack(outputs).reshape(xs.shape[0], *batch_shape, -1), final


def functional_forward(arch: str, case: dict, params, xs, carry):
    if case["layered"]:
        return run_layers(arch, params, xs, carry)
    cell = functional.get_arch(arch).cell
    final, ys = scan(lambda c, x: cell(params, c, x), carry, xs)
    return ys, final


def max_abs(a, b) -> float:
    return max(((x - y).abs().max().item() if x.numel() else 0.0) for x, y in zip(tree_flatten(a)[0], tree_flatten(b)[0]))


def scale(tree) -> float:
    return max((leaf.abs().max().item() for leaf in tree_flatten(tree)[0] if leaf.numel()), default=0.0)


def check_case(arch: str, case: dict) -> None:
    dtype, batch_shape, hidden_size = case["dtype"], case["batch_shape"], case["hidden_size"]
    generator = torch.Generator().manual_seed(case["seed"])
    if case["layered"]:
        params = init_layers(arch, case["input_size"], hidden_size, num_layers=case["num_layers"], bidirectional=case["bidirectional"], bias=case["bias"], generator=generator, dtype=dtype)
        carry_batch = (case["num_layers"] * (2 if case["bidirectional"] else 1), *batch_shape)
    else:
        params = init_params(arch, case["input_size"], hidden_size, generator=generator, dtype=dtype, bias=case["bias"])
        carry_batch = batch_shape
    if arch == "sru":  # init's zero bias would hide a swapped b_f / b_r
        params["bias"] = randn(params["bias"].shape, generator, dtype)
    xs = randn((case["steps"], *batch_shape, case["input_size"]), generator, dtype)
    carry = initial_carry(arch, carry_batch, hidden_size, dtype=dtype)
    if case["given_carry"]:
        carry = tree_map(lambda leaf: randn(leaf.shape, generator, dtype), carry)
    module = oracle_module(arch, case, params)

    # torch: autograd through the reference module, on leaf copies
    xs_leaf = xs.clone().requires_grad_()
    carry_leaf = tree_map(lambda leaf: leaf.clone().requires_grad_(), carry)
    with torch.enable_grad():
        ys_ref, final_ref = oracle_forward(arch, case, module, xs_leaf, tuple(carry_leaf) if case["layered"] and arch == "lstm" else carry_leaf)
    y_weight = randn(ys_ref.shape, generator, dtype)
    final_ref = functional.LSTMCarry(*final_ref) if arch == "lstm" else final_ref
    carry_weight = tree_map(lambda leaf: randn(leaf.shape, generator, dtype), final_ref)

    def objective(ys, final):
        return (ys * y_weight).sum() + sum((leaf * weight).sum() for leaf, weight in zip(tree_flatten(final)[0], tree_flatten(carry_weight)[0]))

    trained = [key for key, _ in module.named_parameters()]  # SRU's scale_x is a buffer: not trained
    inputs = [dict(module.named_parameters())[key] for key in trained] + [xs_leaf, *tree_flatten(carry_leaf)[0]]
    ref_grads = torch.autograd.grad(objective(ys_ref, final_ref), inputs, allow_unused=True)
    ref_grads = [torch.zeros_like(i) if g is None else g for i, g in zip(inputs, ref_grads)]

    # functional: torch.func.grad, the outputs as aux
    def loss(p, x, c):
        outputs = functional_forward(arch, case, p, x, c)
        return objective(*outputs), outputs

    (grad_params, grad_xs, grad_carry), (ys, final) = grad(loss, argnums=(0, 1, 2), has_aux=True)(dict(params), xs, carry)
    got_grads = [grad_params[key] for key in trained] + [grad_xs, *tree_flatten(grad_carry)[0]]

    out_tol, grad_tol = TOLERANCES[dtype]
    assert ys.shape == ys_ref.shape and ys.dtype == dtype
    assert [leaf.shape for leaf in tree_flatten(final)[0]] == [leaf.shape for leaf in tree_flatten(final_ref)[0]]
    out_scale = max(scale(ys_ref), scale(final_ref), torch.finfo(torch.float64).tiny)
    assert max(max_abs(ys, ys_ref), max_abs(final, final_ref)) <= out_tol * out_scale, f"outputs of {case}"
    for key, got, want in zip([*trained, "xs", "carry", "carry.c"], got_grads, ref_grads):
        assert got.shape == want.shape, key
    grad_scale = max(scale(ref_grads), torch.finfo(torch.float64).tiny)
    difference = max(max_abs(got, want) for got, want in zip(got_grads, ref_grads))
    assert difference <= grad_tol * grad_scale, f"gradients of {case}: {difference:.3e} > {grad_tol:.0e} * {grad_scale:.3e}"


def property_test(profile: str):
    """The same property under a settings profile: one test per arch."""

    @pytest.mark.parametrize("arch", ARCHS)
    def test(arch, request):
        if arch == "sru":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pytest.importorskip("sru")

        @settings(settings.get_profile(profile))
        @given(case=cases(arch))
        def prop(case):
            check_case(arch, case)

        prop()

    return test


test_property_parity = property_test("quick")
test_property_parity_slow = pytest.mark.slow(property_test("slow"))


def test_the_property_sees_a_wrong_cell(monkeypatch):
    """The check is not vacuous: a GRU cell whose output is off by 10x the tolerance fails it (float64: 1e-11, float32: 1e-4)."""
    import dataclasses

    spec = functional.get_arch("gru")
    offset = {}

    def off(params, carry, x):
        carry, y = spec.cell(params, carry, x)
        return carry + offset["value"], y + offset["value"]

    monkeypatch.setattr(functional, "get_arch", lambda arch: dataclasses.replace(spec, cell=off))
    case = {"input_size": 3, "hidden_size": 5, "batch_shape": (2,), "steps": 4, "bias": True, "given_carry": False, "layered": False, "num_layers": 1, "bidirectional": False, "seed": 0}
    for dtype, value in ((torch.float64, 1e-11), (torch.float32, 1e-4)):
        offset["value"] = value
        with pytest.raises(AssertionError, match="outputs of"):
            check_case("gru", {**case, "dtype": dtype})
        offset["value"] = 0.0
        check_case("gru", {**case, "dtype": dtype})  # and passes unperturbed
