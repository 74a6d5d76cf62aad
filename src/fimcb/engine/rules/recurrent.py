"""Recurrent layers (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``) unrolled over time for the capture.

PyTorch runs them as one fused kernel: hooks see only its outputs, and ``vmap`` has no batching rule
for it, so per-sample gradients would need one kernel call per sample. Unrolled, each step is two
``linear`` calls and elementwise gates, and the weights' per-sample gradients come from the ``linear``
op rule: ``∇W_ih = Σ_t δgi_t x_tᵀ`` and ``∇W_hh = Σ_t δgh_t h_{t-1}ᵀ``, one outer-product factor over
the time steps. Every configuration is covered (layers, directions, ``batch_first``, no bias, an
initial state, ``proj_size``, unbatched input) except a ``PackedSequence`` input and dropout between
layers in training mode, which run the fused kernel itself (and its parameters take the fallback).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from fimcb.engine.rules import Unrolled, register_unrolled

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
    def forward(self, module: Any, *args: Any, **kwargs: Any) -> Any:
        rnn: nn.RNNBase = module
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
                y, final = self._direction(rnn, cell, x, tuple(s[k] for s in initial), layer, direction)
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
        rnn: nn.RNNBase, cell: Any, x: Tensor, state: State, layer: int, direction: int
    ) -> tuple[Tensor, State]:
        """One direction of one layer over ``x`` ``[B, T, in]``: outputs ``[B, T, out]``, final state."""
        suffix = f"_l{layer}" + ("_reverse" if direction else "")
        weight = {name: getattr(rnn, f"{name}{suffix}") for name in ("weight_ih", "weight_hh")}
        bias = {
            name: getattr(rnn, f"{name}{suffix}") if rnn.bias else None for name in ("bias_ih", "bias_hh")
        }
        projection = getattr(rnn, f"weight_hr{suffix}") if rnn.proj_size else None
        gi = F.linear(x, weight["weight_ih"], bias["bias_ih"])  # every step's input part at once
        steps = range(x.shape[1] - 1, -1, -1) if direction else range(x.shape[1])
        ys: list[Tensor] = [x] * x.shape[1]
        for t in steps:
            state = cell(gi[:, t], F.linear(state[0], weight["weight_hh"], bias["bias_hh"]), state)
            if projection is not None:
                state = (F.linear(state[0], projection), *state[1:])
            ys[t] = state[0]
        return torch.stack(ys, 1), state
