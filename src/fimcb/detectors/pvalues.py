"""Detectors that turn each layer's feature into a two-sided p-value and combine them by Fisher's method.

A per-layer p-value puts layers on one scale whatever their spread, and Fisher's statistic
``−2 Σ_l log p_l`` (χ²_{2K} under independence, K layers) is large when any layer is far in
either tail. The statistic is the score: its χ² tail probability saturates at 0 for clear
outliers and would tie them, while the statistic still ranks them (``p_values`` gives both).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any, Literal

import torch
from torch import Tensor

from fimcb.core.norms import LOG_FLOOR, LayerNorms
from fimcb.detectors.base import Detector
from fimcb.detectors.gaussian import FIMGaussian

# Below this a regularised incomplete gamma function is replaced by its tail expansion in log space,
# before it underflows to 0 and ties the most extreme samples.
_TINY = 1e-280
# Iterations of Minka's generalised Newton step for the gamma shape; it converges in about four.
_GAMMA_ML_STEPS = 12


def gamma_log_cdf_sf(a: Tensor, log_x: Tensor) -> tuple[Tensor, Tensor]:
    """``log P(a, x)`` and ``log Q(a, x)`` (regularised lower/upper incomplete gamma) for ``x = exp(log_x)``.

    Where ``P`` or ``Q`` drops below ``_TINY`` the first-order tail expansions
    ``P ≈ xᵃe⁻ˣ/Γ(a+1) · (a+1)/(a+1−x)`` (x < a+1) and ``Q ≈ xᵃ⁻¹e⁻ˣ/Γ(a) · x/(x−a+1)`` (x > a−1)
    replace them, so that far-out samples keep distinct, finite, monotone values.
    """
    a, log_x = torch.broadcast_tensors(a.double(), log_x.double())
    x = log_x.exp()
    lower, upper = torch.special.gammainc(a, x), torch.special.gammaincc(a, x)
    lower_tail = a * log_x - x - torch.lgamma(a + 1) + torch.log((a + 1) / (a + 1 - x).clamp_min(1e-300))
    upper_tail = (a - 1) * log_x - x - torch.lgamma(a) + torch.log(x / (x - a + 1).clamp_min(1e-300))
    log_lower = torch.where(lower < _TINY, lower_tail, lower.clamp_min(_TINY).log())
    log_upper = torch.where(upper < _TINY, upper_tail, upper.clamp_min(_TINY).log())
    return log_lower, log_upper


class FisherCombination(Detector):
    """Detectors whose score is Fisher's statistic ``−2 Σ_l log p_l`` of per-layer two-sided p-values;
    the fitted state holds the ``keep`` mask of the K layers used."""

    @abstractmethod
    def _log_p_values(self, norms: LayerNorms) -> Tensor:
        """``[N, K]`` log two-sided p-values of the K kept layers."""

    def _score(self, norms: LayerNorms) -> Tensor:
        return -2 * self._log_p_values(norms).sum(dim=1)

    def p_values(self, norms: LayerNorms) -> Tensor:
        """Combined p-values ``P(χ²_{2K} ≥ score)`` (layers assumed independent); 0 for non-finite rows.

        For calibration and reporting only: far-out samples all get p = 0, so rank by ``score``.
        """
        n_layers = torch.tensor(float(self.state["keep"].sum()), dtype=torch.float64)
        return torch.special.gammaincc(n_layers, self.score(norms) / 2)


class FisherMethod(FisherCombination, FIMGaussian):
    """Fisher's method over the paper's per-layer Gaussians: ``p_l = 2Φ(−|z_l|)``, ``z_l`` the standardised
    log feature (fitted as ``fim_gaussian``, zero-spread layers dropped). Score = ``−2 Σ_l log p_l``."""

    name = "fisher_method"

    def _log_p_values(self, norms: LayerNorms) -> Tensor:
        keep = self.state["keep"]
        z = (self.features(norms).cpu()[:, keep] - self.state["mean"][keep]) / self.state["std"][keep]
        return torch.special.log_ndtr(-z.abs()) + math.log(2)


class ChiSquare(FisherCombination, FIMGaussian):
    """Each layer's squared norm (not its log) as a scaled chi-square ``c_l·χ²_{ν_l}``; Fisher's method over
    the two-sided p-values ``2·min(F, 1−F)``.

    ``c_l χ²_{ν_l}`` is a gamma law with shape ``ν_l/2`` and scale ``2c_l``; it is exact when the
    layer's score is Gaussian with covariance ∝ F_l, with ν_l its effective dimension. Layers are
    selected as in ``fim_gaussian`` (zero spread of the log feature dropped).

    Args:
        estimator: ``"ml"`` (maximum likelihood, default: matches the mean of the log feature, so a
            heavy right tail of the fit set does not inflate the scale) or ``"moments"`` (mean and variance).
    """

    name = "chi_square"

    def __init__(self, estimator: Literal["ml", "moments"] = "ml") -> None:
        super().__init__()
        if estimator not in ("ml", "moments"):
            raise ValueError(f"{self.name}: estimator must be 'ml' or 'moments', got {estimator!r}")
        self.estimator = estimator

    def _fit(self, norms: LayerNorms) -> dict[str, Any]:
        state = super()._fit(norms)
        keep = state["keep"]
        log_y = norms.log_features().cpu()[:, keep]
        if self.estimator == "moments":
            y = log_y.exp()
            shape, scale = y.mean(dim=0).pow(2) / y.var(dim=0), y.var(dim=0) / y.mean(dim=0)
        else:
            shape, scale = _gamma_ml(log_y)
        return {**state, "dof": 2 * shape, "scale": scale / 2}

    def _log_p_values(self, norms: LayerNorms) -> Tensor:
        keep = self.state["keep"]
        log_x = norms.log_features().cpu()[:, keep] - (2 * self.state["scale"]).log()
        log_lower, log_upper = gamma_log_cdf_sf(self.state["dof"] / 2, log_x)
        return torch.minimum(log_lower, log_upper) + math.log(2)


def _gamma_ml(log_y: Tensor) -> tuple[Tensor, Tensor]:
    """Maximum-likelihood gamma shape and scale per column of ``log y [n, K]`` (Minka 2002).

    Solves ``log a − ψ(a) = s`` with ``s = log mean(y) − mean(log y)``, computed around the mean log
    so that it neither overflows nor cancels for nearly constant columns.
    """
    mean_log = log_y.mean(dim=0)
    s = torch.log1p(torch.expm1(log_y - mean_log).mean(dim=0)).clamp_min(LOG_FLOOR)
    a = (3 - s + ((s - 3).pow(2) + 24 * s).sqrt()) / (12 * s)
    for _ in range(_GAMMA_ML_STEPS):
        gap = a.log() - torch.special.digamma(a) - s
        slope = 1 / a - torch.special.polygamma(1, a)
        a = 1 / (1 / a + gap / (a.pow(2) * slope))
    return a, (mean_log + s).exp() / a
