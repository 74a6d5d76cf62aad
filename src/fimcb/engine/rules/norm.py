"""Affine parameters of normalisation layers: ``∇γ = Σ x̂ ⊙ b`` and ``∇β = Σ b`` over positions.

Only per-sample normalisations qualify: LayerNorm, GroupNorm, InstanceNorm (its statistics are each
sample's own, or the running ones), and BatchNorm in eval mode with running statistics. BatchNorm
that normalises with batch statistics couples the samples, so a per-sample gradient does not exist:
it is refused with an error.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fimcb.engine.factors import Dense, Factor
from fimcb.engine.rules import Call, Rule, register_rule


def _affine(
    module: nn.Module, x_hat: Tensor, grad: Tensor, channel_dims: tuple[int, ...]
) -> dict[str, Factor]:
    """Sum ``x̂ ⊙ b`` and ``b`` over every dimension but the batch and ``channel_dims``."""
    reduce = tuple(d for d in range(1, grad.ndim) if d not in channel_dims)
    out: dict[str, Factor] = {}
    if module.weight is not None:
        out["weight"] = Dense((x_hat * grad).sum(reduce) if reduce else x_hat * grad)
    if module.bias is not None:
        out["bias"] = Dense(grad.sum(reduce) if reduce else grad)
    return out


@register_rule(nn.LayerNorm)
class LayerNormRule(Rule):
    reads_outputs = False

    def factors(self, call: Call) -> dict[str, Factor]:
        module, grad = call.module, call.grads[0]
        x_hat = F.layer_norm(call.args[0], module.normalized_shape, eps=module.eps)
        n = len(module.normalized_shape)
        return _affine(module, x_hat, grad, tuple(range(grad.ndim - n, grad.ndim)))


@register_rule(nn.GroupNorm)
class GroupNormRule(Rule):
    reads_outputs = False

    def factors(self, call: Call) -> dict[str, Factor]:
        module, grad = call.module, call.grads[0]
        x_hat = F.group_norm(call.args[0], module.num_groups, eps=module.eps)
        return _affine(module, x_hat, grad, (1,))


def _running_normalised(module: nn.modules.batchnorm._NormBase, x: Tensor) -> Tensor:
    """``x`` normalised per channel by the module's running statistics."""
    assert module.running_mean is not None and module.running_var is not None
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean, var = module.running_mean.reshape(shape), module.running_var.reshape(shape)
    return (x - mean) * torch.rsqrt(var + module.eps)


@register_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
class BatchNormRule(Rule):
    reads_outputs = False

    def factors(self, call: Call) -> dict[str, Factor]:
        module, grad, x = call.module, call.grads[0], call.args[0]
        check_batchnorm(module)
        return _affine(module, _running_normalised(module, x), grad, (1,))


@register_rule(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
class InstanceNormRule(Rule):
    """Each sample's statistics per channel (in training mode, or without running statistics), else the
    running ones, as ``F.instance_norm`` chooses."""

    reads_outputs = False

    def factors(self, call: Call) -> dict[str, Factor]:
        module, grad, x = call.module, call.grads[0], call.args[0]
        if module.training or not module.track_running_stats:
            x_hat = F.instance_norm(x, eps=module.eps)
        else:
            x_hat = _running_normalised(module, x)
        return _affine(module, x_hat, grad, (1,))


class SamplesInteractError(ValueError):
    """A layer mixes samples of the batch, so per-sample gradients are not defined."""


def check_samples_independent(model: nn.Module, modules: Iterable[nn.Module] | None = None) -> None:
    """Refuse a model with a BatchNorm that uses batch statistics even in eval mode (samples interact);
    ``modules``: the model's, where the caller has them at hand."""
    for module in model.modules() if modules is None else modules:
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            check_batchnorm(module)


def check_batchnorm(module: nn.Module) -> None:
    """Refuse BatchNorm that normalises with batch statistics (train mode, or no running stats)."""
    if module.training or module.running_mean is None:
        raise SamplesInteractError(
            f"{type(module).__name__} normalises with batch statistics (train mode or "
            "track_running_stats=False), so samples interact and per-sample gradients are undefined; "
            "score in eval mode with running statistics, or use GroupNorm/LayerNorm"
        )
