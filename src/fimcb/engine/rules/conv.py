"""Convolutions. Per-sample weight gradients are an outer-product sum over positions of the
output gradient and the unfolded input (for transposed convolutions: of the input and the
unfolded output gradient). Three routes give their norms: the ghost norm, materialising by a
batched product, or materialising by one grouped weight-gradient convolution that treats each
sample as its own group; the fastest for a layer's geometry is measured once and remembered."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.grad import conv1d_weight, conv2d_weight

from fimcb.core.metric import Identity
from fimcb.engine.factors import Dense, Factor, OuterSum
from fimcb.engine.rules import Rule, register_rule


def _options(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(getattr(module, k)) for k in ("stride", "padding", "dilation")}


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


# Fastest way to get a convolution's per-sample weight norms, per layer geometry and batch size:
# measured once, since no operation count predicts library kernels (a grouped convolution is
# fast at stride 1 and slow at stride 2 on CPU, for instance).
_ROUTES: dict[tuple[Any, ...], str] = {}
# Skip timing the ghost norm where its operation count exceeds materialising's by this factor.
GHOST_MAX_RATIO = 8


def _fastest(key: tuple[Any, ...], shape: torch.Size, candidates: dict[str, Callable[[], Factor]]) -> Factor:
    """The factor from the candidate whose Euclidean norms were fastest for ``key`` (timed once)."""
    if key not in _ROUTES:
        seconds = {}
        for name, make in candidates.items():
            for _ in range(2):  # the first call may pay for kernel selection
                start = time.perf_counter()
                make().squared_norms("", Identity(), shape)
                seconds[name] = time.perf_counter() - start
        _ROUTES[key] = min(seconds, key=seconds.__getitem__)
    return candidates[_ROUTES[key]]()


def _weight_factor(
    module: nn.Module, u: Tensor, unfold_v: Callable[[], Tensor], grouped: Callable[[], Tensor]
) -> Factor:
    """Per-sample weight gradients ``Σ_t u_t v_tᵀ`` by the fastest of ghost norm, unfold + product
    and grouped weight-gradient convolution."""
    key = (
        type(module),
        tuple(module.weight.shape),
        tuple(u.shape),
        module.stride,
        module.padding,
        module.dilation,
    )
    candidates: dict[str, Callable[[], Factor]] = {
        "ghost": lambda: OuterSum(u, unfold_v(), route="ghost"),
        "unfold": lambda: OuterSum(u, unfold_v(), route="dense"),
        "grouped": lambda: Dense(grouped()),
    }
    # The ghost norm costs ~T²(d_u + d_v) per sample against ~T·d_u·d_v for materialising: at many
    # positions T it cannot win, and even timing it once is slow (seconds at 32x32 and up).
    positions, d_u = u.shape[1], u.shape[2]
    d_v = module.weight.numel() // d_u
    if positions * (d_u + d_v) > GHOST_MAX_RATIO * d_u * d_v:
        del candidates["ghost"]
    return _fastest(key, module.weight.shape, candidates)


def _unfold(x: Tensor, module: nn.Module) -> Tensor:
    """``[B, positions, C * kernel]`` columns of a 1-d or 2-d tensor, with the module's geometry."""
    options = {"kernel_size": tuple(module.kernel_size), **_options(module)}
    if all(v == 1 for v in options["kernel_size"] + options["stride"]) and not any(options["padding"]):
        return x.flatten(2).transpose(1, 2)  # 1x1 convolution: the columns are the pixels, no copy
    if x.ndim == 3:  # 1-d: unit height
        x = x.unsqueeze(2)
        options = {k: (1 if k != "padding" else 0, *v) for k, v in options.items()}
    return F.unfold(x, **options).transpose(1, 2)


def _plain(module: nn.Module) -> bool:
    return module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)


def _conv_factors(
    module: nn.Module, unfolded: Tensor, grad_side: Tensor, conv_input: Tensor
) -> dict[str, Factor]:
    """Weight factor ``Σ_t g_t c_tᵀ``: ``g`` the channels of ``grad_side`` at each position, ``c`` the
    columns of ``unfolded``. A convolution passes (input, output gradient, input); a transposed one,
    being the adjoint, passes (output gradient, input, output gradient)."""
    batch, channels = grad_side.shape[:2]
    if grad_side.numel() == 0 or unfolded.numel() == 0:  # an empty feature map: the weight gets no gradient
        return {"weight": Dense(grad_side.new_zeros(batch, *module.weight.shape))}
    rows = grad_side.reshape(batch, channels, -1).transpose(1, 2)  # [B, positions, channels]
    weight = _weight_factor(
        module,
        rows,
        lambda: _unfold(unfolded, module),
        lambda: _per_sample_weight_grads(conv_input, grad_side, tuple(module.weight.shape), _options(module)),
    )
    return {"weight": weight}


@register_rule(nn.Conv1d, nn.Conv2d)
class ConvRule(Rule):
    def supports(self, module: nn.Module) -> bool:
        return _plain(module)

    def factors(
        self, module: nn.Module, inputs: tuple[Any, ...], outputs: list[Tensor], grads: list[Tensor]
    ) -> dict[str, Factor]:
        out = _conv_factors(module, unfolded=inputs[0], grad_side=grads[0], conv_input=inputs[0])
        if module.bias is not None:
            out["bias"] = Dense(grads[0].flatten(2).sum(2))
        return out


@register_rule(nn.ConvTranspose2d)
class ConvTransposeRule(Rule):
    """``y = conv_transpose(a, W)`` is the adjoint of ``conv(·, W)``: its weight gradient is that of a
    convolution from the output gradient to the input."""

    def supports(self, module: nn.Module) -> bool:
        return _plain(module) and all(
            o < s for o, s in zip(module.output_padding, module.stride, strict=True)
        )

    def factors(
        self, module: nn.Module, inputs: tuple[Any, ...], outputs: list[Tensor], grads: list[Tensor]
    ) -> dict[str, Factor]:
        out = _conv_factors(module, unfolded=grads[0], grad_side=inputs[0], conv_input=grads[0])
        if module.bias is not None:
            out["bias"] = Dense(grads[0].flatten(2).sum(2))
        return out
