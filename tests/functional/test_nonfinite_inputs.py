"""Library inputs with NaN/inf are not refused (a check would cost a device sync per call and break torch.func transforms):
they propagate exactly as through torch.nn, and finite batch elements are unaffected. Empty sequences (T = 0) are refused."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import functional
from functional import init_params, initial_carry, run_layers, scan, sru_sequence, init_layers
from functional.predictor import init_predictor, predict

F64 = torch.float64
NN_CELLS = {"rnn_tanh": (nn.RNNCell, {"nonlinearity": "tanh"}), "rnn_relu": (nn.RNNCell, {"nonlinearity": "relu"}), "lstm": (nn.LSTMCell, {}), "gru": (nn.GRUCell, {})}
T, B, I, H = 5, 3, 2, 4


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("arch", list(NN_CELLS))
def test_nonfinite_input_propagates_like_torch_nn(arch, bad):
    generator = torch.Generator().manual_seed(0)
    params = init_params(arch, I, H, generator=generator, dtype=F64)
    xs = torch.randn(T, B, I, generator=generator, dtype=F64)
    xs[2, 1, 0] = bad  # batch element 1, from step 2 on
    cell = functional.get_arch(arch).cell
    _, ys = scan(lambda c, x: cell(params, c, x), initial_carry(arch, (B,), H, dtype=F64), xs)

    cell_class, keywords = NN_CELLS[arch]
    module = cell_class(I, H, dtype=F64, **keywords)
    with torch.no_grad():
        for key, value in module.named_parameters():
            value.copy_(params[key])
        state, reference = None, []
        for x in xs:
            state = module(x, state)
            reference.append(state[0] if arch == "lstm" else state)
    reference = torch.stack(reference)

    assert torch.equal(torch.isnan(ys), torch.isnan(reference)) and torch.equal(torch.isinf(ys), torch.isinf(reference))
    finite = torch.isfinite(reference)
    assert torch.allclose(ys[finite], reference[finite], rtol=0, atol=1e-12 * reference[finite].abs().max().item())
    assert torch.isfinite(ys[:, [0, 2]]).all() and torch.isfinite(ys[:2, 1]).all()  # other batch elements, and earlier steps, untouched
    if bad != bad:  # NaN reaches the outputs (nothing is silently cleaned); +-inf may saturate a tanh/sigmoid to a finite value, as in torch.nn
        assert torch.isnan(ys[2:, 1]).all()


def raises(message, function, *args, **kwargs):
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        function(*args, **kwargs)
    assert info.type is ValueError


def test_empty_sequences_are_refused():
    empty = torch.zeros(0, B, I, dtype=F64)
    message = "xs: expected at least one time step (T >= 1), got T = 0"
    raises(message, scan, lambda c, x: (c, c), torch.zeros(B, H, dtype=F64), empty)
    raises(message, run_layers, "gru", init_layers("gru", I, H, dtype=F64), empty)
    raises(message, sru_sequence, init_params("sru", I, H, dtype=F64), initial_carry("sru", (B,), H, dtype=F64), empty)


def test_predict_refuses_an_empty_sequence():
    raises("inputs: expected at least one time step (T >= 1), got T = 0 in shape (0, 3, 1)", predict, "gru", init_predictor("gru", 1, H, dtype=F64), torch.zeros(0, B, 1, dtype=F64), future=3)
