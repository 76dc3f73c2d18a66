"""Every bad input is a ValueError naming the argument, the expected and the actual value (never a raw matmul error)."""

from __future__ import annotations

import re

import pytest
import torch

import functional
from functional import LSTMCarry, init_layers, init_params, initial_carry, run_layers, scan, stack_params, unstack_params

ARCHS = list(functional.ARCHS)
GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}  # the gated (torch.nn-style) archs; sru's own errors: test_sru.py
GATED = list(GATES)
CARRY_NAME = {"lstm": "carry.h", "sru": "c"}  # how each cell names its carry in messages ("h" otherwise)
F64 = torch.float64
I, H, B = 3, 4, 2


def zeros(*shape):
    return torch.zeros(*shape, dtype=F64)


def raises(message: str, function, *args, **kwargs) -> str:
    """Assert a ValueError (exactly; not a RuntimeError from torch) whose message contains `message` verbatim."""
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        function(*args, **kwargs)
    assert info.type is ValueError
    return str(info.value)


def cell_inputs(arch, batch_shape=(B,), dtype=F64):
    params = init_params(arch, I, H, generator=torch.Generator().manual_seed(0), dtype=dtype)
    return params, initial_carry(arch, batch_shape, H, dtype=dtype), torch.zeros(*batch_shape, I, dtype=dtype)


def call(arch, params, carry, x):
    return functional.get_arch(arch).cell(params, carry, x)


def test_gates_table_matches_registry():
    assert {arch: functional.get_arch(arch).gates for arch in ARCHS if functional.get_arch(arch).layered} == GATES
    assert set(ARCHS) - set(GATES) == {"sru"}


# --- cells -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_shape", [(B,), ()], ids=["batched", "unbatched"])
@pytest.mark.parametrize("arch", ARCHS)
def test_wrong_input_size(arch, batch_shape):
    params, carry, _ = cell_inputs(arch, batch_shape)
    x = zeros(*batch_shape, I + 1)
    shape = "(" + ", ".join(map(str, (*batch_shape, I + 1))) + ("," if not batch_shape else "") + ")"
    raises(f"x: expected shape (*B, {I}) with input_size {I}, got {shape}", call, arch, params, carry, x)


@pytest.mark.parametrize("arch", ARCHS)
def test_scalar_and_non_tensor_input(arch):
    params, carry, _ = cell_inputs(arch)
    raises(f"x: expected shape (*B, {I}) with input_size {I}, got ()", call, arch, params, carry, torch.tensor(1.0, dtype=F64))
    raises(f"x: expected a tensor of shape (*B, {I}), got list", call, arch, params, carry, [[0.0] * I] * B)


@pytest.mark.parametrize("arch", ["rnn_tanh", "rnn_relu", "gru"])
def test_wrong_carry_shape(arch):
    params, _, x = cell_inputs(arch)
    raises(f"h: expected shape ({B}, {H}) (batch shape of x, hidden_size), got ({B}, {H + 1})", call, arch, params, zeros(B, H + 1), x)


def test_wrong_lstm_carry_shapes():
    params, (h, c), x = cell_inputs("lstm")
    wrong = zeros(B, H + 1)
    raises(f"carry.h: expected shape ({B}, {H}) (batch shape of x, hidden_size), got ({B}, {H + 1})", call, "lstm", params, LSTMCarry(wrong, c), x)
    raises(f"carry.c: expected shape ({B}, {H}) (batch shape of x, hidden_size), got ({B}, {H + 1})", call, "lstm", params, LSTMCarry(h, wrong), x)
    raises("carry: expected a pair (h, c), got Tensor", call, "lstm", params, h, x)
    raises("carry: expected a pair (h, c), got tuple", call, "lstm", params, (h, c, c), x)


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_shape_of_carry_must_match_x(arch):
    params, _, _ = cell_inputs(arch)
    x = zeros(3, I)
    carry = initial_carry(arch, (B,), H, dtype=F64)
    name = CARRY_NAME.get(arch, "h")
    raises(f"{name}: expected shape (3, {H}) (batch shape of x, hidden_size), got ({B}, {H})", call, arch, params, carry, x)
    # an unbatched x with a batched carry, too
    raises(f"{name}: expected shape ({H},) (batch shape of x, hidden_size), got ({B}, {H})", call, arch, params, carry, zeros(I))


