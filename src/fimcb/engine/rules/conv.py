"""Convolutions (1-d, 2-d, 3-d; plain and transposed). Per-sample weight gradients are an outer-product
sum over positions of the output gradient and the unfolded (padded) input; for transposed
convolutions, of the input and the unfolded output gradient. Three routes give their norms: the ghost
norm, materialising by a batched product, or materialising by one grouped weight-gradient convolution
that treats each sample as its own group; the fastest for a layer's geometry is measured once and
remembered, and the factor offers its outer-product form, which K-FAC reads. A grouped (depthwise)
or 3-d convolution takes the grouped route only: each sample's channel groups become groups of the
weight-gradient convolution (no outer-product form: K-FAC treats its weight like a layer without
one)."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.grad import conv1d_weight, conv2d_weight, conv3d_weight
from torch.nn.modules.conv import _ConvNd

from fimcb.core.metric import Identity
from fimcb.engine.factors import (
    MATERIALISE_BUDGET,
    MATERIALISE_FLOOR,
    BiasSum,
    Blockwise,
    Dense,
    Factor,
    NormRoute,
    OuterSum,
)
from fimcb.engine.rules import Call, Rule, register_rule


class ConvRoute(enum.Enum):
    """How a convolution's per-sample weight gradients are normed."""

    GHOST = "ghost"  # Gram matrices of rows and columns
    UNFOLD = "unfold"  # materialise Σ_t g_t c_tᵀ by a batched product
    GROUPED = "grouped"  # materialise by one grouped weight-gradient convolution


