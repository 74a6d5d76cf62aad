"""Gaussians with correlations between layers on the paper's log features (docs/method.md §4, §9).

The per-layer Gaussians of the paper ignore correlations between layers; on few layers a full
covariance detects much better, on many it overfits (docs/method.md §9). Two ways to keep it well
conditioned: shrinking the correlation matrix towards the identity (Ledoit–Wolf, or a fixed amount),
or a factor-analysis covariance (a few shared factors plus a noise variance per layer) whose number
of factors is chosen by the held-out in-distribution likelihood.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from fimcb.core.norms import LayerNorms
from fimcb.detectors.base import Detector
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

    def covariance(self, z: Tensor) -> tuple[Tensor, dict[str, Any]]:
        """The covariance of the standardised features ``z [n, p]`` and what the fit chose to log."""
        correlation, shrinkage = ledoit_wolf(z, self.shrinkage)
        return correlation, {"shrinkage": shrinkage}

    def _fit(self, norms: LayerNorms) -> dict[str, Any]:
        state = super()._fit(norms)
        covariance, chosen = self.covariance(self.standardised(norms, state))
        cholesky, info = torch.linalg.cholesky_ex(covariance)
        if int(info) != 0:
            raise ValueError(
                f"{self.name}: the covariance of {covariance.shape[0]} kept layers over {len(norms)} rows "
                f"is singular ({chosen}); use more fit rows (or, for {FullGaussian.name}, shrinkage > 0)"
            )
        return {**state, "cholesky": cholesky, **chosen}

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


def factor_analysis(covariance: Tensor, rank: int, iterations: int = 1000, tol: float = 1e-8) -> Tensor:
    """Maximum-likelihood factor-analysis covariance ``W Wᵀ + diag(ψ)`` (``W [p, rank]``) of a sample
    covariance ``[p, p]``, by the SVD-based iterations scikit-learn's ``FactorAnalysis`` uses: ``rank``
    shared factors, and an own noise variance per feature."""
    variance = torch.diagonal(covariance).clamp_min(1e-12)
    psi = variance.clone()
    if rank == 0:
        return torch.diag(variance)
    previous = -math.inf
    for _ in range(iterations):
        scale = psi.sqrt()
        all_values, vectors = torch.linalg.eigh(covariance / (scale[:, None] * scale[None, :]))
        values, vectors = all_values[-rank:], vectors[:, -rank:]
        # the profile log-likelihood at this ψ (×(−2/n), up to constants), as scikit-learn computes it
        log_likelihood = -float(
            values.clamp_min(1e-12).log().sum() + all_values[:-rank].sum() + psi.log().sum()
        )
        loadings = vectors * (values - 1).clamp_min(1e-12).sqrt() * scale[:, None]
        psi = (variance - loadings.pow(2).sum(dim=1)).clamp_min(1e-12)
        if abs(log_likelihood - previous) < tol:
            break
        previous = log_likelihood
    return loadings @ loadings.T + torch.diag(psi)


def gaussian_log_likelihood(z: Tensor, covariance: Tensor) -> float:
    """Mean log-density of the rows of ``z`` under ``N(0, covariance)``."""
    cholesky = torch.linalg.cholesky(covariance)
    w = torch.linalg.solve_triangular(cholesky, z.T, upper=False)
    log_det = 2 * torch.diagonal(cholesky).log().sum()
    return float(-0.5 * (z.shape[1] * math.log(2 * math.pi) + log_det + w.pow(2).sum(dim=0)).mean())


class FactorGaussian(FullGaussian):
    """:class:`FullGaussian` with a factor-analysis covariance: a few factors shared by the layers plus
    an own noise variance per layer.

    The number of factors is chosen on the fit set alone, by two-fold cross-validation of the held-out
    Gaussian log-likelihood over ``0 .. max_rank`` factors (0 = independent standardised layers, the
    paper's assumption), then the covariance is refitted on every fit row. With many layers and few fit
    rows this keeps the common "gradient scale" factor that the paper's independent sum counts once per
    layer, with O(p·rank) parameters instead of a full covariance's O(p²).

    Args:
        max_rank: most factors tried (also at most p − 1 and a quarter of the fit rows).
    """

    name = "fim_gaussian_factor"

    def __init__(self, max_rank: int = 10) -> None:
        Detector.__init__(self)
        if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 0:
            raise ValueError(f"{self.name}: max_rank must be an integer >= 0, got {max_rank!r}")
        self.max_rank = max_rank

    def covariance(self, z: Tensor) -> tuple[Tensor, dict[str, Any]]:
        n, p = z.shape
        order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        folds = (order[: n // 2], order[n // 2 :])

        def held_out(rank: int) -> float:
            total = 0.0
            for train, test in (folds, folds[::-1]):
                mean = z[train].mean(dim=0)
                centred = z[train] - mean
                total += gaussian_log_likelihood(
                    z[test] - mean, factor_analysis(centred.T @ centred / len(train), rank)
                )
            return total

        rank = max(range(min(self.max_rank, p - 1, n // 4) + 1), key=held_out)
        return factor_analysis(z.T @ z / n, rank), {"rank": rank}

    @property
    def rank(self) -> int:
        """The number of shared factors the fit chose."""
        return int(self.state["rank"])

    @property
    def fitted_shrinkage(self) -> float:
        """Not defined: a factor model regularises by its number of factors (:attr:`rank`)."""
        raise AttributeError(f"{self.name} fits shared factors, not a shrinkage: read .rank")


class FactorGaussianWithLikelihood(WithLikelihood, FactorGaussian):
    """:class:`FactorGaussian` with the log-likelihood as one more feature."""

    name = "fim_gaussian_factor_ll"
