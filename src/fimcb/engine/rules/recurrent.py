"""Recurrent layers (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``) unrolled over time for the capture.

PyTorch runs them as one fused kernel: hooks see only its outputs, and ``vmap`` has no batching rule
for it, so per-sample gradients would need one kernel call per sample. Unrolled, each layer and
direction is one ``linear`` for every step's input part, one per step for the recurrence (and the
projection) and elementwise gates. The linear maps go through :class:`~fimcb.engine.rules.Parts`,
which gathers each over the time steps: ``∇W_ih = Σ_t δgi_t x_tᵀ`` and ``∇W_hh = Σ_t δgh_t h_{t-1}ᵀ``
are one outer-product factor each, from the gradients autograd delivers at the maps' outputs, with no
batch tracker. Every configuration is covered (layers, directions, ``batch_first``, no bias, an
initial state, ``proj_size``, unbatched input, whose maps the tracker serves) except a
``PackedSequence`` input and dropout between layers in training mode, which run the fused kernel
itself (and its parameters take the fallback).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import _VF, Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from fimcb.engine.rules import Parts, Unrolled, register_unrolled

State = tuple[Tensor, ...]  # (h,) or, for an LSTM, (h, c)


def _lstm(gi: Tensor, gh: Tensor, state: State) -> State:
    i, f, g, o = (gi + gh).chunk(4, -1)
    c = torch.sigmoid(f) * state[1] + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _gru(gi: Tensor, gh: Tensor, state: State) -> State:
    ir, iz, i_n = gi.chunk(3, -1)
    hr, hz, h_n = gh.chunk(3, -1)
    r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
    n = torch.tanh(i_n + r * h_n)
    return ((1 - z) * n + z * state[0],)


def _rnn_tanh(gi: Tensor, gh: Tensor, state: State) -> State:
    return (torch.tanh(gi + gh),)


def _rnn_relu(gi: Tensor, gh: Tensor, state: State) -> State:
    return (torch.relu(gi + gh),)


CELLS = {"LSTM": _lstm, "GRU": _gru, "RNN_TANH": _rnn_tanh, "RNN_RELU": _rnn_relu}


@register_unrolled(nn.RNN, nn.LSTM, nn.GRU)
class UnrolledRNN(Unrolled):
    def forward(self, parts: Parts, *args: Any, **kwargs: Any) -> Any:
        rnn: nn.RNNBase = parts.module  # type: ignore[assignment]
        input = args[0] if args else kwargs["input"]
        hx = args[1] if len(args) > 1 else kwargs.get("hx")
        if isinstance(input, PackedSequence) or (rnn.training and rnn.dropout > 0 and rnn.num_layers > 1):
            return type(rnn).forward(rnn, *args, **kwargs)
        lstm = rnn.mode == "LSTM"
        unbatched = input.dim() == 2
        x = input.unsqueeze(0) if unbatched else (input if rnn.batch_first else input.transpose(0, 1))
        directions = 2 if rnn.bidirectional else 1
        out_size = rnn.proj_size or rnn.hidden_size
        batch = x.shape[0]
        if hx is None:
            h0 = x.new_zeros(rnn.num_layers * directions, batch, out_size)
            initial: tuple[Tensor, ...] = (h0, x.new_zeros(*h0.shape[:2], rnn.hidden_size)) if lstm else (h0,)
        else:
            initial = tuple(hx) if lstm else (hx,)
            initial = tuple(s.unsqueeze(1) if unbatched else s for s in initial)
        cell = CELLS[rnn.mode]
        finals: list[State] = []
        for layer in range(rnn.num_layers):
            outputs = []
            for direction in range(directions):
                k = layer * directions + direction
                y, final = self._direction(parts, cell, x, tuple(s[k] for s in initial), layer, direction)
                outputs.append(y)
                finals.append(final)
            x = torch.cat(outputs, -1) if directions > 1 else outputs[0]
        output = x.squeeze(0) if unbatched else (x if rnn.batch_first else x.transpose(0, 1))
        stacked = [torch.stack([f[i] for f in finals]) for i in range(len(finals[0]))]
        if unbatched:
            stacked = [s.squeeze(1) for s in stacked]
        return output, (tuple(stacked) if lstm else stacked[0])

    @staticmethod
    def _direction(
        parts: Parts, cell: Any, x: Tensor, state: State, layer: int, direction: int
    ) -> tuple[Tensor, State]:
        """One direction of one layer over ``x`` ``[B, T, in]``: outputs ``[B, T, out]``, final state."""
        rnn: nn.RNNBase = parts.module  # type: ignore[assignment]
        suffix = f"_l{layer}" + ("_reverse" if direction else "")
        bias = {name: f"{name}{suffix}" if rnn.bias else None for name in ("bias_ih", "bias_hh")}
        gi = parts.linear(x, f"weight_ih{suffix}", bias["bias_ih"])  # every step's input part at once
        if (
            rnn.mode != "GRU"
            and not rnn.proj_size
            and gi.requires_grad  # the gates' gradient is found at gi (a frozen input map: unrolled)
            and parts.gathers(x)
            and _fused_pays(gi)
        ):
            return UnrolledRNN._fused(parts, gi, state, suffix, direction)
        steps = range(x.shape[1] - 1, -1, -1) if direction else range(x.shape[1])
        ys: list[Tensor] = [x] * x.shape[1]
        for t in steps:
            state = cell(gi[:, t], parts.linear(state[0], f"weight_hh{suffix}", bias["bias_hh"]), state)
            if rnn.proj_size:
                state = (parts.linear(state[0], f"weight_hr{suffix}"), *state[1:])
            ys[t] = state[0]
        return torch.stack(ys, 1), state

    @staticmethod
    def _fused(parts: Parts, gi: Tensor, state: State, suffix: str, direction: int) -> tuple[Tensor, State]:
        """An LSTM's or plain RNN's recurrence by PyTorch's kernel, fed the input part ``gi`` through an
        identity input weight: the gates' gradient is ``gi``'s, which is also the hidden part's, whose
        inputs are the outputs one step back (the initial state first)."""
        rnn: nn.RNNBase = parts.module  # type: ignore[assignment]
        weight, bias = f"weight_hh{suffix}", f"bias_hh{suffix}" if rnn.bias else None
        eye = torch.eye(gi.shape[-1], dtype=gi.dtype, device=gi.device)
        weights = [eye, getattr(rnn, weight)]
        if bias is not None:
            weights += [gi.new_zeros(gi.shape[-1]), getattr(rnn, bias)]
        hx: Any = [s.unsqueeze(0) for s in state]
        hx = hx if rnn.mode == "LSTM" else hx[0]
        kernel: Callable[..., Any] = getattr(_VF, rnn.mode.lower())  # lstm, rnn_tanh or rnn_relu
        # biases, layers, dropout, train (cuDNN differentiates only in training mode; no dropout here),
        # bidirectional, batch_first
        options = (bias is not None, 1, 0.0, True, False, True)
        ordered = gi.flip(1) if direction else gi
        with warnings.catch_warnings():  # cuDNN warns that these weights are not one flat buffer: by design
            warnings.filterwarnings("ignore", message="RNN module weights are not part of single contiguous")
            out, *final = parts.fused(lambda: kernel(ordered, hx, weights, *options), (weight, bias))
        out = out.flip(1) if direction else out
        first = state[0].unsqueeze(1)
        previous = torch.cat([out[:, 1:], first] if direction else [first, out[:, :-1]], 1)
        parts.linear_into(previous, gi, weight, bias)
        return out, tuple(f[0] for f in final)


#: The largest ``B·G²`` (``G`` gates: four times the hidden size for an LSTM) at which a layer runs as
#: PyTorch's kernel fed its input part through an identity weight (:meth:`UnrolledRNN._fused`): the
#: identity's product costs ``B·T·G²`` more, against the Python and autograd work of every step of the
#: unrolled recurrence. Measured in ``benchmarks/recurrent.py`` (one CPU thread, batch 64): the kernel wins
#: up to hidden size 64 (``B·G²`` = 4.2 M), the unrolled recurrence from 128 (16.8 M).
FUSED_MAX_WORK = 1 << 23


def _fused_pays(gi: Tensor) -> bool:
    return gi.shape[0] * gi.shape[-1] ** 2 <= FUSED_MAX_WORK