@pytest.mark.parametrize("arch", ARCHS)
def test_dtype_mismatch_between_params_and_inputs(arch):
    params, carry, x = cell_inputs(arch)
    raises("x: expected dtype torch.float64 (the params' dtype), got torch.float32", call, arch, params, carry, x.float())
    float_carry = LSTMCarry(carry.h.float(), carry.c) if arch == "lstm" else carry.float()
    raises(f"{CARRY_NAME.get(arch, 'h')}: expected dtype torch.float64 (the params' dtype), got torch.float32", call, arch, params, float_carry, x)
    if arch == "lstm":
        raises("carry.c: expected dtype torch.float64 (the params' dtype), got torch.float32", call, arch, params, LSTMCarry(carry.h, carry.c.float()), x)
    key = "weight_c" if arch == "sru" else "weight_hh"  # a param other than the first (whose dtype is the params' dtype)
    mixed = {**params, key: params[key].float()}
    raises(f"params[{key!r}]: expected dtype torch.float64 (the params' dtype), got torch.float32", call, arch, mixed, carry, x)


@pytest.mark.parametrize("key", ["weight_ih", "weight_hh", "bias_hh"])
@pytest.mark.parametrize("arch", GATED)
def test_missing_key(arch, key):
    params, carry, x = cell_inputs(arch)
    del params[key]
    message = raises(f"params: missing key {key!r}", call, arch, params, carry, x)
    assert "expected keys ['bias_hh', 'bias_ih', 'weight_hh', 'weight_ih']" in message


@pytest.mark.parametrize("arch", GATED)
def test_extra_key(arch):
    params, carry, x = cell_inputs(arch)
    raises("params: unexpected key 'weight_xx'", call, arch, {**params, "weight_xx": params["weight_ih"]}, carry, x)
    if arch != "lstm":  # a projection is LSTM-only
        raises("params: unexpected key 'weight_hr'", call, arch, {**params, "weight_hr": zeros(2, H)}, carry, x)


@pytest.mark.parametrize("arch", ARCHS)
def test_params_not_a_mapping(arch):
    params, carry, x = cell_inputs(arch)
    raises("params: expected a dict of tensors, got list", call, arch, list(params.values()), carry, x)


@pytest.mark.parametrize("arch", GATED)
def test_wrong_param_shape(arch):
    params, carry, x = cell_inputs(arch)
    g = GATES[arch]
    raises(f"params['weight_hh']: expected shape ({g * H}, {H}), got ({g * H}, {H + 1})", call, arch, {**params, "weight_hh": zeros(g * H, H + 1)}, carry, x)
    raises(f"params['bias_ih']: expected shape ({g * H},), got ({g * H + 1},)", call, arch, {**params, "bias_ih": zeros(g * H + 1)}, carry, x)
    raises(f"params['weight_ih']: expected shape ({g}*hidden_size, input_size), got ({g * H},)", call, arch, {**params, "weight_ih": zeros(g * H)}, carry, x)
    if g > 1:  # rows must be a multiple of the gate count
        raises(
            f"params['weight_ih']: expected shape ({g}*hidden_size, input_size), got ({g * H + 1}, {I})",
            call, arch, {**params, "weight_ih": zeros(g * H + 1, I)}, carry, x,
        )


def test_wrong_lstm_projection_shapes():
    params = init_params("lstm", I, H, dtype=F64)
    carry = LSTMCarry(zeros(B, 2), zeros(B, H))
    x = zeros(B, I)
    with_projection = {**params, "weight_hh": zeros(4 * H, 2), "weight_hr": zeros(2, H)}
    functional.lstm_cell(with_projection, carry, x)  # the valid form runs
    raises(f"params['weight_hr']: expected shape (2, {H}), got (2, {H + 1})", functional.lstm_cell, {**with_projection, "weight_hr": zeros(2, H + 1)}, carry, x)
    raises(f"params['weight_hh']: expected shape ({4 * H}, 2), got ({4 * H}, {H})", functional.lstm_cell, {**params, "weight_hr": zeros(2, H)}, carry, x)
    raises(
        f"carry.h: expected shape ({B}, 2) (batch shape of x, hidden_size), got ({B}, {H})",
        functional.lstm_cell, with_projection, initial_carry("lstm", (B,), H, dtype=F64), x,
    )


