"""Gaussians with correlations between layers on the paper's log features (docs/method.md §4, §9).

The per-layer Gaussians of the paper ignore correlations between layers; on few layers a full
covariance detects much better, on many it overfits (docs/method.md §9). Two ways to keep it well
conditioned: shrinking the correlation matrix towards the identity (Ledoit–Wolf, or a fixed amount),
or a low-rank-plus-isotropic covariance (probabilistic PCA) whose rank is chosen by the held-out
in-distribution likelihood, which fits the "layers share a few common factors" structure.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from fimcb.core.norms import LayerNorms
from fimcb.detectors.gaussian import FIMGaussian


def ledoit_wolf(x: Tensor, shrinkage: float | None = None) -> tuple[Tensor, float]:
    """Shrunk covariance ``(1−α)·S + α·(tr S / p)·I`` of rows ``x [n, p]`` and the ``α`` used.

    ``S`` is the maximum-likelihood covariance (divided by n). ``shrinkage=None`` estimates α by
    Ledoit & Wolf (2004), in the form scikit-learn's ``LedoitWolf`` uses; a float fixes it.
    """
    x = x.double()
    n, p = x.shape
    x = x - x.mean(dim=0)
    cov = x.T @ x / n
    mu = torch.diagonal(cov).sum() / p
    if shrinkage is None:
        x2 = x.pow(2)
        beta_sum = (x2.T @ x2).sum() / n  # Σ_i ||x_i x_iᵀ||²_F / n
        delta_sum = cov.pow(2).sum()  # ||S||²_F
        beta = (beta_sum - delta_sum) / (p * n)
        eye = torch.eye(p, dtype=cov.dtype, device=cov.device)
        delta = (cov - mu * eye).pow(2).sum() / p  # ≥ 0 by construction, 0 when S is already ∝ I
        beta = torch.minimum(beta, delta)
        shrinkage = 0.0 if float(beta) <= 0.0 else float(beta / delta)
    shrunk = (1 - shrinkage) * cov + shrinkage * mu * torch.eye(p, dtype=cov.dtype, device=cov.device)
    return shrunk, shrinkage


class FullGaussian(FIMGaussian):
    """Score = squared Mahalanobis distance of the log features under a full-covariance Gaussian.

    Each kept layer's log feature is standardised by its fit-set mean and std (the fit of
    ``fim_gaussian``, which also drops zero-spread layers), and the correlation matrix is shrunk
    towards the identity. Standardising first makes the score invariant to an affine change of
    each feature (such as an unknown per-layer metric scale λ_l). The Mahalanobis distance differs
    from the negative log-density by a constant factor and offset, so it ranks samples identically.

    Args:
        shrinkage: amount α in ``[0, 1]`` of shrinkage towards the identity; ``None`` = Ledoit–Wolf.
    """

    name = "fim_gaussian_full"

    def __init__(self, shrinkage: float | None = None) -> None:
        super().__init__()
        if shrinkage is not None:
            if isinstance(shrinkage, bool) or not isinstance(shrinkage, (int, float)):
                raise TypeError(f"{self.name}: shrinkage must be a float or None, got {shrinkage!r}")
            if not 0.0 <= shrinkage <= 1.0:
                raise ValueError(f"{self.name}: shrinkage must lie in [0, 1], got {shrinkage}")
            shrinkage = float(shrinkage)
        self.shrinkage = shrinkage

    def _fit(self, norms: LayerNorms) -> dict[str, Any]:
        state = super()._fit(norms)
        correlation, shrinkage = ledoit_wolf(self.standardised(norms, state), self.shrinkage)
        cholesky, info = torch.linalg.cholesky_ex(correlation)
        if int(info) != 0:
            raise ValueError(
                f"{self.name}: the covariance of {correlation.shape[0]} kept layers over {len(norms)} rows "
                f"is singular (shrinkage {shrinkage:g}); use more fit rows or shrinkage > 0"
            )
        return {**state, "cholesky": cholesky, "shrinkage": shrinkage}

    def _score(self, norms: LayerNorms) -> Tensor:
        z = self.standardised(norms, self.state)
        w = torch.linalg.solve_triangular(self.state["cholesky"], z.T, upper=False)
        return w.pow(2).sum(dim=0)

    @property
    def fitted_shrinkage(self) -> float:
        """The shrinkage α used by the fit (estimated by Ledoit–Wolf unless fixed)."""
        return float(self.state["shrinkage"])


class WithLikelihood(FIMGaussian):
    """Mixin: the log features plus the log-likelihood as one more feature, for one joint density of
    "how large is each layer's gradient" and "how likely is the sample", so that a detector can use
    what the gradients add to the likelihood (and typicality) and vice versa."""

    def features(self, norms: LayerNorms) -> Tensor:
        ll = norms.log_likelihood.to(torch.float64).reshape(-1, 1).to(norms.values.device)
        return torch.cat([norms.log_features(), ll], dim=1)


class FullGaussianWithLikelihood(WithLikelihood, FullGaussian):
    """:class:`FullGaussian` with the log-likelihood as one more feature."""

    name = "fim_gaussian_full_ll"


def ppca(correlation: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """Maximum-likelihood probabilistic PCA (Tipping & Bishop 1999) of a covariance ``[p, p]``:
    ``C = U diag(λ) Uᵀ + σ² (I − U Uᵀ)`` with the ``rank`` leading eigenpairs ``(U, λ)`` kept and σ² the
    mean of the others. Returns ``(U [p, rank], λ [rank], σ²)``."""
    values, vectors = torch.linalg.eigh(correlation)
    values, vectors = values.flip(0), vectors.flip(1)
    sigma2 = float(values[rank:].mean()) if rank < len(values) else 0.0
    return vectors[:, :rank], values[:rank], max(sigma2, 1e-12)


def ppca_mahalanobis(z: Tensor, vectors: Tensor, values: Tensor, sigma2: float) -> Tensor:
    """``zᵀ C⁻¹ z`` per row of ``z [n, p]`` for the PPCA covariance ``(vectors, values, sigma2)``."""
    projected = z @ vectors
    residual = z.pow(2).sum(dim=1) - projected.pow(2).sum(dim=1)
    return (projected.pow(2) / values).sum(dim=1) + residual / sigma2


def ppca_log_likelihood(z: Tensor, vectors: Tensor, values: Tensor, sigma2: float) -> float:
    """Mean Gaussian log-density of the rows of ``z`` under the PPCA covariance (zero mean)."""
    p = z.shape[1]
    log_det = float(values.log().sum()) + (p - len(values)) * math.log(sigma2)
    mahalanobis = ppca_mahalanobis(z, vectors, values, sigma2)
    return float(-0.5 * (p * math.log(2 * math.pi) + log_det + mahalanobis).mean())


class FactorGaussian(FIMGaussian):
    """Score = squared Mahalanobis distance of the standardised log features under a probabilistic-PCA
    covariance: a few shared factors plus isotropic noise.

    The rank is chosen on the fit set alone, by two-fold cross-validation of the held-out Gaussian
    log-likelihood over ranks ``0 .. max_rank`` (rank 0 = independent standardised layers), then the
    covariance is refitted on every fit row. With many layers and few fit rows this keeps the common
    "gradient scale" factor that the paper's independent sum counts once per layer, without the
    O(p²) parameters of a full covariance.

    Args:
        max_rank: largest rank tried (default: up to 20, and at most half the fit rows and p − 1).
    """

    name = "fim_gaussian_factor"

    def __init__(self, max_rank: int = 20) -> None:
        super().__init__()
        if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 0:
            raise ValueError(f"{self.name}: max_rank must be an integer >= 0, got {max_rank!r}")
        self.max_rank = max_rank

    def _fit(self, norms: LayerNorms) -> dict[str, Any]:
        state = super()._fit(norms)
        z = self.standardised(norms, state)
        n, p = z.shape
        ranks = range(min(self.max_rank, p - 1, n // 4) + 1)
        generator = torch.Generator().manual_seed(0)
        order = torch.randperm(n, generator=generator)
        folds = (order[: n // 2], order[n // 2 :])

        def held_out(rank: int) -> float:
            total = 0.0
            for train, test in (folds, folds[::-1]):
                fold = z[train] - z[train].mean(dim=0)
                total += ppca_log_likelihood(
                    z[test] - z[train].mean(dim=0), *ppca(fold.T @ fold / len(train), rank)
                )
            return total

        rank = max(ranks, key=held_out)
        vectors, values, sigma2 = ppca(z.T @ z / n, rank)
        return {**state, "vectors": vectors, "values": values, "sigma2": sigma2, "rank": rank}

    def _score(self, norms: LayerNorms) -> Tensor:
        state = self.state
        return ppca_mahalanobis(
            self.standardised(norms, state), state["vectors"], state["values"], state["sigma2"]
        )

    @property
    def rank(self) -> int:
        """The number of shared factors the fit chose."""
        return int(self.state["rank"])


class FactorGaussianWithLikelihood(WithLikelihood, FactorGaussian):
    """:class:`FactorGaussian` with the log-likelihood as one more feature."""

    name = "fim_gaussian_factor_ll"
