"""The defaults reproduce pytorch/examples time_sequence_prediction: same data, same initial weights, same loss."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from scripts.data import make_dataset, sine_waves
from scripts.train import FunctionalModel, TrainConfig, initial_params


class Sequence(nn.Module):
    """The example's model, verbatim apart from the hidden state being created inside forward."""

    def __init__(self):
        super().__init__()
        self.lstm1 = nn.LSTMCell(1, 51)
        self.lstm2 = nn.LSTMCell(51, 51)
        self.linear = nn.Linear(51, 1)

    def forward(self, input):
        outputs = []
        h_t = torch.zeros(input.size(0), 51, dtype=torch.double)
        c_t = torch.zeros(input.size(0), 51, dtype=torch.double)
        h_t2 = torch.zeros(input.size(0), 51, dtype=torch.double)
        c_t2 = torch.zeros(input.size(0), 51, dtype=torch.double)
        for input_t in input.split(1, dim=1):
            h_t, c_t = self.lstm1(input_t, (h_t, c_t))
            h_t2, c_t2 = self.lstm2(h_t, (h_t2, c_t2))
            outputs += [self.linear(h_t2)]
        return torch.cat(outputs, dim=1)


def test_sine_waves_are_the_examples_data():
    np.random.seed(2)
    T, L, N = 20, 1000, 100
    x = np.empty((N, L), "int64")
    x[:] = np.array(range(L)) + np.random.randint(-4 * T, 4 * T, N).reshape(N, 1)
    expected = np.sin(x / 1.0 / T).astype("float64")
    np.testing.assert_array_equal(sine_waves(), expected)
    data = make_dataset(None)
    np.testing.assert_array_equal(data.train_input[:, :, 0].T.numpy(), expected[3:, :-1])
    np.testing.assert_array_equal(data.train_target[:, :, 0].T.numpy(), expected[3:, 1:])
    np.testing.assert_array_equal(data.test_input[:, :, 0].T.numpy(), expected[:3, :-1])


def test_initial_weights_and_loss_equal_the_examples():
    np.random.seed(0)
    torch.manual_seed(0)
    reference = Sequence().double()
    params = initial_params(TrainConfig(arch="lstm"), "cpu")
    assert [tuple(v.shape) for v in params.values()] == [tuple(v.shape) for v in reference.state_dict().values()]
    for ours, theirs in zip(params.values(), reference.state_dict().values()):
        assert torch.equal(ours, theirs)
    data = sine_waves()[:, :60]  # a short prefix keeps the test fast
    inputs, target = torch.from_numpy(data[3:, :-1]), torch.from_numpy(data[3:, 1:])
    expected = nn.MSELoss()(reference(inputs), target)
    ours = FunctionalModel(TrainConfig(arch="lstm"), params).loss_and_grad(inputs.T[..., None], target.T[..., None])
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=0)