def test_bad_nonlinearity():
    params, carry, x = cell_inputs("rnn_tanh")
    raises("nonlinearity: expected one of ['relu', 'tanh'], got 'sigmoid'", functional.rnn_cell, params, carry, x, nonlinearity="sigmoid")


# --- registry / init -----------------------------------------------------------------------------------


def test_unknown_arch():
    expected = f"arch: expected one of {sorted(ARCHS)}, got 'transformer'"
    raises(expected, init_params, "transformer", I, H)
    raises(expected, functional.get_arch, "transformer")
    raises(expected, initial_carry, "transformer", (B,), H)
    raises(expected, init_layers, "transformer", I, H)
    raises(expected, run_layers, "transformer", init_layers("gru", I, H), torch.zeros(5, I))


@pytest.mark.parametrize("name, args", [("input_size", (0, H)), ("hidden_size", (I, 0)), ("hidden_size", (I, -2)), ("input_size", (2.5, H))])
def test_init_params_bad_sizes(name, args):
    raises(f"{name}: expected a positive int, got {args[0] if name == 'input_size' else args[1]!r}", init_params, "gru", *args)


def test_init_layers_bad_structure():
    raises("num_layers: expected a positive int, got 0", init_layers, "lstm", I, H, num_layers=0)
    raises(f"proj_size: expected 0 <= proj_size < hidden_size={H}, got {H}", init_layers, "lstm", I, H, proj_size=H)
    raises(f"proj_size: expected 0 <= proj_size < hidden_size={H}, got -1", init_layers, "lstm", I, H, proj_size=-1)


@pytest.mark.parametrize("arch", ["rnn_tanh", "rnn_relu", "gru"])
def test_proj_size_on_a_non_lstm(arch):
    raises(f"proj_size: only 'lstm' supports a projection, got proj_size=2 for arch {arch!r}", init_layers, arch, I, H, proj_size=2)
    layered = init_layers(arch, I, H, dtype=F64)
    layered["weight_hr_l0"] = zeros(2, H)
    raises("params: unexpected key 'weight_hr_l0'", run_layers, arch, layered, zeros(5, B, I))


# --- scan ----------------------------------------------------------------------------------------------


def step(h, x):
    return h + x.sum(-1, keepdim=True), h


def test_scan_empty_time_axis():
    raises("xs: expected at least one time step (T >= 1), got T = 0", scan, step, torch.zeros(B, 1), torch.zeros(0, B, I))


@pytest.mark.parametrize("xs", [(), {}, [torch.zeros(3, I), "not a tensor"], torch.tensor(1.0)], ids=["empty_tuple", "empty_dict", "non_tensor_leaf", "scalar"])
def test_scan_xs_without_a_time_axis(xs):
    if isinstance(xs, torch.Tensor):
        raises("xs: every tensor needs the same leading time dimension T, got shapes ['()']", scan, step, torch.zeros(1), xs)
    else:
        raises("xs: expected a tensor (T, *B, I) or a tuple/dict of such tensors", scan, step, torch.zeros(1), xs)


def test_scan_mismatched_time_across_leaves():
    xs = {"a": torch.zeros(3, B, I), "b": torch.zeros(4, B, I)}
    raises(
        f"xs: every tensor needs the same leading time dimension T, got shapes ['(3, {B}, {I})', '(4, {B}, {I})']",
        scan, lambda h, x: (h, h), torch.zeros(B, 1), xs,
    )


@pytest.mark.parametrize("lengths, message", [
    (torch.tensor([6, 1]), "lengths: expected values in [0, T=5], got min 1, max 6"),
    (torch.tensor([-1, 3]), "lengths: expected values in [0, T=5], got min -1, max 3"),
    (torch.tensor([2.0, 3.0]), "lengths: expected an integer tensor of shape (*B,), got dtype torch.float32"),
    (torch.tensor([True, False]), "lengths: expected an integer tensor of shape (*B,), got dtype torch.bool"),
    (torch.tensor([1, 2, 3]), f"lengths/mask: batch shape (3,) does not lead the carry/output shape ({B}, 1)"),
])
def test_scan_bad_lengths(lengths, message):
    raises(message, scan, step, torch.zeros(B, 1), torch.zeros(5, B, I), lengths=lengths)