@dataclass
class ConvFactor(Factor):
    """``G_b = Σ_t g_{b,t} c_{b,t}ᵀ``: ``rows`` ``[B, P, C]`` (one side, per output position) and lazily the
    unfolded ``columns`` ``[n, P, width]`` of a slice of the samples (the other side) or the
    grouped-convolution gradients. Norms unfold a slice of the samples at a time, no more than the layer
    holds (``held`` floats: its input and output gradient; unfolding a 3x3 convolution's input is nine
    times larger), so that norming a layer stays within about its activations' memory."""

    rows: Tensor
    columns: Callable[[slice], Tensor]
    grouped: Blockwise
    route: ConvRoute
    input_side: Literal["u", "v"]
    width: int  # of the unfolded columns: the weight's elements per row channel
    held: int = MATERIALISE_BUDGET
    _outer: OuterSum | None = field(default=None, repr=False)

    @property
    def n_groups(self) -> int:
        return self.rows.shape[0]

    @property
    def device(self) -> torch.device:
        return self.rows.device

    @property
    def _norm_route(self) -> NormRoute:
        return NormRoute.GHOST if self.route is ConvRoute.GHOST else NormRoute.DENSE

    def outer(self) -> OuterSum:
        if self._outer is None:
            self._outer = OuterSum(self.rows, self.columns(slice(None)), self._norm_route, self.input_side)
        return self._outer

    def _part(self, samples: slice) -> OuterSum:
        """The outer form of a slice of the samples, unfolding only theirs."""
        if self._outer is not None:
            return OuterSum(self._outer.u[samples], self._outer.v[samples], self._norm_route, self.input_side)
        return OuterSum(self.rows[samples], self.columns(samples), self._norm_route, self.input_side)

    def _by_parts(self, norms: Callable[[OuterSum], Tensor | None]) -> Tensor | None:
        """``norms`` of every slice of samples whose unfolded columns fit in what the layer holds."""
        positions = self.rows.shape[1]
        per_sample = positions * (self.rows.shape[2] + self.width)  # its rows and unfolded columns
        if self.route is ConvRoute.GHOST:
            per_sample += 2 * positions * positions  # and their two Gram matrices
        step = max(1, max(self.held, UNFOLD_FLOOR) // max(1, per_sample))
        parts = []
        for start in range(0, self.n_groups, step):
            part = norms(self._part(slice(start, start + step)))
            if part is None:
                return None
            parts.append(part)
        return torch.cat(parts) if parts else self.rows.new_zeros(0)

    def _form(self) -> Factor:
        return self.grouped if self.route is ConvRoute.GROUPED else self.outer()

    def groups(self, group_size: int) -> Factor:
        return self._form().groups(group_size)

    def dense(self, rows: slice) -> Tensor:
        if self.route is ConvRoute.GROUPED:
            return self.grouped.dense(rows)
        return self._part(rows).dense(slice(None))

    def total(self) -> Tensor:
        return self._form().total()

    def ghost_norms(self) -> Tensor | None:
        if self.route is ConvRoute.GROUPED:
            return self.grouped.ghost_norms()
        return self._by_parts(OuterSum.ghost_norms)

    def diagonal_norms(self, weights: Tensor) -> Tensor | None:
        if self.route is ConvRoute.GROUPED:
            return self.grouped.diagonal_norms(weights)
        return self._by_parts(lambda part: part.diagonal_norms(weights))

    def footprint(self) -> int:
        return self.grouped.footprint() if self.route is ConvRoute.GROUPED else self.held

    def step(self, per_group: int) -> int:
        """Samples to materialise at once: their gradients and their unfolded columns count."""
        if self.route is ConvRoute.GROUPED:
            return self.grouped.step(per_group)
        return super().step(per_group + self.rows.shape[1] * self.width)

    @property
    def concatenates(self) -> bool:  # type: ignore[override]
        return self.route is not ConvRoute.GROUPED


def _options(module: _ConvNd, padded: bool) -> dict[str, tuple[int, ...]]:
    padding = (0,) * len(module.stride) if padded else tuple(int(p) for p in module.padding)
    return {"stride": tuple(module.stride), "padding": padding, "dilation": tuple(module.dilation)}


_WEIGHT_GRADS = {3: conv1d_weight, 4: conv2d_weight, 5: conv3d_weight}


def _per_sample_weight_grads(
    inputs: Tensor, grads: Tensor, weight_shape: tuple[int, ...], options: dict, groups: int
) -> Tensor:
    """``[B, *weight_shape]`` per-sample gradients of a convolution with ``groups`` channel groups from
    ``inputs`` to ``grads``: one weight-gradient convolution whose groups are every sample's groups."""
    batch = inputs.shape[0]
    stacked = _WEIGHT_GRADS[inputs.ndim](
        inputs.reshape(1, -1, *inputs.shape[2:]),
        (batch * weight_shape[0], *weight_shape[1:]),
        grads.reshape(1, -1, *grads.shape[2:]),
        groups=batch * groups,
        **options,
    )
    return stacked.reshape(batch, *weight_shape)


#: Floats a convolution's norms may unfold at once whatever the layer holds: below this, unfolding in
#: slices costs more calls than it saves memory (Glow on 8x8 digits: 0.1 slower in slices of 50).
UNFOLD_FLOOR = 4 * MATERIALISE_FLOOR

# Fastest route per layer geometry and batch size: measured once, since no operation count predicts
# library kernels (a grouped convolution is fast at stride 1 and slow at stride 2 on CPU, for instance).
_ROUTES: dict[tuple[Any, ...], ConvRoute] = {}
# Skip timing the ghost norm where its operation count exceeds materialising's by this factor.
GHOST_MAX_RATIO = 8


def _fastest(
    key: tuple[Any, ...], shape: torch.Size, make: Callable[[ConvRoute], ConvFactor], ghost: bool
) -> ConvFactor:
    """The factor by the route whose Euclidean norms were fastest for ``key`` (timed once); the ghost
    route is a candidate only where ``ghost``."""
    if key not in _ROUTES:
        routes = [route for route in ConvRoute if ghost or route is not ConvRoute.GHOST]
        seconds = {}
        for route in routes:
            for _ in range(2):  # the first call may pay for kernel selection
                start = time.perf_counter()
                make(route).squared_norms("", Identity(), shape)
                seconds[route] = time.perf_counter() - start
        _ROUTES[key] = min(seconds, key=seconds.__getitem__)
    return make(_ROUTES[key])


def _unfold(x: Tensor, module: _ConvNd, padded: bool) -> Tensor:
    """``[B, positions, C * kernel]`` columns of a 1-d or 2-d tensor, with the module's geometry."""
    options = {"kernel_size": tuple(module.kernel_size), **_options(module, padded)}
    if all(v == 1 for v in options["kernel_size"] + options["stride"]) and not any(options["padding"]):
        return x.flatten(2).transpose(1, 2)  # 1x1 convolution: the columns are the pixels, no copy
    if x.ndim == 3:  # 1-d: unit height
        x = x.unsqueeze(2)
        options = {k: (1 if k != "padding" else 0, *v) for k, v in options.items()}
    return F.unfold(x, **options).transpose(1, 2)


def _weight_factor(
    module: _ConvNd,
    side: Tensor,
    unfolded: Tensor,
    conv_input: Tensor,
    input_side: Literal["u", "v"],
    padded: bool,
) -> Factor:
    """Weight factor ``Σ_t g_t c_tᵀ``: ``g`` the channels of ``side`` at each position, ``c`` the columns of
    ``unfolded``; ``conv_input`` and ``side`` are the input and output gradient of the equivalent forward
    convolution (for a transposed one, its output gradient and its input)."""
    batch, channels = side.shape[:2]
    if side.numel() == 0 or unfolded.numel() == 0:  # an empty feature map: the weight gets no gradient
        return Dense(side.new_zeros(batch, *module.weight.shape))
    options = _options(module, padded)

    def grouped(samples: slice) -> Tensor:
        return _per_sample_weight_grads(
            conv_input[samples], side[samples], tuple(module.weight.shape), options, module.groups
        )

    held = conv_input.numel() + side.numel()
    blockwise = Blockwise(grouped, batch, module.weight.shape, held, side)
    if module.groups > 1 or side.ndim == 5:  # no unfolding: channel groups, or a 3-d one
        return blockwise
    rows = side.reshape(batch, channels, -1).transpose(1, 2)  # [B, positions, channels]
    positions, d_u = rows.shape[1], rows.shape[2]
    d_v = module.weight.numel() // d_u
    # The ghost norm costs ~T²(d_u + d_v) per sample against ~T·d_u·d_v for materialising: at many
    # positions T it cannot win, and even timing it once is slow (seconds at 32x32 and up).
    ghost = positions * (d_u + d_v) <= GHOST_MAX_RATIO * d_u * d_v
    key = (
        type(module),
        tuple(module.weight.shape),
        tuple(rows.shape),
        module.stride,
        str(module.padding),
        padded,
    )

    def make(route: ConvRoute) -> ConvFactor:
        return ConvFactor(
            rows,
            lambda samples: _unfold(unfolded[samples], module, padded),
            blockwise,
            route,
            input_side,
            d_v,
            held,
        )

    return _fastest(key, module.weight.shape, make, ghost)


def _padded_input(module: _ConvNd, x: Tensor) -> tuple[Tensor, bool]:
    """The input as the convolution sees it: padded explicitly unless the padding is plain zeros that
    unfolding and the weight-gradient convolution can add themselves (then ``False``)."""
    if module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return x, False
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, module._reversed_padding_repeated_twice, mode=mode), True


