"""Whole-sequence recurrences with a hand-derived backward through time (custom autograd Functions).

The step-wise path (`scan` over `recurrence`) records ~10 ops per step for autograd to replay. Here
one `torch.autograd.Function` runs the whole sequence: the forward loop saves the gate activations,
the backward loop does only the elementwise gate derivatives and one `dgates @ W_hh` matmul per step,
and `dW_hh` is a single matmul over all `T * B` rows. The input matmul stays outside (the caller's
hoisted `x W_ih^T + b`), so its gradients come from ordinary autograd.

Each Function uses the `setup_context` API with `generate_vmap_rule = True`, so `torch.func.grad`,
`vmap` and `vmap(grad(...))` compose with it. Inside, the batch `*B` is flattened to one dim `N`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from functional.lstm import LSTMCarry, lstm_recurrence
from functional.params import Params
from functional.scan import scan


# Saved activations are kept in time chunks of about this many elements: each chunk is small enough
# for the allocator to recycle and for the backward's per-chunk arithmetic to stay in cache.
_CHUNK_ELEMENTS = 1 << 19


def _flat(x_projected: torch.Tensor) -> tuple[int, tuple[int, ...], int]:
    """`(T, *B, G*H)` -> `T`, `B`, `N = prod(B)`."""
    batch_shape = tuple(x_projected.shape[1:-1])
    return x_projected.shape[0], batch_shape, math.prod(batch_shape)


def _chunk_bounds(steps: int, step_elements: int) -> list[tuple[int, int]]:
    """`[(start, stop), ...]` covering `range(steps)` in chunks of about `_CHUNK_ELEMENTS` elements."""
    size = max(1, _CHUNK_ELEMENTS // max(1, step_elements))
    return [(start, min(start + size, steps)) for start in range(0, steps, size)]


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """`a + b` where None means zero."""
    if a is None:
        return b
    return a if b is None else a + b


def _hidden_grad(direct: torch.Tensor | None, d_next: torch.Tensor | None, weight_hh: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`dL/dh_t = direct + d_next @ W_hh`, where `d_next` (the next step's gate gradient) or `direct` may be None (zero)."""
    if d_next is None:
        return torch.zeros_like(like) if direct is None else direct
    return torch.mm(d_next, weight_hh) if direct is None else torch.addmm(direct, d_next, weight_hh)


