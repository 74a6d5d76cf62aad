"""Log-densities shared by the models: Gaussians, and discretised logistics, proper distributions on
``num_levels`` intensity levels.

Level ``k`` of ``K = num_levels`` is the bin ``[c_k - h, c_k + h)`` of the real line, centred at
``c_k = 2k/(K-1) - 1`` with half-width ``h = 1/(K-1)``, so the bins tile ``[-1, 1]``; the first and
last bins also take the tails below ``-1`` and above ``1``. ``P(k)`` is the logistic mass of its bin,
so the probabilities of the ``K`` levels sum to one for every mean and scale (Salimans et al., 2017,
PixelCNN++). Everything is elementwise and free of data-dependent control flow, so it works under
``torch.func.vmap``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_LOG2 = math.log(2.0)
_LOG_2PI = math.log(2.0 * math.pi)


def gaussian_log_prob(z: Tensor, mean: Tensor | float = 0.0, log_std: Tensor | float = 0.0) -> Tensor:
    """``log N(z; mean, exp(log_std)²)`` summed over all but the batch dimension, shape ``[B]``."""
    log_std = torch.as_tensor(log_std, dtype=z.dtype, device=z.device)
    log_p = -0.5 * (_LOG_2PI + ((z - mean) * torch.exp(-log_std)) ** 2) - log_std
    return log_p.flatten(1).sum(1)


def log1mexp(d: Tensor) -> Tensor:
    """``log(1 - exp(-d))`` for ``d > 0``, accurate for small and large ``d`` (Mächler, 2012).

    Each branch sees its input clamped to its own range, so neither produces inf or NaN gradients
    through the ``torch.where`` it is not selected by."""
    small = torch.log(-torch.expm1(-d.clamp(max=_LOG2)))
    large = torch.log1p(-torch.exp(-d.clamp(min=_LOG2)))
    return torch.where(d <= _LOG2, small, large)


def discretized_logistic_log_prob(levels: Tensor, mean: Tensor, log_scale: Tensor, num_levels: int) -> Tensor:
    """Elementwise ``log P(levels)`` under a logistic of ``mean`` and ``exp(log_scale)`` on ``[-1, 1]``.

    ``levels`` are integers ``0 .. num_levels - 1`` (any dtype) broadcastable with ``mean`` and
    ``log_scale``. Interior bins use ``σ(a) − σ(b) = σ(a)·σ(−b)·(1 − e^{−(a−b)})`` with the standardised
    bin edges ``a > b``, which stays accurate far in either tail; the edge bins are ``σ(a)`` and
    ``σ(−b)``.
    """
    half_width = 1.0 / (num_levels - 1)
    twice = 2.0 * levels.to(mean.dtype)
    inv_scale = torch.exp(-log_scale)
    # Edges as (2k ± 1) h - 1: bit-identical where two bins meet, so the masses add up exactly.
    upper = ((twice + 1.0) * half_width - 1.0 - mean) * inv_scale  # a
    lower = ((twice - 1.0) * half_width - 1.0 - mean) * inv_scale  # b
    log_cdf_upper = F.logsigmoid(upper)  # log σ(a): the first bin
    log_sf_lower = F.logsigmoid(-lower)  # log σ(−b) = log(1 − σ(b)): the last bin
    interior = log_cdf_upper + log_sf_lower + log1mexp(2.0 * half_width * inv_scale)
    edge = torch.where(levels <= 0, log_cdf_upper, log_sf_lower)
    return torch.where((levels <= 0) | (levels >= num_levels - 1), edge, interior)


def discretized_logistic_mixture_log_prob(
    levels: Tensor, logits: Tensor, mean: Tensor, log_scale: Tensor, num_levels: int
) -> Tensor:
    """``log P(levels)`` under a mixture of discretised logistics, components along the last dimension.

    ``logits``, ``mean`` and ``log_scale`` have shape ``[..., M]`` and ``levels`` shape ``[...]``;
    the result has shape ``[...]``.
    """
    components = discretized_logistic_log_prob(levels.unsqueeze(-1), mean, log_scale, num_levels)
    return torch.logsumexp(F.log_softmax(logits, dim=-1) + components, dim=-1)


def sample_discretized_logistic(
    mean: Tensor, log_scale: Tensor, num_levels: int, generator: torch.Generator | None = None
) -> Tensor:
    """Exact draws (int64 levels, shaped like ``mean``) from :func:`discretized_logistic_log_prob`:
    a logistic draw by inverse CDF, then the level whose bin holds it (the edge bins take the tails)."""
    u = torch.rand(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
    u = u.clamp(torch.finfo(mean.dtype).tiny, 1.0 - torch.finfo(mean.dtype).eps)
    x = mean + torch.exp(log_scale) * (torch.log(u) - torch.log1p(-u))
    return torch.round((x + 1.0) * (0.5 * (num_levels - 1))).clamp(0, num_levels - 1).to(torch.int64)


def sample_discretized_logistic_mixture(
    logits: Tensor, mean: Tensor, log_scale: Tensor, num_levels: int, generator: torch.Generator | None = None
) -> Tensor:
    """Exact draws (int64 levels, shape ``[...]``) from :func:`discretized_logistic_mixture_log_prob`:
    a component per element from ``softmax(logits)``, then a draw from that component."""
    probs = torch.softmax(logits, dim=-1).flatten(0, -2)
    component = torch.multinomial(probs, 1, generator=generator).reshape(*logits.shape[:-1], 1)
    chosen_mean = mean.gather(-1, component).squeeze(-1)
    chosen_log_scale = log_scale.gather(-1, component).squeeze(-1)
    return sample_discretized_logistic(chosen_mean, chosen_log_scale, num_levels, generator)