def _bias(grad: Tensor) -> Factor:
    return BiasSum(grad.flatten(2).transpose(1, 2))  # [B, positions, channels]


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvRule(Rule):
    reads_outputs = False

    def factors(self, call: Call) -> dict[str, Factor]:
        module, grad = call.module, call.grads[0]
        x, padded = _padded_input(module, call.args[0])
        out = {"weight": _weight_factor(module, grad, x, x, "v", padded)}
        if module.bias is not None:
            out["bias"] = _bias(grad)
        return out


@register_rule(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
class ConvTransposeRule(Rule):
    """``y = conv_transpose(a, W)`` is the adjoint of ``conv(·, W)`` (group by group): its weight gradient
    is that of a convolution from the output gradient to the input."""

    reads_outputs = False

    def supports(self, module: _ConvNd) -> bool:
        return module.padding_mode == "zeros" and all(
            o < s for o, s in zip(module.output_padding, module.stride, strict=True)
        )

    def factors(self, call: Call) -> dict[str, Factor]:
        module, grad = call.module, call.grads[0]
        out = {"weight": _weight_factor(module, call.args[0], grad, grad, "u", padded=False)}
        if module.bias is not None:
            out["bias"] = _bias(grad)
        return out


__all__ = ["ConvFactor", "ConvRoute"]