def test_scan_bad_mask():
    xs = torch.zeros(5, B, I)
    raises(
        f"mask: expected a bool tensor (T=5, *B), got torch.int64 of shape (5, {B})",
        scan, step, torch.zeros(B, 1), xs, mask=torch.ones(5, B, dtype=torch.long),
    )
    raises(
        f"mask: expected a bool tensor (T=5, *B), got torch.bool of shape (4, {B})",
        scan, step, torch.zeros(B, 1), xs, mask=torch.ones(4, B, dtype=torch.bool),
    )
    raises(
        "lengths, mask: give one of them, not both",
        scan, step, torch.zeros(B, 1), xs, lengths=torch.tensor([1, 2]), mask=torch.ones(5, B, dtype=torch.bool),
    )


@pytest.mark.parametrize("arch", GATED)
def test_run_layers_lengths_out_of_range(arch):
    params = init_layers(arch, I, H, dtype=F64)
    xs = zeros(5, B, I)
    raises("lengths: expected values in [0, T=5], got min 2, max 9", run_layers, arch, params, xs, lengths=torch.tensor([9, 2]))
    raises(
        "lengths: expected an integer tensor of shape (*B,), got dtype torch.float64",
        run_layers, arch, params, xs, lengths=torch.tensor([1.0, 2.0], dtype=F64),
    )


# --- run_layers ------------------------------------------------------------------------------------------


def layered(arch, **kwargs):
    return init_layers(arch, I, H, num_layers=2, bidirectional=True, generator=torch.Generator().manual_seed(0), dtype=F64, **kwargs)


XS = zeros(5, B, I)


@pytest.mark.parametrize("key", ["weight_hh_l1", "bias_ih_l0_reverse", "weight_hh_l0_reverse"])
@pytest.mark.parametrize("arch", GATED)
def test_run_layers_missing_layer_key(arch, key):
    params = layered(arch)
    del params[key]
    raises(f"params: missing key {key!r} for 2 layer(s), bidirectional", run_layers, arch, params, XS)


@pytest.mark.parametrize("arch", GATED)
def test_run_layers_extra_layer_key(arch):
    params = layered(arch)
    raises("params: unexpected key 'weight_hh_l2' for 2 layer(s), bidirectional", run_layers, arch, {**params, "weight_hh_l2": params["weight_hh_l1"]}, XS)
    raises("params: unexpected key 'weight' for 2 layer(s), bidirectional", run_layers, arch, {**params, "weight": params["weight_hh_l1"]}, XS)


@pytest.mark.parametrize("arch", GATED)
def test_run_layers_given_cell_params(arch):
    params, _, _ = cell_inputs(arch)
    raises(f"params: expected layered keys like 'weight_ih_l0' (torch.nn.{arch.upper()} style), got {sorted(params)}", run_layers, arch, params, XS)


@pytest.mark.parametrize("arch", GATED)
def test_run_layers_wrong_layer_shape(arch):
    params, g = layered(arch), GATES[arch]
    raises(
        f"params['weight_ih_l1']: expected shape ({g * H}, {2 * H}) (input of layer 1 is directions * output_size), got ({g * H}, {H})",
        run_layers, arch, {**params, "weight_ih_l1": zeros(g * H, H)}, XS,
    )
    raises(
        f"params['weight_ih_l0_reverse']: expected shape ({g * H}, {I}) (input of layer 0 is input_size), got ({g * H}, {I + 1})",
        run_layers, arch, {**params, "weight_ih_l0_reverse": zeros(g * H, I + 1)}, XS,
    )
    raises(
        f"params['weight_hh_l1_reverse']: expected shape ({g * H}, {H}), got ({g * H}, {H + 2})",
        run_layers, arch, {**params, "weight_hh_l1_reverse": zeros(g * H, H + 2)}, XS,
    )
    raises(f"params['bias_hh_l1']: expected shape ({g * H},), got ({g * H}, 1)", run_layers, arch, {**params, "bias_hh_l1": zeros(g * H, 1)}, XS)
    raises(
        "params['weight_ih_l1']: expected dtype torch.float64 (the params' dtype), got torch.float32",
        run_layers, arch, {**params, **{k: v.float() for k, v in params.items() if k.endswith("_l1")}}, XS,
    )


