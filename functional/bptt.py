"""Whole-sequence recurrences with a hand-derived backward through time (custom autograd Functions).

The step-wise path (`scan` over `recurrence`) records ~10 ops per step for autograd to replay. Here
one `torch.autograd.Function` runs a whole layer: the input projection `x W_ih^T + b` one time chunk
at a time (one matmul per chunk), the recurrence step by step saving the gate activations; the
backward loop does only the elementwise gate derivatives and one `d_gates @ W_hh` matmul per step,
and per chunk one matmul each for `dW_ih`, `dW_hh` and `dx`. No `(T, *B, G*H)` tensor is ever built.

Each Function uses the `setup_context` API with `generate_vmap_rule = True`, so `torch.func.grad`,
`vmap` and `vmap(grad(...))` compose with it. Inside, the batch `*B` is flattened to one dim `N`.
Without grad mode the wrappers skip the Function and save nothing."""

from __future__ import annotations

import math
from typing import Any

import torch

from functional.lstm import LSTMCarry, lstm_recurrence
from functional.params import Params, gates_projection
from functional.scan import scan

# Work is done in time chunks of about this many elements per tensor: the input projection, the saved
# activations and the gradients of a chunk stay small enough for the allocator to recycle them and for
# the per-chunk arithmetic to stay in cache, and no (T, *B, G*H) tensor is ever materialized.
_CHUNK_ELEMENTS = 1 << 18


