"""parity.compare finds tiny differences for correct cells and large ones for perturbed cells; the suite passes."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch

import functional
import functional.registry
from parity import TORCH_MODULES, ParityReport, compare
from parity.sru import sru_available
from parity.suite import FORMS, TOLERANCES, parity_rows, vmap_rows

ARCHS = list(TORCH_MODULES)
F64 = torch.float64
OUT_TOL, GRAD_TOL = TOLERANCES[F64]
COMPARE_MODULE = importlib.import_module("parity.compare")  # the attribute parity.compare is the function
I, H, T, B = 3, 5, 6, 3


def randn(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def cell_params(arch, dtype=F64):
    return functional.init_params(arch, I, H, generator=torch.Generator().manual_seed(0), dtype=dtype)


def layered_params(arch, num_layers=2, bidirectional=True, proj_size=0, dtype=F64):
    return functional.init_layers(
        arch, I, H, num_layers=num_layers, bidirectional=bidirectional, proj_size=proj_size, generator=torch.Generator().manual_seed(0), dtype=dtype
    )


def assert_tiny(report: ParityReport, params, out_tol=OUT_TOL, grad_tol=GRAD_TOL):
    assert set(report.grads) == set(params) | {"xs", "carry"}
    assert report.out_scale > 0.05 and report.grad_scale > 0.05  # the comparison is not between zeros
    assert report.relative_out <= out_tol, report
    assert report.relative_grad <= grad_tol, report


CASES = {
    "cell": (cell_params, (T, B, I), None),
    "cell_unbatched": (cell_params, (T, I), None),
    "L1": (lambda arch: layered_params(arch, 1, False), (T, B, I), None),
    "L2bi": (layered_params, (T, B, I), None),
    "L2bi_lengths": (layered_params, (T, B, I), [T, 2, 4]),
    "L1_lengths_with_zero_padding": (lambda arch: layered_params(arch, 1, False), (T, B, I), [1, T, 3]),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("arch", ARCHS)
def test_compare_is_tiny_for_every_arch(arch, case):
    make, shape, lengths = CASES[case]
    params = make(arch)
    report = compare(arch, params, randn(*shape, seed=1), lengths=None if lengths is None else torch.tensor(lengths))
    assert_tiny(report, params)


@pytest.mark.parametrize("use_lengths", [False, True], ids=["full", "lengths"])
def test_compare_lstm_projection(use_lengths):
    params = layered_params("lstm", proj_size=2)
    report = compare("lstm", params, randn(T, B, I, seed=1), lengths=torch.tensor([T, 1, 4]) if use_lengths else None)
    assert_tiny(report, params)


@pytest.mark.parametrize("arch", ARCHS)
def test_compare_with_a_given_carry(arch):
    params = layered_params(arch)
    h = randn(4, B, H, seed=2)
    carry = functional.LSTMCarry(h, randn(4, B, H, seed=3)) if arch == "lstm" else h
    assert_tiny(compare(arch, params, randn(T, B, I, seed=1), carry), params)
    cell_carry = functional.LSTMCarry(h[0], randn(B, H, seed=3)) if arch == "lstm" else h[0]
    assert_tiny(compare(arch, cell_params(arch), randn(T, B, I, seed=1), cell_carry), cell_params(arch))


@pytest.mark.parametrize("arch", ARCHS)
def test_compare_float32_within_the_suite_tolerance(arch):
    params = layered_params(arch, dtype=torch.float32)
    assert_tiny(compare(arch, params, randn(T, B, I, seed=1, dtype=torch.float32), lengths=torch.tensor([T, 2, 5])), params, *TOLERANCES[torch.float32])


def test_compare_refuses_lengths_with_cell_params():
    with pytest.raises(ValueError, match="lengths: torch.nn cells have no packed form"):
        compare("gru", cell_params("gru"), randn(T, B, I), lengths=torch.tensor([T, 2, 3]))


# --- compare can see a difference ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_compare_detects_an_output_offset_in_a_cell(monkeypatch, arch):
    spec = functional.registry.ARCHS[arch]

    def offset_cell(params, carry, x):
        new_carry, y = spec.cell(params, carry, x)
        return new_carry, y + 1e-3

    monkeypatch.setitem(functional.registry.ARCHS, arch, dataclasses.replace(spec, cell=offset_cell))
    report = compare(arch, cell_params(arch), randn(T, B, I, seed=1))
    assert report.out == pytest.approx(1e-3, rel=1e-6)  # exactly the offset...
    assert report.carry <= OUT_TOL * report.out_scale  # ...and only in the outputs
    assert report.relative_out > 1e3 * OUT_TOL
    assert report.relative_grad <= GRAD_TOL  # an offset does not change any gradient


@pytest.mark.parametrize("arch", ARCHS)
def test_compare_detects_a_scaled_carry_in_layers(monkeypatch, arch):
    spec = functional.registry.ARCHS[arch]

    def scaled_recurrence(params, carry, x_projected):
        new_carry, y = spec.recurrence(params, carry, x_projected)
        scaled = type(new_carry)(*(leaf * (1 + 1e-3) for leaf in new_carry)) if isinstance(new_carry, tuple) else new_carry * (1 + 1e-3)
        return scaled, y

    # sequence=None: run_layers then scans the (patched) recurrence instead of the whole-sequence fast path
    monkeypatch.setitem(functional.registry.ARCHS, arch, dataclasses.replace(spec, recurrence=scaled_recurrence, sequence=None))
    report = compare(arch, layered_params(arch), randn(T, B, I, seed=1))
    assert report.relative_out > 1e-6
    assert report.carry > 1e-6 * report.out_scale
    assert report.relative_grad > 1e-6


@pytest.mark.parametrize("layered", [False, True], ids=["cell", "layered"])
@pytest.mark.parametrize("arch", ARCHS)
def test_compare_detects_a_perturbed_torch_parameter(monkeypatch, arch, layered):
    """Perturb one weight of the torch module after compare builds it from the same params."""
    key = "weight_hh_l0" if layered else "weight_hh"
    build = COMPARE_MODULE.to_torch

    def perturbed_to_torch(name, params):
        module = build(name, params)
        with torch.no_grad():
            getattr(module, key)[0, 0] += 1e-2
        return module

    params = layered_params(arch) if layered else cell_params(arch)
    assert_tiny(compare(arch, params, randn(T, B, I, seed=1)), params)  # unpatched: tiny
    monkeypatch.setattr(COMPARE_MODULE, "to_torch", perturbed_to_torch)
    report = compare(arch, params, randn(T, B, I, seed=1))
    assert report.relative_out > 1e3 * OUT_TOL
    assert report.grads[key] > 1e3 * GRAD_TOL * report.grad_scale
    assert report.relative_grad > 1e3 * GRAD_TOL


# --- the suite behind `cells parity` ------------------------------------------------------------------------


def test_parity_rows_all_pass():
    """Every arch in every form it has (sru: the cell only), both dtypes; all within tolerance.

    sru's rows need the sru package; without it they are skipped rows (checked in tests/parity/test_sru.py).
    """
    rows = list(parity_rows())
    expected = [(arch, form, dtype) for arch, spec in functional.ARCHS.items() for form in (FORMS if spec.layered else ("cell",)) for dtype in TOLERANCES]
    assert [(row.arch, row.form, row.dtype) for row in rows] == expected
    assert {arch for arch, _, _ in expected} == set(functional.ARCHS)
    assert len(rows) == len(TORCH_MODULES) * len(FORMS) * len(TOLERANCES) + len(TOLERANCES)  # + sru's cell rows
    for row in rows:
        if row.arch == "sru" and not sru_available():
            assert row.report is None and "pip install 'cells[sru]'" in row.skipped and not row.passed
            continue
        assert not row.skipped and row.report is not None, (row.arch, row.form)
        assert row.passed, (row.arch, row.form, row.dtype, row.report)
        assert row.report.relative_out <= row.tolerances[0] and row.report.relative_grad <= row.tolerances[1]


def test_vmap_rows_all_pass():
    rows = list(vmap_rows())
    assert [row.arch for row in rows] == list(functional.ARCHS)
    for row in rows:
        assert row.members == 4
        assert row.passed, row
        assert row.max_difference <= TOLERANCES[F64][0]


def test_a_failing_report_makes_a_failing_row():
    """ParityRow.passed really depends on the report: a difference above the float64 tolerance fails the row."""
    from parity.suite import ParityRow

    good = compare("gru", cell_params("gru"), randn(T, B, I, seed=1))
    assert ParityRow("gru", "cell", F64, good).passed
    bad = ParityReport(out=good.out_scale * 1e-9, carry=0.0, grads=good.grads, out_scale=good.out_scale, grad_scale=good.grad_scale)
    assert not ParityRow("gru", "cell", F64, bad).passed
    assert not ParityRow("gru", "cell", F64, None, skipped="no counterpart").passed
