"""Stacked and bidirectional runs over whole sequences, as `torch.nn.RNN` / `LSTM` / `GRU`."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any, NamedTuple

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from functional.params import Params, check_cell_params
from functional.registry import ARCHS, get_arch
from functional.scan import scan
from functional.validate import check_dtype, check_input, check_shape


class LayerStructure(NamedTuple):
    """What a layered params dict (torch's `weight_ih_l0`, `..._reverse` keys) describes."""

    num_layers: int
    bidirectional: bool
    bias: bool
    input_size: int
    hidden_size: int
    proj_size: int  # 0 unless an LSTM with `weight_hr_l*`
    dtype: torch.dtype

    @property
    def output_size(self) -> int:
        return self.proj_size or self.hidden_size

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1


def layer_suffix(layer: int, reverse: bool) -> str:
    """Torch's key suffix: `_l0`, `_l1_reverse`, ..."""
    return f"_l{layer}" + ("_reverse" if reverse else "")


def layer_params(params: Params, layer: int, reverse: bool = False) -> dict[str, torch.Tensor]:
    """One direction of one layer as cell params (`weight_ih_l1_reverse` -> `weight_ih`)."""
    suffix = layer_suffix(layer, reverse)
    return {key[: -len(suffix)]: value for key, value in params.items() if key.endswith(suffix) and key[: -len(suffix)] in _CELL_KEYS}


_CELL_KEYS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")


def _check_layered(arch: str) -> None:
    if not get_arch(arch).layered:
        raise ValueError(f"arch: {arch!r} has no layered (nn.RNN-style) form; expected one of {sorted(a for a, spec in ARCHS.items() if spec.layered)}")


def layer_structure(arch: str, params: Params) -> LayerStructure:
    """Infer and check the structure of layered params; ValueError names any bad key or shape."""
    _check_layered(arch)
    gates = get_arch(arch).gates
    if not isinstance(params, Mapping) or "weight_ih_l0" not in params:
        got = sorted(params)[:6] if isinstance(params, Mapping) else type(params).__name__
        raise ValueError(f"params: expected layered keys like 'weight_ih_l0' (torch.nn.{arch.upper()} style), got {got}")
    num_layers = 0
    while f"weight_ih_l{num_layers}" in params:
        num_layers += 1
    bidirectional = "weight_ih_l0_reverse" in params
    bias = "bias_ih_l0" in params
    projection = "weight_hr_l0" in params and get_arch(arch).supports_projection
    expected = {
        key + layer_suffix(layer, reverse)
        for layer in range(num_layers)
        for reverse in ((False, True) if bidirectional else (False,))
        for key in _CELL_KEYS
        if (key.startswith("bias") and bias) or (key == "weight_hr" and projection) or key in ("weight_ih", "weight_hh")
    }
    missing, extra = sorted(expected - params.keys()), sorted(params.keys() - expected)
    if missing:
        raise ValueError(f"params: missing key {missing[0]!r} for {num_layers} layer(s){', bidirectional' if bidirectional else ''}")
    if extra:
        raise ValueError(f"params: unexpected key {extra[0]!r} for {num_layers} layer(s){', bidirectional' if bidirectional else ''}")
    first = check_cell_params(layer_params(params, 0), gates, allow_projection=get_arch(arch).supports_projection, suffix="_l0")
    directions = 2 if bidirectional else 1
    for layer in range(num_layers):
        for reverse in (False, True)[:directions]:
            suffix = layer_suffix(layer, reverse)
            sizes = check_cell_params(layer_params(params, layer, reverse), gates, allow_projection=get_arch(arch).supports_projection, suffix=suffix)
            expected_input = first.input_size if layer == 0 else directions * first.output_size
            if (sizes.input_size, sizes.hidden_size, sizes.output_size) != (expected_input, first.hidden_size, first.output_size):
                raise ValueError(
                    f"params['weight_ih{suffix}']: expected shape ({gates * first.hidden_size}, {expected_input}) "
                    f"(input of layer {layer} is {'input_size' if layer == 0 else 'directions * output_size'}), "
                    f"got ({gates * sizes.hidden_size}, {sizes.input_size})"
                )
            check_dtype(f"params['weight_ih{suffix}']", params[f"weight_ih{suffix}"], first.dtype)
    return LayerStructure(num_layers, bidirectional, bias, first.input_size, first.hidden_size, first.output_size if projection else 0, first.dtype)


def init_layers(
    arch: str,
    input_size: int,
    hidden_size: int,
    *,
    num_layers: int = 1,
    bidirectional: bool = False,
    bias: bool = True,
    proj_size: int = 0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: Any = None,
) -> dict[str, torch.Tensor]:
    """Layered params with `torch.nn.RNN/LSTM/GRU` keys, drawn in torch's order (bitwise equal under a seed)."""
    spec = get_arch(arch)
    _check_layered(arch)
    if num_layers < 1:
        raise ValueError(f"num_layers: expected a positive int, got {num_layers!r}")
    if proj_size and not spec.supports_projection:
        raise ValueError(f"proj_size: only 'lstm' supports a projection, got proj_size={proj_size} for arch {arch!r}")
    if proj_size < 0 or (proj_size and proj_size >= hidden_size):
        raise ValueError(f"proj_size: expected 0 <= proj_size < hidden_size={hidden_size}, got {proj_size}")
    directions = 2 if bidirectional else 1
    params: dict[str, torch.Tensor] = {}
    for layer in range(num_layers):
        layer_input = input_size if layer == 0 else directions * (proj_size or hidden_size)
        for reverse in (False, True)[:directions]:
            extra = {"proj_size": proj_size} if proj_size else {}
            cell = spec.init(layer_input, hidden_size, generator=generator, dtype=dtype, device=device, bias=bias, **extra)
            params.update({key + layer_suffix(layer, reverse): value for key, value in cell.items()})
    return params


def _dropout(x: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Inverted dropout: zero each element with probability `p`, scale the rest by `1/(1-p)`."""
    if p == 1.0:
        return torch.zeros_like(x)
    keep = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device) >= p
    return torch.where(keep, x / (1 - p), 0.0)


def run_layers(
    arch: str,
    params: Params,
    xs: torch.Tensor,
    carry: Any = None,
    *,
    lengths: torch.Tensor | None = None,
    batch_first: bool = False,
    dropout: float = 0.0,
    training: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, Any]:
    """Run stacked (and optionally bidirectional) cells over a sequence, as `torch.nn.LSTM(...)(xs, carry)`.

    Args:
        arch: a registry name (`rnn_tanh`, `rnn_relu`, `lstm`, `gru`).
        params: torch's layered keys (`weight_ih_l0`, `weight_hh_l0`, ..., `..._reverse`), e.g. from
            `init_layers`; the number of layers, direction, bias and projection are read from them.
        xs: `(T, *B, I)`; `(B, T, I)` when `batch_first` (an unbatched `(T, I)` ignores it, as torch).
        carry: `h0: (L*D, *B, H_out)`, or `(h0, c0)` for an LSTM with `c0: (L*D, *B, H)`; zeros if None.
        lengths: `(*B,)` valid lengths: padded steps keep the carry and emit zeros (PackedSequence).
        dropout: probability of zeroing each output of every layer but the last (when `training`).
        generator: the random generator for dropout.

    Returns:
        `(outputs, carry)`: `outputs: (T, *B, D*H_out)` (batch-first if asked), and the final carry
        stacked over layers and directions like `h0`.
    """
    spec = get_arch(arch)
    structure = layer_structure(arch, params)
    if not 0.0 <= dropout <= 1.0:
        raise ValueError(f"dropout: expected a probability in [0, 1], got {dropout}")
    if not isinstance(xs, torch.Tensor) or xs.dim() < 2:
        raise ValueError(f"xs: expected shape (T, *B, {structure.input_size}), got {tuple(xs.shape) if isinstance(xs, torch.Tensor) else type(xs).__name__}")
    moved = batch_first and xs.dim() > 2
    if moved:
        xs = xs.movedim(1, 0)
    batch_shape = check_input("xs", xs, structure.input_size, structure.dtype)[1:]
    if xs.shape[0] == 0:  # as scan words it (the sequence fast path below does not scan)
        raise ValueError("xs: expected at least one time step (T >= 1), got T = 0")
    stacked = structure.num_layers * structure.directions
    if carry is None:
        carry = spec.initial_carry((stacked, *batch_shape), structure.hidden_size, dtype=xs.dtype, device=xs.device, proj_size=structure.proj_size)
    else:
        expected = spec.initial_carry((stacked, *batch_shape), structure.hidden_size, device="meta", proj_size=structure.proj_size)
        leaves, expected_leaves = tree_flatten(carry)[0], tree_flatten(expected)[0]
        if len(leaves) != len(expected_leaves) or (isinstance(expected, tuple) and not isinstance(carry, tuple)):
            raise ValueError(f"carry: expected {'a pair (h0, c0)' if len(expected_leaves) == 2 else 'a tensor h0'}, got {type(carry).__name__}")
        for name, leaf, want in zip(("carry.h0", "carry.c0") if len(leaves) == 2 else ("h0",), leaves, expected_leaves):
            check_shape(name, leaf, tuple(want.shape), "num_layers * directions, batch shape of xs, size")
            check_dtype(name, leaf, structure.dtype)
    carry_leaves, carry_spec = tree_flatten(carry)
    carries = [tree_unflatten(list(parts), carry_spec) for parts in zip(*(leaf.unbind(0) for leaf in carry_leaves))]

    layer_input, finals = xs, []
    for layer in range(structure.num_layers):
        outputs = []
        for reverse in (False, True)[: structure.directions]:
            cell_params = layer_params(params, layer, reverse)
            if spec.sequence is not None and lengths is None:  # whole sequence, hand-derived backward (bptt.py)
                final, ys = spec.sequence(cell_params, carries[len(finals)], layer_input.flip(0) if reverse else layer_input)
                ys = ys.flip(0) if reverse else ys
            else:
                projected = spec.project(cell_params, layer_input)  # all T steps in one matmul: (T, *B, G*H)
                final, ys = scan(partial(spec.recurrence, cell_params), carries[len(finals)], projected, reverse=reverse, lengths=lengths)
            finals.append(final)
            outputs.append(ys)
        layer_input = torch.cat(outputs, dim=-1) if len(outputs) > 1 else outputs[0]  # (T, *B, D*H_out)
        if dropout and training and layer < structure.num_layers - 1:
            layer_input = _dropout(layer_input, dropout, generator)
    final_carry = tree_map(lambda *leaves: torch.stack(leaves), *finals)
    return (layer_input.movedim(0, 1) if moved else layer_input), final_carry