@pytest.mark.parametrize("arch", ["rnn_tanh", "rnn_relu", "gru"])
def test_run_layers_wrong_carry_shape(arch):
    params = layered(arch)
    raises(
        f"h0: expected shape (4, {B}, {H}) (num_layers * directions, batch shape of xs, size), got (2, {B}, {H})",
        run_layers, arch, params, XS, zeros(2, B, H),
    )
    raises(
        f"h0: expected shape (4, {B}, {H}) (num_layers * directions, batch shape of xs, size), got (4, 3, {H})",
        run_layers, arch, params, XS, zeros(4, 3, H),
    )
    raises("h0: expected dtype torch.float64 (the params' dtype), got torch.float32", run_layers, arch, params, XS, torch.zeros(4, B, H))
    raises("carry: expected a tensor h0, got tuple", run_layers, arch, params, XS, (zeros(4, B, H), zeros(4, B, H)))


def test_run_layers_wrong_lstm_carry_shape():
    params = layered("lstm")
    h0, c0 = zeros(4, B, H), zeros(4, B, H)
    raises(
        f"carry.h0: expected shape (4, {B}, {H}) (num_layers * directions, batch shape of xs, size), got (4, {B}, {H + 1})",
        run_layers, "lstm", params, XS, LSTMCarry(zeros(4, B, H + 1), c0),
    )
    raises(
        f"carry.c0: expected shape (4, {B}, {H}) (num_layers * directions, batch shape of xs, size), got (3, {B}, {H})",
        run_layers, "lstm", params, XS, LSTMCarry(h0, zeros(3, B, H)),
    )
    raises("carry: expected a pair (h0, c0), got Tensor", run_layers, "lstm", params, XS, h0)
    projected = layered("lstm", proj_size=2)
    raises(
        f"carry.h0: expected shape (4, {B}, 2) (num_layers * directions, batch shape of xs, size), got (4, {B}, {H})",
        run_layers, "lstm", projected, zeros(5, B, I), LSTMCarry(h0, c0),
    )


@pytest.mark.parametrize("arch", GATED)
def test_run_layers_bad_xs(arch):
    params = layered(arch)
    raises(f"xs: expected shape (*B, {I}) with input_size {I}, got (5, {B}, {I + 1})", run_layers, arch, params, zeros(5, B, I + 1))
    raises(f"xs: expected shape (T, *B, {I}), got (5,)", run_layers, arch, params, zeros(5))
    raises(f"xs: expected shape (T, *B, {I}), got list", run_layers, arch, params, [[0.0] * I])
    raises("xs: expected dtype torch.float64 (the params' dtype), got torch.float32", run_layers, arch, params, torch.zeros(5, B, I))


@pytest.mark.parametrize("dropout", [-0.1, 1.5])
def test_dropout_outside_unit_interval(dropout):
    raises(f"dropout: expected a probability in [0, 1], got {dropout}", run_layers, "gru", layered("gru"), XS, dropout=dropout)


# --- stack ----------------------------------------------------------------------------------------------


def test_stack_params_mismatches():
    a = init_params("gru", I, H, dtype=F64)
    raises("params_list: expected at least one params dict, got an empty sequence", stack_params, [])
    no_bias = {k: v for k, v in a.items() if not k.startswith("bias")}
    raises(f"params_list[1]: expected keys {list(a)}, got {list(no_bias)}", stack_params, [a, no_bias])
    reordered = dict(reversed(list(a.items())))
    raises(f"params_list[1]: expected keys {list(a)}, got {list(reordered)}", stack_params, [a, reordered])
    bigger = init_params("gru", I, H + 1, dtype=F64)
    raises(f"params_list[2]['weight_ih']: expected shape ({3 * H}, {I}), got ({3 * (H + 1)}, {I})", stack_params, [a, a, bigger])


def test_unstack_params_mismatched_leading_axis():
    raises("stacked: expected every tensor to share a leading axis K", unstack_params, {"a": torch.zeros(2, 3), "b": torch.zeros(3, 3)})
    raises("stacked: expected every tensor to share a leading axis K", unstack_params, {"a": torch.tensor(1.0)})


# --- the raw errors these checks replace -------------------------------------------------------------------


def test_without_the_checks_torch_would_raise_a_runtime_error():
    """The point of the checks: the unchecked recurrence fails inside matmul with a RuntimeError; the cell says what is wrong."""
    params, carry, _ = cell_inputs("gru")
    x = zeros(B, I + 1)
    with pytest.raises(RuntimeError):
        functional.get_arch("gru").recurrence(params, carry, functional.get_arch("gru").project(params, x))
    raises(f"x: expected shape (*B, {I}) with input_size {I}, got ({B}, {I + 1})", functional.gru_cell, params, carry, x)
