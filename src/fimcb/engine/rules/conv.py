"""Convolutions. Per-sample weight gradients are an outer-product sum over positions of the output
gradient and the unfolded (padded) input; for transposed convolutions, of the input and the unfolded
output gradient. Three routes give their norms: the ghost norm, materialising by a batched product,
or materialising by one grouped weight-gradient convolution that treats each sample as its own
group; the fastest for a layer's geometry is measured once and remembered. Whatever the route, the
factor offers its outer-product form, which K-FAC reads."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.grad import conv1d_weight, conv2d_weight
from torch.nn.modules.conv import _ConvNd

from fimcb.core.metric import Identity
from fimcb.engine.factors import BiasSum, Blockwise, Dense, Factor, NormRoute, OuterSum
from fimcb.engine.rules import Call, Rule, register_rule


class ConvRoute(enum.Enum):
    """How a convolution's per-sample weight gradients are normed."""

    GHOST = "ghost"  # Gram matrices of rows and columns
    UNFOLD = "unfold"  # materialise Σ_t g_t c_tᵀ by a batched product
    GROUPED = "grouped"  # materialise by one grouped weight-gradient convolution


@dataclass
class ConvFactor(Factor):
    """``G_b = Σ_t g_{b,t} c_{b,t}ᵀ``: ``rows`` ``[B, P, C]`` (one side, per output position) and lazily the
    unfolded ``columns`` ``[B, P, C'·k]`` (the other side) or the grouped-convolution gradients."""

    rows: Tensor
    columns: Callable[[], Tensor]
    grouped: Blockwise
    route: ConvRoute
    input_side: Literal["u", "v"]
    _outer: OuterSum | None = field(default=None, repr=False)

    @property
    def n_groups(self) -> int:
        return self.rows.shape[0]

    @property
    def device(self) -> torch.device:
        return self.rows.device

    def outer(self) -> OuterSum:
        if self._outer is None:
            norm_route = NormRoute.GHOST if self.route is ConvRoute.GHOST else NormRoute.DENSE
            self._outer = OuterSum(self.rows, self.columns(), norm_route, self.input_side)
        return self._outer

    def _form(self) -> Factor:
        return self.grouped if self.route is ConvRoute.GROUPED else self.outer()

    def groups(self, group_size: int) -> Factor:
        return self._form().groups(group_size)

    def dense(self, rows: slice) -> Tensor:
        return self._form().dense(rows)

    def total(self) -> Tensor:
        return self._form().total()

    def ghost_norms(self) -> Tensor | None:
        return self._form().ghost_norms()

    def diagonal_norms(self, weights: Tensor) -> Tensor | None:
        return self._form().diagonal_norms(weights)

    def footprint(self) -> int:
        return self._form().footprint()

    @property
    def concatenates(self) -> bool:  # type: ignore[override]
        return self.route is not ConvRoute.GROUPED


def _options(module: _ConvNd, padded: bool) -> dict[str, tuple[int, ...]]:
    padding = (0,) * len(module.stride) if padded else tuple(int(p) for p in module.padding)
    return {"stride": tuple(module.stride), "padding": padding, "dilation": tuple(module.dilation)}


def _per_sample_weight_grads(
    inputs: Tensor, grads: Tensor, weight_shape: tuple[int, ...], options: dict
) -> Tensor:
    """``[B, *weight_shape]`` per-sample gradients of a groups=1 convolution from ``inputs`` to ``grads``."""
    batch = inputs.shape[0]
    weight_grad = conv2d_weight if inputs.ndim == 4 else conv1d_weight
    stacked = weight_grad(
        inputs.reshape(1, -1, *inputs.shape[2:]),
        (batch * weight_shape[0], *weight_shape[1:]),
        grads.reshape(1, -1, *grads.shape[2:]),
        groups=batch,
        **options,
    )
    return stacked.reshape(batch, *weight_shape)


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
    options = _options(module, padded)

    def grouped(samples: slice) -> Tensor:
        return _per_sample_weight_grads(
            conv_input[samples], side[samples], tuple(module.weight.shape), options
        )

    def make(route: ConvRoute) -> ConvFactor:
        return ConvFactor(
            rows,
            lambda: _unfold(unfolded, module, padded),
            Blockwise(grouped, batch, module.weight.shape, conv_input.numel() + side.numel(), side),
            route,
            input_side,
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


@register_rule(nn.Conv1d, nn.Conv2d)
class ConvRule(Rule):
    reads_outputs = False

    def supports(self, module: _ConvNd) -> bool:
        return module.groups == 1

    def factors(self, call: Call) -> dict[str, Factor]:
        module, grad = call.module, call.grads[0]
        x, padded = _padded_input(module, call.args[0])
        out = {"weight": _weight_factor(module, grad, x, x, "v", padded)}
        if module.bias is not None:
            out["bias"] = _bias(grad)
        return out


@register_rule(nn.ConvTranspose2d)
class ConvTransposeRule(Rule):
    """``y = conv_transpose(a, W)`` is the adjoint of ``conv(·, W)``: its weight gradient is that of a
    convolution from the output gradient to the input."""

    reads_outputs = False

    def supports(self, module: _ConvNd) -> bool:
        return (
            module.groups == 1
            and module.padding_mode == "zeros"
            and all(o < s for o, s in zip(module.output_padding, module.stride, strict=True))
        )

    def factors(self, call: Call) -> dict[str, Factor]:
        module, grad = call.module, call.grads[0]
        out = {"weight": _weight_factor(module, call.args[0], grad, grad, "u", padded=False)}
        if module.bias is not None:
            out["bias"] = _bias(grad)
        return out


__all__ = ["ConvFactor", "ConvRoute"]
