"""A full-covariance Gaussian on the paper's log features, with a shrinkage covariance
(docs/method.md §4, §9).

The per-layer Gaussians of the paper ignore correlations between layers; on few layers a full
covariance detects much better, on many it overfits (docs/method.md §9). Shrinking the correlation
matrix towards the identity (Ledoit–Wolf, or a fixed amount) keeps it well conditioned.
"""

from __future__ import annotations

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

    def _standardised(self, norms: LayerNorms, state: dict[str, Any]) -> Tensor:
        keep = state["keep"]
        return (self.features(norms).cpu()[:, keep] - state["mean"][keep]) / state["std"][keep]

    def _fit(self, norms: LayerNorms) -> dict[str, Any]:
        state = super()._fit(norms)
        correlation, shrinkage = ledoit_wolf(self._standardised(norms, state), self.shrinkage)
        cholesky, info = torch.linalg.cholesky_ex(correlation)
        if int(info) != 0:
            raise ValueError(
                f"{self.name}: the covariance of {correlation.shape[0]} kept layers over {len(norms)} rows "
                f"is singular (shrinkage {shrinkage:g}); use more fit rows or shrinkage > 0"
            )
        return {**state, "cholesky": cholesky, "shrinkage": shrinkage}

    def _score(self, norms: LayerNorms) -> Tensor:
        z = self._standardised(norms, self.state)
        w = torch.linalg.solve_triangular(self.state["cholesky"], z.T, upper=False)
        return w.pow(2).sum(dim=0)

    @property
    def fitted_shrinkage(self) -> float:
        """The shrinkage α used by the fit (estimated by Ledoit–Wolf unless fixed)."""
        return float(self.state["shrinkage"])


class FullGaussianWithLikelihood(FullGaussian):
    """:class:`FullGaussian` on the log features plus the log-likelihood as one more feature: one joint
    density of "how large is each layer's gradient" and "how likely is the sample", so that the
    detector can use what the gradients add to the likelihood (and typicality) and vice versa."""

    name = "fim_gaussian_full_ll"

    def features(self, norms: LayerNorms) -> Tensor:
        ll = norms.log_likelihood.to(torch.float64).reshape(-1, 1).to(norms.values.device)
        return torch.cat([norms.log_features(), ll], dim=1)
