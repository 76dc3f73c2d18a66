"""Run functional and torch.nn on the same inputs; report max |difference| of outputs, carries and gradients."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.func import grad
from torch.utils._pytree import tree_flatten, tree_map

from functional.layers import run_layers
from functional.params import Params
from functional.registry import get_arch, initial_carry
from functional.scan import scan
from parity.convert import is_layered, to_torch
from parity.sru import is_sru_module


@dataclass
class ParityReport:
    """Max absolute differences (functional - torch) and the torch-side scales they are relative to."""

    out: float
    carry: float
    grads: dict[str, float]  # per parameter key, plus "xs" and "carry"
    out_scale: float  # max |torch output|
    grad_scale: float  # max |torch gradient|
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def grad(self) -> float:
        return max(self.grads.values())

    @property
    def relative_out(self) -> float:
        return max(self.out, self.carry) / max(self.out_scale, torch.finfo(torch.float64).tiny)

    @property
    def relative_grad(self) -> float:
        return self.grad / max(self.grad_scale, torch.finfo(torch.float64).tiny)


def _max_abs(a: Any, b: Any) -> float:
    return max((x - y).abs().max().item() for x, y in zip(tree_flatten(a)[0], tree_flatten(b)[0]))


def _functional_forward(arch: str, params: Params, xs: torch.Tensor, carry: Any, lengths: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
    if is_layered(params):
        return run_layers(arch, params, xs, carry, lengths=lengths)
    cell = get_arch(arch).cell
    final, ys = scan(lambda c, x: cell(params, c, x), carry, xs, lengths=lengths)
    return ys, final


def _torch_forward(module: torch.nn.Module, xs: torch.Tensor, carry: Any, lengths: torch.Tensor | None, layered: bool) -> tuple[torch.Tensor, Any]:
    if is_sru_module(module):  # the sru package's own sequence path (one matmul, then its recurrence)
        if lengths is not None:
            raise ValueError("lengths: SRU parity is checked on full-length sequences")
        if xs.dim() == 2:  # unbatched (T, I): the package reads 2-D input as one step, so add a batch of 1
            h, c = module(xs.unsqueeze(1), carry.unsqueeze(0))
            return h.squeeze(1), c.squeeze(0)
        return module(xs, carry)
    if layered:
        if lengths is None:
            return module(xs, carry)
        packed = torch.nn.utils.rnn.pack_padded_sequence(xs, lengths.cpu(), enforce_sorted=False)
        out, final = module(packed, carry)
        return torch.nn.utils.rnn.pad_packed_sequence(out, total_length=xs.shape[0])[0], final
    if lengths is not None:
        raise ValueError("lengths: torch.nn cells have no packed form; compare lengths with layered params")
    ys = []
    for x in xs.unbind(0):
        carry = module(x, carry)
        ys.append(carry[0] if isinstance(carry, tuple) else carry)
    return torch.stack(ys), carry


def compare(arch: str, params: Params, xs: torch.Tensor, carry: Any = None, *, lengths: torch.Tensor | None = None, seed: int = 0) -> ParityReport:
    """Run `params` functionally and through `to_torch(arch, params)` on `xs: (T, *B, I)`.

    Cell params are scanned over `xs` (torch side: a Python loop over the `nn` cell); layered
    params go through `run_layers` vs `nn.RNN/LSTM/GRU` (packed when `lengths` is given). Gradients
    are of `<outputs, W_y> + <final carry, W_c>` for fixed random `W` (from `seed`), with respect
    to every parameter, the inputs and the initial carry.
    """
    layered = is_layered(params)
    module = to_torch(arch, params)
    if carry is None:
        if layered:
            h0 = module.num_layers * (2 if module.bidirectional else 1)
            batch = tuple(xs.shape[1:-1])
            carry = initial_carry(arch, (h0, *batch), module.hidden_size, dtype=xs.dtype, device=xs.device, proj_size=getattr(module, "proj_size", 0))
        else:
            carry = initial_carry(arch, tuple(xs.shape[1:-1]), module.hidden_size, dtype=xs.dtype, device=xs.device)
    generator = torch.Generator(device=xs.device).manual_seed(seed)
    # torch side: one forward in grad mode on leaf copies of inputs and carry (grad mode also keeps sru off
    # its float32-only no-grad CPU kernel, on its pure-Python reference path), then autograd
    xs_leaf = xs.detach().clone().requires_grad_()
    carry_leaf = tree_map(lambda leaf: leaf.detach().clone().requires_grad_(), carry)
    ys_torch, final_torch = _torch_forward(module, xs_leaf, carry_leaf, lengths, layered)
    y_weight = torch.randn(ys_torch.shape, generator=generator, dtype=xs.dtype, device=xs.device)
    carry_weight = tree_map(lambda leaf: torch.randn(leaf.shape, generator=generator, dtype=xs.dtype, device=xs.device), final_torch)

    def objective(ys: torch.Tensor, final: Any) -> torch.Tensor:
        return (ys * y_weight).sum() + sum((leaf * weight).sum() for leaf, weight in zip(tree_flatten(final)[0], tree_flatten(carry_weight)[0]))

    names = [name for name, _ in module.named_parameters()]
    inputs = [p for _, p in module.named_parameters()] + [xs_leaf] + tree_flatten(carry_leaf)[0]
    torch_grads = torch.autograd.grad(objective(ys_torch, final_torch), inputs, allow_unused=True)
    torch_grads = [torch.zeros_like(i) if g is None else g for i, g in zip(inputs, torch_grads)]

    # functional side: torch.func.grad, no .backward(); the forward's outputs come back as aux
    def loss(p: Params, x: torch.Tensor, c: Any) -> tuple[torch.Tensor, tuple[torch.Tensor, Any]]:
        outputs = _functional_forward(arch, p, x, c, lengths)
        return objective(*outputs), outputs

    (grad_params, grad_xs, grad_carry), (ys_fn, final_fn) = grad(loss, argnums=(0, 1, 2), has_aux=True)(dict(params), xs, carry)

    grads = {name: _max_abs(grad_params[name], g) for name, g in zip(names, torch_grads)}
    grads["xs"] = _max_abs(grad_xs, torch_grads[len(names)])
    grads["carry"] = _max_abs(grad_carry, torch_grads[len(names) + 1 :])
    return ParityReport(
        out=_max_abs(ys_fn, ys_torch),
        carry=_max_abs(final_fn, final_torch),
        grads=grads,
        out_scale=max(leaf.abs().max().item() for leaf in [ys_torch, *tree_flatten(final_torch)[0]]),
        grad_scale=max(g.abs().max().item() for g in torch_grads),
    )
