"""The predictor as a torch.nn module (the PyTorch example's `Sequence`), built from functional params."""

from __future__ import annotations

import torch
from torch import nn

from functional.params import Params
from functional.predictor import predictor_cells
from parity.convert import load_params, to_torch


class TorchPredictor(nn.Module):
    """Stacked `torch.nn` cells and an `nn.Linear` head, stepped one timestep at a time as in the example."""

    def __init__(self, cells: list[nn.Module], head: nn.Linear):
        super().__init__()
        self.cells = nn.ModuleList(cells)
        self.head = head

    def forward(self, inputs: torch.Tensor, future: int = 0) -> torch.Tensor:
        """`inputs: (T, B, I)` -> `(T + future, B, O)`; the second cell is fed `h`, not `c`."""
        carries: list = [None] * len(self.cells)
        outputs = []

        def step(x: torch.Tensor) -> torch.Tensor:
            for index, cell in enumerate(self.cells):
                carries[index] = cell(x, carries[index])
                x = carries[index][0] if isinstance(carries[index], tuple) else carries[index]
            return self.head(x)

        for x in inputs.unbind(0):
            outputs.append(step(x))
        for _ in range(future):
            outputs.append(step(outputs[-1]))
        return torch.stack(outputs)


def to_torch_predictor(arch: str, params: Params) -> TorchPredictor:
    """A `TorchPredictor` holding the same tensors as functional predictor params."""
    cells = [to_torch(arch, cell) for cell in predictor_cells(params)]
    weight = params["head.weight"]
    head = nn.Linear(weight.shape[1], weight.shape[0], dtype=weight.dtype, device=weight.device)
    return load_params(TorchPredictor(cells, head), params)