def _chunk_bounds(steps: int, step_elements: int) -> list[tuple[int, int]]:
    """`[(start, stop), ...]` covering `range(steps)` in chunks of about `_CHUNK_ELEMENTS` elements."""
    size = max(1, _CHUNK_ELEMENTS // max(1, step_elements))
    return [(start, min(start + size, steps)) for start in range(0, steps, size)]


def _project(xs: torch.Tensor, weight_ih: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`xs W_ih^T + b` for a chunk `(K, N, I)` -> `(K, N, G)`, one matmul."""
    flat = xs.reshape(-1, xs.shape[-1])
    out = torch.mm(flat, weight_ih.T) if bias is None else torch.addmm(bias, flat, weight_ih.T)
    return out.reshape(xs.shape[0], xs.shape[1], weight_ih.shape[0])


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """`a + b` where None means zero."""
    if a is None:
        return b
    return a if b is None else a + b


def _hidden_grad(direct: torch.Tensor | None, d_next: torch.Tensor | None, weight: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`dL/dh_t = direct + d_next @ weight`, where `d_next` (the next step's gate gradient) or `direct` may be None (zero)."""
    if d_next is None:
        return torch.zeros_like(like) if direct is None else direct
    return torch.mm(d_next, weight) if direct is None else torch.addmm(direct, d_next, weight)


def _previous(first: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """`(N, H)`, `(K, N, H)` -> the state before each step: `[first, states[0], ..., states[K-2]]`."""
    return torch.cat([first.unsqueeze(0), states[:-1]])


def _matmul_t(total: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`total + b^T a` (`total` None: zero) for `a: (M, G)`, `b: (M, J)` -> `(J, G)`.

    A weight gradient `a^T b`, kept transposed: this orientation runs ~20-40% faster on CPU BLAS."""
    return b.T @ a if total is None else torch.addmm(total, b.T, a)


class _Grads:
    """Parameter and input gradients, accumulated chunk by chunk (last chunk first) in the backward."""

    def __init__(self, weight_ih: torch.Tensor) -> None:
        self.weight_ih_rows = weight_ih.T.contiguous().T  # same values, the layout `d @ W_ih` runs fastest with
        self.weight_ih_t = self.bias = self.weight_hh_t = self.bias_hh = None  # weight gradients transposed
        self.xs: list[torch.Tensor] = []

    def add(self, d_gates: torch.Tensor, d_inputs: torch.Tensor, xs: torch.Tensor, h_before: torch.Tensor, ys: torch.Tensor, bias_hh: bool = False) -> None:
        """One chunk: `d_gates (K, N, G)` (the hidden side), `d_inputs (K, N, G_in)` (the projected input side; the
        same tensor or its leading columns), its inputs `xs (K, N, I)`, the state before it and its outputs `ys`;
        `bias_hh`: also sum `d_gates` for a separate hidden-side bias."""
        steps, batch, _ = xs.shape
        d_in = d_inputs.reshape(steps * batch, d_inputs.shape[-1])
        self.weight_ih_t = _matmul_t(self.weight_ih_t, d_in, xs.reshape(steps * batch, xs.shape[-1]))
        self.bias = _add(self.bias, d_in.sum(0))
        self.xs.append((d_in @ self.weight_ih_rows).reshape(steps, batch, xs.shape[-1]))
        self.weight_hh_t = _matmul_t(self.weight_hh_t, d_gates[0], h_before)
        if bias_hh:
            self.bias_hh = _add(self.bias_hh, d_gates.sum((0, 1)))
        if steps > 1:
            self.weight_hh_t = _matmul_t(self.weight_hh_t, d_gates[1:].reshape(-1, d_gates.shape[-1]), ys[:-1].reshape(-1, ys.shape[-1]))

    @property
    def weight_ih(self) -> torch.Tensor:
        return self.weight_ih_t.T.contiguous()  # (G, I)

    @property
    def weight_hh(self) -> torch.Tensor:
        return self.weight_hh_t.T.contiguous()  # (G, H)

    def inputs(self) -> torch.Tensor:
        return torch.cat(self.xs[::-1])  # (T, N, I)


def _lstm_forward(xs, h0, c0, weight_ih, bias, weight_hh, save: bool):
    """The LSTM loop; with `save`, also what the backward needs (see `_LSTMSequence`)."""
    steps, batch, _ = xs.shape
    hidden = h0.shape[-1]
    weight_t = weight_hh.T.contiguous()  # (H, 4H)
    h, c, hs = h0, c0, []
    activations, cells, tanh_cells = [], [], []  # per chunk: (K, N, 4H) i, f, g, o after sigmoid/tanh; (K, N, H) c; tanh(c)
    for start, stop in _chunk_bounds(steps, batch * 4 * hidden):
        acts, cs, tanh_cs = [], [], []
        for xp in _project(xs[start:stop], weight_ih, bias).unbind(0):
            act = torch.addmm(xp, h, weight_t)  # (N, 4H) gate pre-activations, activated in place
            act[:, : 2 * hidden].sigmoid_()
            act[:, 2 * hidden : 3 * hidden].tanh_()
            act[:, 3 * hidden :].sigmoid_()
            i, f, g, o = act.chunk(4, dim=1)  # views
            c = torch.addcmul(f * c, i, g)
            tanh_c = torch.tanh(c)
            h = o * tanh_c
            hs.append(h)
            if save:
                acts.append(act)
                cs.append(c)
                tanh_cs.append(tanh_c)
        if save:
            activations.append(torch.stack(acts))
            cells.append(torch.stack(cs))
            tanh_cells.append(torch.stack(tanh_cs))
    # ys, h_T, c_T, then what backward needs (outputs, since setup_context may only save inputs and outputs)
    return torch.stack(hs), h, c, *activations, *cells, *tanh_cells


def _gru_forward(xs, h0, weight_ih, bias_ih, weight_hh, bias_hh, save: bool):
    """The GRU loop; with `save`, also what the backward needs (see `_GRUSequence`)."""
    steps, batch, _ = xs.shape
    hidden = h0.shape[-1]
    weight_t = weight_hh.T.contiguous()  # (H, 3H)
    h, hs = h0, []
    resets_updates, news, hidden_news = [], [], []  # per chunk: (K, N, 2H) r, z; (K, N, H) n; h W_hn^T + b_hn
    for start, stop in _chunk_bounds(steps, batch * 4 * hidden):
        rzs, ns, hns = [], [], []
        for xp in _project(xs[start:stop], weight_ih, bias_ih).unbind(0):
            hp = torch.mm(h, weight_t) if bias_hh is None else torch.addmm(bias_hh, h, weight_t)  # (N, 3H)
            rz = torch.sigmoid(xp[:, : 2 * hidden] + hp[:, : 2 * hidden])  # (N, 2H)
            r, z = rz.chunk(2, dim=1)
            hn = hp[:, 2 * hidden :]
            n = torch.tanh(torch.addcmul(xp[:, 2 * hidden :], r, hn))
            h = torch.addcmul(n, z, h - n)  # (1 - z) n + z h, as torch's GRU cell computes it
            hs.append(h)
            if save:
                rzs.append(rz)
                ns.append(n)
                hns.append(hn)
        if save:
            resets_updates.append(torch.stack(rzs))
            news.append(torch.stack(ns))
            hidden_news.append(torch.stack(hns))
    return torch.stack(hs), h, *resets_updates, *news, *hidden_news


class _RNNSequence(torch.autograd.Function):
    """`h_t = phi(x_t W_ih^T + b + h_{t-1} W_hh^T)` over `xs: (T, N, I)`; phi is tanh or relu."""

    generate_vmap_rule = True

    @staticmethod
    def forward(xs, h0, weight_ih, bias, weight_hh, relu: bool):
        phi = torch.relu if relu else torch.tanh
        weight_t = weight_hh.T.contiguous()  # (H, H), the layout the per-step matmul runs fastest with
        h, hs = h0, []
        for start, stop in _chunk_bounds(xs.shape[0], xs.shape[1] * weight_ih.shape[0]):
            for xp in _project(xs[start:stop], weight_ih, bias).unbind(0):
                h = phi(torch.addmm(xp, h, weight_t))
                hs.append(h)
        return torch.stack(hs), h  # ys (T, N, H), h_T (a separate tensor, not a view of ys)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        xs, h0, weight_ih, bias, weight_hh, relu = inputs
        ctx.relu, ctx.has_bias = relu, bias is not None
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(xs, h0, weight_ih, weight_hh, output[0])

    @staticmethod
    def backward(ctx: Any, d_ys, d_last):
        xs, h0, weight_ih, weight_hh, ys = ctx.saved_tensors
        steps = ys.shape[0]
        weight = weight_hh.T.contiguous().T  # same values, the layout `d @ W_hh` runs fastest with
        d_outputs = d_ys.unbind(0) if d_ys is not None else [None] * steps
        grads, d_next = _Grads(weight_ih), None
        for start, stop in reversed(_chunk_bounds(steps, xs.shape[1] * weight_ih.shape[0])):
            # phi'(a) from the output: relu passes where h > 0 (as threshold_backward), tanh scales by 1 - h^2
            chunk = ys[start:stop]
            slopes = chunk > 0 if ctx.relu else 1 - chunk * chunk
            d_pre = []  # dL/da_t, a_t the pre-activation; last step first
            for t in range(stop - 1, start - 1, -1):
                dh = _hidden_grad(_add(d_outputs[t], d_last) if t == steps - 1 else d_outputs[t], d_next, weight, h0)
                d_next = torch.where(slopes[t - start], dh, 0.0) if ctx.relu else dh * slopes[t - start]
                d_pre.append(d_next)
            d_chunk = torch.stack(d_pre[::-1])  # (K, N, H)
            grads.add(d_chunk, d_chunk, xs[start:stop], ys[start - 1] if start else h0, chunk)
        return grads.inputs(), d_next @ weight_hh, grads.weight_ih, grads.bias if ctx.has_bias else None, grads.weight_hh, None


class _LSTMSequence(torch.autograd.Function):
    """LSTM over `xs: (T, N, I)`, `b = b_ih + b_hh`, torch's gate order i, f, g, o."""

    generate_vmap_rule = True

    @staticmethod
    def forward(xs, h0, c0, weight_ih, bias, weight_hh):
        return _lstm_forward(xs, h0, c0, weight_ih, bias, weight_hh, save=True)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        xs, h0, c0, weight_ih, bias, weight_hh = inputs
        saved = output[3:]
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(*saved)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(xs, h0, c0, weight_ih, weight_hh, output[0], *saved)

    @staticmethod
    def backward(ctx: Any, d_ys, d_h_last, d_c_last, *_):
        xs, h0, c0, weight_ih, weight_hh, ys, *saved = ctx.saved_tensors
        chunks = len(saved) // 3
        activations, cells, tanh_cells = saved[:chunks], saved[chunks : 2 * chunks], saved[2 * chunks :]
        steps = ys.shape[0]
        weight = weight_hh.T.contiguous().T
        d_outputs = d_ys.unbind(0) if d_ys is not None else [None] * steps
        grads, d_next, dc_carried = _Grads(weight_ih), None, d_c_last  # dc_carried = dc_{t+1} f_{t+1}
        stop = steps
        for index in range(chunks - 1, -1, -1):
            act, c, tanh_c = activations[index], cells[index], tanh_cells[index]  # (K, N, *)
            start = stop - act.shape[0]
            # What does not depend on the incoming gradient, for the whole chunk at once:
            # dc_t = dc_{t+1} f_{t+1} + dh_t o (1 - tanh(c)^2);  d(i, f, g, o) = (dc, dc, dc, dh) * gate_scale
            i, f, g, o = act.chunk(4, dim=-1)
            slope_i, slope_f, _, slope_o = (act - act * act).chunk(4, dim=-1)  # sigmoid' = s (1 - s)
            c_prev = _previous(cells[index - 1][-1] if index else c0, c)
            gate_scale = torch.cat([g * slope_i, c_prev * slope_f, i * (1 - g * g), tanh_c * slope_o], dim=-1)  # (K, N, 4H)
            cell_scale = o * (1 - tanh_c * tanh_c)  # (K, N, H)
            d_gates = []  # last step first
            for t in range(stop - 1, start - 1, -1):
                k = t - start
                dh = _hidden_grad(_add(d_outputs[t], d_h_last) if t == steps - 1 else d_outputs[t], d_next, weight, h0)
                dc = dh * cell_scale[k] if dc_carried is None else torch.addcmul(dc_carried, dh, cell_scale[k])
                d_next = torch.cat([dc, dc, dc, dh], dim=1) * gate_scale[k]  # (N, 4H)
                d_gates.append(d_next)
                dc_carried = dc * f[k]
            d_chunk = torch.stack(d_gates[::-1])  # (K, N, 4H)
            grads.add(d_chunk, d_chunk, xs[start:stop], ys[start - 1] if start else h0, ys[start:stop])
            stop = start
        return grads.inputs(), d_next @ weight_hh, dc_carried, grads.weight_ih, grads.bias if ctx.has_bias else None, grads.weight_hh


class _GRUSequence(torch.autograd.Function):
    """GRU over `xs: (T, N, I)`, gate order r, z, n; `b_hn` sits inside `r *`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(xs, h0, weight_ih, bias_ih, weight_hh, bias_hh):
        return _gru_forward(xs, h0, weight_ih, bias_ih, weight_hh, bias_hh, save=True)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        xs, h0, weight_ih, bias_ih, weight_hh, bias_hh = inputs
        saved = output[2:]
        ctx.has_bias = bias_ih is not None, bias_hh is not None
        ctx.mark_non_differentiable(*saved)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(xs, h0, weight_ih, weight_hh, output[0], *saved)

    @staticmethod
    def backward(ctx: Any, d_ys, d_h_last, *_):
        xs, h0, weight_ih, weight_hh, ys, *saved = ctx.saved_tensors
        chunks = len(saved) // 3
        resets_updates, news, hidden_news = saved[:chunks], saved[chunks : 2 * chunks], saved[2 * chunks :]
        steps, batch, hidden = ys.shape
        weight = weight_hh.T.contiguous().T
        d_outputs = d_ys.unbind(0) if d_ys is not None else [None] * steps
        dh = _add(d_outputs[-1], d_h_last)
        if dh is None:
            dh = torch.zeros_like(h0)
        grads, stop = _Grads(weight_ih), steps
        for index in range(chunks - 1, -1, -1):
            rz, n, hn = resets_updates[index], news[index], hidden_news[index]
            start = stop - rz.shape[0]
            r, z = rz.chunk(2, dim=-1)
            # d(r, z, n pre-activations; hn) = dh_t * scale, for the whole chunk at once
            new_scale = (1 - z) * (1 - n * n)
            h_prev = _previous(ys[start - 1] if start else h0, ys[start:stop])
            scale = torch.stack([new_scale * hn * (r - r * r), (h_prev - n) * (z - z * z), new_scale, new_scale * r], dim=2)  # (K, N, 4, H)
            d_all = []  # (N, 4, H) per step, last step first
            for t in range(stop - 1, start - 1, -1):
                k = t - start
                d = dh.unsqueeze(1) * scale[k]  # (N, 4, H)
                d_all.append(d)
                d_hidden = torch.cat([d[:, :2], d[:, 3:]], dim=1).reshape(batch, 3 * hidden)  # d(h W_hh^T + b_hh)
                dh_direct = dh * z[k] if t == 0 or d_outputs[t - 1] is None else torch.addcmul(d_outputs[t - 1], dh, z[k])
                dh = torch.addmm(dh_direct, d_hidden, weight)
            # (K, N, 4H): blocks r, z, n (the projected input's) and hn; the hidden side's are r, z, hn
            d_chunk = torch.stack(d_all[::-1]).reshape(stop - start, batch, 4 * hidden)
            grads.add(d_chunk, d_chunk[..., : 3 * hidden], xs[start:stop], ys[start - 1] if start else h0, ys[start:stop], ctx.has_bias[1])
            stop = start
        # the hidden side's gradients are rows r, z, hn of the 4-block ones
        weight_hh_grad = torch.cat([grads.weight_hh[: 2 * hidden], grads.weight_hh[3 * hidden :]])
        bias_hh_grad = torch.cat([grads.bias_hh[: 2 * hidden], grads.bias_hh[3 * hidden :]]) if ctx.has_bias[1] else None
        return grads.inputs(), dh, grads.weight_ih, grads.bias if ctx.has_bias[0] else None, weight_hh_grad, bias_hh_grad
def _flat(xs: torch.Tensor) -> tuple[tuple[int, ...], torch.Tensor]:
    """`(T, *B, I)` -> `B` and `xs` as `(T, N, I)` with `N = prod(B)`."""
    batch_shape = tuple(xs.shape[1:-1])
    return batch_shape, xs.reshape(xs.shape[0], math.prod(batch_shape), xs.shape[-1])


def _folded_bias(params: Params) -> torch.Tensor | None:
    """`b_ih + b_hh` (RNN and LSTM add both to every gate), or None when bias-free."""
    return params["bias_ih"] + params["bias_hh"] if "bias_ih" in params else None


def rnn_sequence(params: Params, h: torch.Tensor, xs: torch.Tensor, *, nonlinearity: str = "tanh") -> tuple[torch.Tensor, torch.Tensor]:
    """An Elman RNN over a whole sequence, input projection included; unchecked.

    Args:
        params: the cell's params (`weight_ih (H, I)`, `weight_hh (H, H)`, biases unless bias-free).
        h: carry `(*B, H)`.
        xs: `(T, *B, I)`.
        nonlinearity: `"tanh"` or `"relu"`.

    Returns:
        `(h_T, ys)` with `ys: (T, *B, H)`; equal to scanning `rnn_recurrence` over `gates_projection(params, xs)`.
    """
    batch_shape, flat = _flat(xs)
    hidden = h.shape[-1]
    run = _RNNSequence.apply if torch.is_grad_enabled() else _RNNSequence.forward  # no graph to build: skip the Function
    ys, last = run(
        flat, h.reshape(flat.shape[1], hidden), params["weight_ih"], _folded_bias(params), params["weight_hh"], nonlinearity == "relu"
    )
    return last.reshape(*batch_shape, hidden), ys.reshape(xs.shape[0], *batch_shape, hidden)


def lstm_sequence(params: Params, carry: LSTMCarry, xs: torch.Tensor) -> tuple[LSTMCarry, torch.Tensor]:
    """An LSTM over a whole sequence, input projection included; unchecked. With `weight_hr` it scans `lstm_recurrence`.

    Args:
        params: the cell's params (`weight_ih (4H, I)`, `weight_hh (4H, H)`, biases unless bias-free; optionally
            `weight_hr (P, H)`), gates in torch's order i, f, g, o.
        carry: `(h, c)`, each `(*B, H)`.
        xs: `(T, *B, I)`.

    Returns:
        `(LSTMCarry(h_T, c_T), ys)` with `ys: (T, *B, H)`; equal to scanning `lstm_recurrence` over `gates_projection(params, xs)`.
    """
    if "weight_hr" in params:
        return scan(lambda state, xp: lstm_recurrence(params, state, xp), LSTMCarry(*carry), gates_projection(params, xs))
    h, c = carry
    hidden = c.shape[-1]
    batch_shape, flat = _flat(xs)
    batch = flat.shape[1]
    args = (flat, h.reshape(batch, hidden), c.reshape(batch, hidden), params["weight_ih"], _folded_bias(params), params["weight_hh"])
    outputs = _LSTMSequence.apply(*args) if torch.is_grad_enabled() else _lstm_forward(*args, save=False)
    ys, h, c = outputs[:3]
    return LSTMCarry(h.reshape(*batch_shape, hidden), c.reshape(*batch_shape, hidden)), ys.reshape(xs.shape[0], *batch_shape, hidden)


def gru_sequence(params: Params, h: torch.Tensor, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A GRU over a whole sequence, input projection included; unchecked.

    Args:
        params: the cell's params (`weight_ih (3H, I)`, `weight_hh (3H, H)`, `bias_ih`, `bias_hh` unless bias-free),
            gates r, z, n; `b_hn` sits inside `r *` as in torch.
        h: carry `(*B, H)`.
        xs: `(T, *B, I)`.

    Returns:
        `(h_T, ys)` with `ys: (T, *B, H)`; equal to scanning `gru_recurrence` over `input_projection(params, xs)`.
    """
    hidden = h.shape[-1]
    batch_shape, flat = _flat(xs)
    args = (flat, h.reshape(flat.shape[1], hidden), params["weight_ih"], params.get("bias_ih"), params["weight_hh"], params.get("bias_hh"))
    outputs = _GRUSequence.apply(*args) if torch.is_grad_enabled() else _gru_forward(*args, save=False)
    ys, last = outputs[:2]
    return last.reshape(*batch_shape, hidden), ys.reshape(xs.shape[0], *batch_shape, hidden)
