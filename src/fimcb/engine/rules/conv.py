"""Convolutions. Per-sample weight gradients come either materialised, from one grouped
weight-gradient convolution that treats each sample as its own group (about the cost of the
batch's weight gradient), or, when positions are few and channels many, as the ghost norm of the
unfolded input (or, for transposed convolutions, of the unfolded output gradient)."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.grad import conv1d_weight, conv2d_weight

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


def _ghost_is_cheaper(positions: int, p: int, q: int) -> bool:
    return positions * (p + q) < p * q


def _unfold(x: Tensor, module: nn.Module) -> Tensor:
    """``[B, positions, C * kernel]`` columns of a 1-d or 2-d tensor, with the module's geometry."""
    options = {"kernel_size": tuple(module.kernel_size), **_options(module)}
    if x.ndim == 3:  # 1-d: unit height
        x = x.unsqueeze(2)
        options = {k: (1 if k != "padding" else 0, *v) for k, v in options.items()}
    return F.unfold(x, **options).transpose(1, 2)


def _plain(module: nn.Module) -> bool:
    return module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)


@register_rule(nn.Conv1d, nn.Conv2d)
class ConvRule(Rule):
    def supports(self, module: nn.Module) -> bool:
        return _plain(module)

    def factors(
        self, module: nn.Module, inputs: tuple[Any, ...], outputs: list[Tensor], grads: list[Tensor]
    ) -> dict[str, Factor]:
        a, grad = inputs[0], grads[0]
        batch, c_out = grad.shape[:2]
        b = grad.reshape(batch, c_out, -1).transpose(1, 2)  # [B, positions, C_out]
        weight: Factor
        if _ghost_is_cheaper(b.shape[1], c_out, module.weight[0].numel()):
            weight = OuterSum(b, _unfold(a, module))
        else:
            weight = Dense(_per_sample_weight_grads(a, grad, tuple(module.weight.shape), _options(module)))
        out: dict[str, Factor] = {"weight": weight}
        if module.bias is not None:
            out["bias"] = Dense(b.sum(1))
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
        a, grad = inputs[0], grads[0]
        batch, c_in = a.shape[:2]
        u = a.reshape(batch, c_in, -1).transpose(1, 2)  # [B, input positions, C_in]
        weight: Factor
        if _ghost_is_cheaper(u.shape[1], c_in, module.weight[0].numel()):
            weight = OuterSum(u, _unfold(grad, module))
        else:
            weight = Dense(_per_sample_weight_grads(grad, a, tuple(module.weight.shape), _options(module)))
        out: dict[str, Factor] = {"weight": weight}
        if module.bias is not None:
            out["bias"] = Dense(grad.sum((2, 3)))
        return out