def _previous(first: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """`(N, H)`, `(K, N, H)` -> the state before each step: `[first, states[0], ..., states[K-2]]`."""
    return torch.cat([first.unsqueeze(0), states[:-1]])


def _weight_grad(d_gates: torch.Tensor, h0: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """`dW_hh = sum_t d_gates_t^T h_{t-1}`: `(T, N, G)`, `(N, H)`, `(T, N, H)` -> `(G, H)`, one big matmul."""
    grad = d_gates[0].T @ h0
    if d_gates.shape[0] > 1:
        grad = torch.addmm(grad, d_gates[1:].flatten(0, 1).T, ys[:-1].flatten(0, 1))
    return grad


class _RNNSequence(torch.autograd.Function):
    """`h_t = phi(xp_t + h_{t-1} W_hh^T)` over `xp: (T, N, H)`; phi is tanh or relu."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x_projected: torch.Tensor, h0: torch.Tensor, weight_hh: torch.Tensor, relu: bool) -> tuple[torch.Tensor, torch.Tensor]:
        phi = torch.relu if relu else torch.tanh
        weight_t = weight_hh.T  # (H, H)
        h, hs = h0, []
        for xp in x_projected.unbind(0):
            h = phi(torch.addmm(xp, h, weight_t))
            hs.append(h)
        return torch.stack(hs), h  # ys (T, N, H), h_T (a separate tensor, not a view of ys)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        _, h0, weight_hh, relu = inputs
        ctx.relu = relu
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(h0, weight_hh, output[0])

    @staticmethod
    def backward(ctx: Any, d_ys: torch.Tensor | None, d_last: torch.Tensor | None):
        h0, weight_hh, ys = ctx.saved_tensors
        steps = ys.shape[0]
        d_outputs = d_ys.unbind(0) if d_ys is not None else [None] * steps
        d_pre, d_next = [], None  # dL/da_t (a_t the pre-activation), last step first
        for start, stop in reversed(_chunk_bounds(steps, ys[0].numel())):
            # phi'(a) from the output: relu passes where h > 0 (as threshold_backward), tanh scales by 1 - h^2
            chunk = ys[start:stop]
            slopes = chunk > 0 if ctx.relu else 1 - chunk * chunk
            for t in range(stop - 1, start - 1, -1):
                dh = _hidden_grad(_add(d_outputs[t], d_last) if t == steps - 1 else d_outputs[t], d_next, weight_hh, h0)
                d_next = torch.where(slopes[t - start], dh, 0.0) if ctx.relu else dh * slopes[t - start]
                d_pre.append(d_next)
        d_pre.reverse()
        d_x = torch.stack(d_pre)  # (T, N, H)
        return d_x, d_next @ weight_hh, _weight_grad(d_x, h0, ys), None


class _LSTMSequence(torch.autograd.Function):
    """LSTM over `xp: (T, N, 4H)` (`x W_ih^T + b_ih + b_hh`, torch's gate order i, f, g, o)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x_projected: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, weight_hh: torch.Tensor):
        steps, batch, gates_size = x_projected.shape
        hidden = gates_size // 4
        weight_t = weight_hh.T  # (H, 4H)
        inputs = x_projected.unbind(0)
        h, c, hs = h0, c0, []
        activations, cells, tanh_cells = [], [], []  # per chunk: (K, N, 4H) i, f, g, o after sigmoid/tanh; (K, N, H) c; tanh(c)
        for start, stop in _chunk_bounds(steps, batch * gates_size):
            acts, cs, tanh_cs = [], [], []
            for xp in inputs[start:stop]:
                gates = torch.addmm(xp, h, weight_t)  # (N, 4H)
                act = torch.sigmoid(gates)  # one call for all blocks, then the g block is replaced by tanh
                act[:, 2 * hidden : 3 * hidden] = torch.tanh(gates[:, 2 * hidden : 3 * hidden])
                i, f, g, o = act.chunk(4, dim=1)  # views
                c = torch.addcmul(f * c, i, g)
                tanh_c = torch.tanh(c)
                h = o * tanh_c
                hs.append(h)
                acts.append(act)
                cs.append(c)
                tanh_cs.append(tanh_c)
            activations.append(torch.stack(acts))
            cells.append(torch.stack(cs))
            tanh_cells.append(torch.stack(tanh_cs))
        # ys, h_T, c_T, then what backward needs (outputs, since setup_context may only save inputs and outputs)
        return torch.stack(hs), h, c, *activations, *cells, *tanh_cells

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        _, h0, c0, weight_hh = inputs
        saved = output[3:]
        ctx.mark_non_differentiable(*saved)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(h0, c0, weight_hh, output[0], *saved)

    @staticmethod
    def backward(ctx: Any, d_ys: torch.Tensor | None, d_h_last: torch.Tensor | None, d_c_last: torch.Tensor | None, *_):
        h0, c0, weight_hh, ys, *saved = ctx.saved_tensors
        chunks = len(saved) // 3
        activations, cells, tanh_cells = saved[:chunks], saved[chunks : 2 * chunks], saved[2 * chunks :]
        steps = ys.shape[0]
        d_outputs = d_ys.unbind(0) if d_ys is not None else [None] * steps
        d_gates, d_next, dc_carried = [], None, d_c_last  # d_gates last step first; dc_carried = dc_{t+1} f_{t+1}
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
            for t in range(stop - 1, start - 1, -1):
                k = t - start
                dh = _hidden_grad(_add(d_outputs[t], d_h_last) if t == steps - 1 else d_outputs[t], d_next, weight_hh, h0)
                dc = dh * cell_scale[k] if dc_carried is None else torch.addcmul(dc_carried, dh, cell_scale[k])
                d_next = torch.cat([dc, dc, dc, dh], dim=1) * gate_scale[k]  # (N, 4H)
                d_gates.append(d_next)
                dc_carried = dc * f[k]
            stop = start
        d_gates.reverse()
        d_x = torch.stack(d_gates)  # (T, N, 4H)
        return d_x, d_next @ weight_hh, dc_carried, _weight_grad(d_x, h0, ys)


class _GRUSequence(torch.autograd.Function):
    """GRU over `xp: (T, N, 3H)` (`x W_ih^T + b_ih`, gate order r, z, n); `b_hn` sits inside `r *`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x_projected: torch.Tensor, h0: torch.Tensor, weight_hh: torch.Tensor, bias_hh: torch.Tensor | None):
        steps, batch, gates_size = x_projected.shape
        hidden = gates_size // 3
        weight_t = weight_hh.T  # (H, 3H)
        inputs = x_projected.unbind(0)
        h, hs = h0, []
        resets_updates, news, hidden_news = [], [], []  # per chunk: (K, N, 2H) r, z; (K, N, H) n; h W_hn^T + b_hn
        for start, stop in _chunk_bounds(steps, batch * gates_size):
            rzs, ns, hns = [], [], []
            for xp in inputs[start:stop]:
                hp = torch.mm(h, weight_t) if bias_hh is None else torch.addmm(bias_hh, h, weight_t)  # (N, 3H)
                rz = torch.sigmoid(xp[:, : 2 * hidden] + hp[:, : 2 * hidden])  # (N, 2H)
                r, z = rz.chunk(2, dim=1)
                hn = hp[:, 2 * hidden :]
                n = torch.tanh(torch.addcmul(xp[:, 2 * hidden :], r, hn))
                h = torch.addcmul(n, z, h - n)  # (1 - z) n + z h, as torch's GRU cell computes it
                hs.append(h)
                rzs.append(rz)
                ns.append(n)
                hns.append(hn)
            resets_updates.append(torch.stack(rzs))
            news.append(torch.stack(ns))
            hidden_news.append(torch.stack(hns))
        return torch.stack(hs), h, *resets_updates, *news, *hidden_news

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        _, h0, weight_hh, bias_hh = inputs
        saved = output[2:]
        ctx.has_bias = bias_hh is not None
        ctx.mark_non_differentiable(*saved)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(h0, weight_hh, output[0], *saved)

    @staticmethod
    def backward(ctx: Any, d_ys: torch.Tensor | None, d_h_last: torch.Tensor | None, *_):
        h0, weight_hh, ys, *saved = ctx.saved_tensors
        chunks = len(saved) // 3
        resets_updates, news, hidden_news = saved[:chunks], saved[chunks : 2 * chunks], saved[2 * chunks :]
        steps, batch, hidden = ys.shape
        d_outputs = d_ys.unbind(0) if d_ys is not None else [None] * steps
        dh = _add(d_outputs[-1], d_h_last)
        if dh is None:
            dh = torch.zeros_like(h0)
        d_all = []  # (N, 4, H) per step, last step first: d of the pre-activations r, z, n, and of h W_hn^T + b_hn
        stop = steps
        for index in range(chunks - 1, -1, -1):
            rz, n, hn = resets_updates[index], news[index], hidden_news[index]
            start = stop - rz.shape[0]
            r, z = rz.chunk(2, dim=-1)
            # d(r, z, n pre-activations; hn) = dh_t * scale, for the whole chunk at once
            new_scale = (1 - z) * (1 - n * n)
            h_prev = _previous(ys[start - 1] if start else h0, ys[start:stop])
            scale = torch.stack([new_scale * hn * (r - r * r), (h_prev - n) * (z - z * z), new_scale, new_scale * r], dim=2)  # (K, N, 4, H)
            for t in range(stop - 1, start - 1, -1):
                k = t - start
                d = dh.unsqueeze(1) * scale[k]  # (N, 4, H)
                d_all.append(d)
                d_hidden = torch.cat([d[:, :2], d[:, 3:]], dim=1).reshape(batch, 3 * hidden)  # d(h W_hh^T + b_hh)
                dh_direct = dh * z[k] if t == 0 or d_outputs[t - 1] is None else torch.addcmul(d_outputs[t - 1], dh, z[k])
                dh = torch.addmm(dh_direct, d_hidden, weight_hh)
            stop = start
        d_all.reverse()
        d_all = torch.stack(d_all).reshape(steps, batch, 4 * hidden)  # (T, N, 4H): r, z, n (pre-activations), hn
        d_x = d_all[:, :, : 3 * hidden]  # a strided view
        weight_grad = _weight_grad(d_all, h0, ys)  # rows r, z, n (unused), hn
        weight_grad = torch.cat([weight_grad[: 2 * hidden], weight_grad[3 * hidden :]])
        d_bias = torch.cat([d_all[:, :, : 2 * hidden].sum((0, 1)), d_all[:, :, 3 * hidden :].sum((0, 1))]) if ctx.has_bias else None
        return d_x, dh, weight_grad, d_bias


def rnn_sequence(params: Params, h: torch.Tensor, x_projected: torch.Tensor, *, nonlinearity: str = "tanh") -> tuple[torch.Tensor, torch.Tensor]:
    """An Elman RNN over a whole projected sequence; unchecked.

    Args:
        params: `weight_hh (H, H)` (the input side is already in `x_projected`).
        h: carry `(*B, H)`.
        x_projected: `(T, *B, H)`, `x W_ih^T + b_ih + b_hh` for every step (`gates_projection`).
        nonlinearity: `"tanh"` or `"relu"`.

    Returns:
        `(h_T, ys)` with `ys: (T, *B, H)`; equal to scanning `rnn_recurrence`.
    """
    steps, batch_shape, batch = _flat(x_projected)
    hidden = h.shape[-1]
    ys, last = _RNNSequence.apply(x_projected.reshape(steps, batch, hidden), h.reshape(batch, hidden), params["weight_hh"], nonlinearity == "relu")
    return last.reshape(*batch_shape, hidden), ys.reshape(steps, *batch_shape, hidden)


def lstm_sequence(params: Params, carry: LSTMCarry, x_projected: torch.Tensor) -> tuple[LSTMCarry, torch.Tensor]:
    """An LSTM over a whole projected sequence; unchecked. With `weight_hr` it scans `lstm_recurrence`.

    Args:
        params: `weight_hh (4H, H)` (and optionally `weight_hr (P, H)`).
        carry: `(h, c)`, each `(*B, H)`.
        x_projected: `(T, *B, 4H)`, `x W_ih^T + b_ih + b_hh` for every step (`gates_projection`), gates i, f, g, o.

    Returns:
        `(LSTMCarry(h_T, c_T), ys)` with `ys: (T, *B, H)`; equal to scanning `lstm_recurrence`.
    """
    if "weight_hr" in params:
        return scan(lambda state, xp: lstm_recurrence(params, state, xp), LSTMCarry(*carry), x_projected)
    h, c = carry
    steps, batch_shape, batch = _flat(x_projected)
    hidden = c.shape[-1]
    flat = (x_projected.reshape(steps, batch, 4 * hidden), h.reshape(batch, hidden), c.reshape(batch, hidden), params["weight_hh"])
    ys, h, c = _LSTMSequence.apply(*flat)[:3]
    return LSTMCarry(h.reshape(*batch_shape, hidden), c.reshape(*batch_shape, hidden)), ys.reshape(steps, *batch_shape, hidden)


def gru_sequence(params: Params, h: torch.Tensor, x_projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A GRU over a whole projected sequence; unchecked.

    Args:
        params: `weight_hh (3H, H)` and `bias_hh (3H,)` unless bias-free (`b_hn` sits inside `r *`).
        h: carry `(*B, H)`.
        x_projected: `(T, *B, 3H)`, `x W_ih^T + b_ih` for every step (`input_projection`), gates r, z, n.

    Returns:
        `(h_T, ys)` with `ys: (T, *B, H)`; equal to scanning `gru_recurrence`.
    """
    steps, batch_shape, batch = _flat(x_projected)
    hidden = h.shape[-1]
    flat = (x_projected.reshape(steps, batch, 3 * hidden), h.reshape(batch, hidden), params["weight_hh"], params.get("bias_hh"))
    ys, last = _GRUSequence.apply(*flat)[:2]
    return last.reshape(*batch_shape, hidden), ys.reshape(steps, *batch_shape, hidden)
