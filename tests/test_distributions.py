"""Discretised logistic likelihoods against scipy and high-precision references: normalisation, tails,
finite gradients at extremes, mixtures, and exact samplers."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch
from scipy.stats import logistic
from torch import Tensor

from fimcb.models.distributions import (
    discretized_logistic_log_prob,
    discretized_logistic_mixture_log_prob,
    log1mexp,
    sample_discretized_logistic,
    sample_discretized_logistic_mixture,
)


def _bin_edges(num_levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper edge of every level's bin, with the tails given to the edge bins."""
    half = 1.0 / (num_levels - 1)
    centres = 2.0 * np.arange(num_levels) * half - 1.0
    lower, upper = centres - half, centres + half
    lower[0], upper[-1] = -np.inf, np.inf
    return lower, upper


def _all_levels(num_levels: int, mean: Tensor, log_scale: Tensor) -> Tensor:
    """``log P(k)`` for every level, shape ``[num_levels, *mean.shape]``."""
    levels = torch.arange(num_levels).reshape(-1, *([1] * mean.ndim))
    return discretized_logistic_log_prob(levels, mean, log_scale, num_levels)


@pytest.mark.parametrize("num_levels", [2, 3, 17, 256])
def test_matches_scipy_cdf_differences(num_levels: int) -> None:
    generator = torch.Generator().manual_seed(num_levels)
    mean = 1.5 * torch.randn(40, generator=generator, dtype=torch.float64)
    log_scale = torch.empty(40, dtype=torch.float64).uniform_(-4.0, 1.0, generator=generator)
    log_p = _all_levels(num_levels, mean, log_scale).numpy()
    lower, upper = _bin_edges(num_levels)
    m, s = mean.numpy()[None], np.exp(log_scale.numpy())[None]
    expected = logistic.cdf(upper[:, None], m, s) - logistic.cdf(lower[:, None], m, s)
    mask = expected > 1e-6  # where the plain CDF difference is itself accurate
    np.testing.assert_allclose(np.exp(log_p)[mask], expected[mask], rtol=1e-9)
    np.testing.assert_allclose(np.exp(log_p), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("level", "mean", "log_scale"),
    [
        (255, -1.0, -7.0),  # far above the mean, a narrow logistic: every naive formula underflows
        (0, 1.0, -7.0),
        (100, 0.9, -5.0),
        (100, -0.9, -5.0),
        (128, 0.0, 6.0),  # a very wide logistic: a bin holds a tiny, nearly flat slice
        (1, 30.0, 0.0),
    ],
)
def test_tails_match_high_precision_reference(level: int, mean: float, log_scale: float) -> None:
    num_levels = 256
    with mpmath.workdps(60):
        half = mpmath.mpf(1) / (num_levels - 1)
        centre = 2 * level * half - 1
        s = mpmath.exp(log_scale)

        def sf(v: mpmath.mpf) -> mpmath.mpf:  # P(X > v), exact far above the mean
            return 0 if v == mpmath.inf else 1 / (1 + mpmath.exp((v - mean) / s))

        def cdf(v: mpmath.mpf) -> mpmath.mpf:  # P(X < v), exact far below the mean
            return 0 if v == -mpmath.inf else 1 / (1 + mpmath.exp(-(v - mean) / s))

        lower = -mpmath.inf if level == 0 else centre - half
        upper = mpmath.inf if level == num_levels - 1 else centre + half
        mass = sf(lower) - sf(upper) if centre > mean else cdf(upper) - cdf(lower)
        expected = float(mpmath.log(mass))
    got = discretized_logistic_log_prob(
        torch.tensor(level),
        torch.tensor(mean, dtype=torch.float64),
        torch.tensor(log_scale, dtype=torch.float64),
        num_levels,
    )
    assert math.isclose(got.item(), expected, rel_tol=1e-10), (got.item(), expected)
    got32 = discretized_logistic_log_prob(
        torch.tensor(level), torch.tensor(mean), torch.tensor(log_scale), num_levels
    )
    assert math.isclose(got32.item(), expected, rel_tol=1e-5), (got32.item(), expected)


@pytest.mark.parametrize("num_levels", [2, 3, 17, 256])
def test_probabilities_sum_to_one_even_at_extremes(num_levels: int) -> None:
    mean = torch.tensor([-1e3, -50.0, -1.0, -0.3, 0.0, 0.7, 1.0, 50.0, 1e3], dtype=torch.float64)
    log_scale = torch.tensor([-20.0, -7.0, -2.0, 0.0, 3.0, 10.0], dtype=torch.float64)
    mean, log_scale = torch.meshgrid(mean, log_scale, indexing="ij")
    log_p = _all_levels(num_levels, mean, log_scale)
    assert torch.isfinite(log_p).all() and (log_p <= 0).all()
    torch.testing.assert_close(torch.logsumexp(log_p, 0), torch.zeros_like(mean), rtol=0, atol=1e-12)


