"""The checks behind `cells parity`: every registered arch, as a cell and as layers, in float64 and float32."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.func import vmap

from functional.layers import init_layers
from functional.registry import ARCHS, get_arch, init_params, initial_carry
from functional.stack import stack_params
from parity.compare import ParityReport, compare
from parity.sru import INSTALL_HINT, sru_available

# dtype -> (output tolerance, gradient tolerance), both relative to the torch side's max |value|
TOLERANCES = {torch.float64: (1e-12, 1e-10), torch.float32: (1e-5, 1e-5)}
FORMS = ("cell", "2L bi", "2L bi packed")  # cell scanned over T; nn.RNN/LSTM/GRU(num_layers=2, bidirectional)


@dataclass
class ParityRow:
    arch: str
    form: str
    dtype: torch.dtype
    report: ParityReport | None  # None when skipped
    skipped: str = ""

    @property
    def tolerances(self) -> tuple[float, float]:
        return TOLERANCES[self.dtype]

    @property
    def passed(self) -> bool:
        out_tol, grad_tol = self.tolerances
        return self.report is not None and self.report.relative_out <= out_tol and self.report.relative_grad <= grad_tol


def parity_rows(input_size: int = 5, hidden_size: int = 7, steps: int = 9, batch: int = 3, seed: int = 0) -> Iterator[ParityRow]:
    """Compare every arch with its torch.nn counterpart on random inputs; yields one row per check."""
    for arch, spec in ARCHS.items():
        for form in FORMS if spec.layered else FORMS[:1]:
            for dtype in TOLERANCES:
                if arch == "sru" and not sru_available():
                    yield ParityRow(arch, form, dtype, None, skipped=f"sru package missing: {INSTALL_HINT}")
                    continue
                generator = torch.Generator().manual_seed(seed)
                if form == "cell":
                    params = init_params(arch, input_size, hidden_size, generator=generator, dtype=dtype)
                else:
                    params = init_layers(arch, input_size, hidden_size, num_layers=2, bidirectional=True, generator=generator, dtype=dtype)
                xs = torch.randn(steps, batch, input_size, generator=generator, dtype=dtype)
                lengths = torch.randint(1, steps + 1, (batch,), generator=generator) if form.endswith("packed") else None
                yield ParityRow(arch, form, dtype, compare(arch, params, xs, lengths=lengths, seed=seed))


@dataclass
class VmapRow:
    arch: str
    members: int
    max_difference: float  # vmap over K stacked param sets vs a loop over them

    @property
    def passed(self) -> bool:
        return self.max_difference <= TOLERANCES[torch.float64][0]


def vmap_rows(members: int = 4, input_size: int = 5, hidden_size: int = 7, batch: int = 3, seed: int = 0) -> Iterator[VmapRow]:
    """For every arch: `vmap(cell)` over K stacked param sets equals a Python loop over the K sets (float64)."""
    for arch in ARCHS:
        cell = get_arch(arch).cell
        generator = torch.Generator().manual_seed(seed)
        params_list = [init_params(arch, input_size, hidden_size, generator=generator, dtype=torch.float64) for _ in range(members)]
        x = torch.randn(batch, input_size, generator=generator, dtype=torch.float64)
        carry = initial_carry(arch, (batch,), hidden_size, dtype=torch.float64)
        _, batched = vmap(cell, in_dims=(0, None, None))(stack_params(params_list), carry, x)  # (K, B, H)
        looped = torch.stack([cell(params, carry, x)[1] for params in params_list])
        yield VmapRow(arch, members, (batched - looped).abs().max().item())