def test_gradients_are_finite_at_extremes() -> None:
    """No NaN leaks through the unselected ``torch.where`` branches (which ``vmap(grad)`` would see)."""
    mean = torch.tensor([-1e3, -1.0, 0.0, 1.0, 1e3]).repeat_interleave(4).requires_grad_()
    log_scale = torch.tensor([-7.0, -1.0, 2.0, 8.0]).repeat(5).requires_grad_()
    levels = torch.arange(20) % 17
    levels[:3] = 0
    levels[-3:] = 16
    log_p = discretized_logistic_log_prob(levels, mean, log_scale, 17)
    g_mean, g_scale = torch.autograd.grad(log_p.sum(), [mean, log_scale])
    assert torch.isfinite(log_p).all() and torch.isfinite(g_mean).all() and torch.isfinite(g_scale).all()


def test_log1mexp_is_accurate_and_has_finite_gradients() -> None:
    d = torch.tensor(
        [1e-30, 1e-8, 0.1, math.log(2.0), 2.0, 40.0, 800.0], dtype=torch.float64, requires_grad=True
    )
    with mpmath.workdps(50):
        expected = torch.tensor(
            [float(mpmath.log(1 - mpmath.exp(-mpmath.mpf(v)))) for v in d.tolist()], dtype=torch.float64
        )
    torch.testing.assert_close(log1mexp(d).detach(), expected, rtol=1e-13, atol=1e-300)
    (g,) = torch.autograd.grad(log1mexp(d).sum(), d)
    assert torch.isfinite(g).all()


def test_mixture_is_the_weighted_sum_of_components_and_normalised() -> None:
    generator = torch.Generator().manual_seed(0)
    num_levels, shape = 17, (5, 3)
    logits = torch.randn(*shape, 4, generator=generator, dtype=torch.float64)
    mean = torch.randn(*shape, 4, generator=generator, dtype=torch.float64)
    log_scale = torch.randn(*shape, 4, generator=generator, dtype=torch.float64) - 1.0
    levels = torch.arange(num_levels).reshape(-1, 1, 1)
    log_p = discretized_logistic_mixture_log_prob(levels, logits, mean, log_scale, num_levels)
    assert log_p.shape == (num_levels, *shape)
    weights = torch.softmax(logits, -1)
    components = _all_levels(num_levels, mean, log_scale).exp()  # [K, 5, 3, 4]
    torch.testing.assert_close(log_p.exp(), (weights * components).sum(-1), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(log_p.exp().sum(0), torch.ones(shape, dtype=torch.float64), rtol=0, atol=1e-12)


def _empirical(levels: Tensor, num_levels: int) -> Tensor:
    return torch.bincount(levels.flatten(), minlength=num_levels).double() / levels.numel()


def test_sampler_draws_the_discretised_logistic() -> None:
    num_levels, n = 9, 200_000
    generator = torch.Generator().manual_seed(0)
    mean, log_scale = torch.tensor(0.6, dtype=torch.float64), torch.tensor(-1.2, dtype=torch.float64)
    draws = sample_discretized_logistic(mean.expand(n), log_scale.expand(n), num_levels, generator)
    assert draws.dtype == torch.int64 and draws.min() >= 0 and draws.max() <= num_levels - 1
    expected = _all_levels(num_levels, mean, log_scale).exp()
    torch.testing.assert_close(_empirical(draws, num_levels), expected, rtol=0, atol=4e-3)


def test_mixture_sampler_draws_the_mixture() -> None:
    num_levels, n = 9, 200_000
    generator = torch.Generator().manual_seed(1)
    logits = torch.tensor([0.5, -1.0, 0.0], dtype=torch.float64)
    mean = torch.tensor([-0.8, 0.1, 0.9], dtype=torch.float64)
    log_scale = torch.tensor([-2.0, -0.5, -3.0], dtype=torch.float64)
    draws = sample_discretized_logistic_mixture(
        logits.expand(n, 3), mean.expand(n, 3), log_scale.expand(n, 3), num_levels, generator
    )
    assert draws.shape == (n,)
    levels = torch.arange(num_levels)
    expected = discretized_logistic_mixture_log_prob(levels, logits, mean, log_scale, num_levels).exp()
    torch.testing.assert_close(_empirical(draws, num_levels), expected, rtol=0, atol=4e-3)
