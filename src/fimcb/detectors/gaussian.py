"""The paper's detector: an independent 1-D Gaussian per layer on log squared gradient norms."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from fimcb.core.norms import LayerNorms
from fimcb.detectors.base import Detector

# Layers whose log-norm spreads less than this over the fit set carry no information and are dropped.
MIN_STD = 1e-6


class FIMGaussian(Detector):
    """Score ``-Σ_l log N(log ||s_l||²; μ_l, σ_l²)`` over layers with non-zero spread (docs/method.md §4).

    Under the layer-scalar Fisher approximation ``log(||s_l||²/λ_l)`` differs from the feature by a
    constant per layer, which the Gaussian absorbs: the detector needs no estimate of λ_l.
    """

    name = "fim_gaussian"

    def features(self, norms: LayerNorms) -> Tensor:
        """``[N, F]`` float64 features the Gaussians are fitted on: the log squared norms."""
        return norms.log_features()

    def _fit(self, norms: LayerNorms) -> dict[str, Any]:
        features = self.features(norms)
        mean, std = features.mean(dim=0), features.std(dim=0)
        keep = std > MIN_STD
        if not keep.any():
            raise ValueError(
                f"{self.name}: every layer's log-norm is constant over the fit set; nothing to fit"
            )
        return {"mean": mean.cpu(), "std": std.cpu(), "keep": keep.cpu()}

    def standardised(self, norms: LayerNorms, state: dict[str, Any]) -> Tensor:
        """``[N, kept]`` z-scores of the kept features under the fitted (or being fitted) ``state``."""
        keep = state["keep"]
        return (self.features(norms).cpu()[:, keep] - state["mean"][keep]) / state["std"][keep]

    def _score(self, norms: LayerNorms) -> Tensor:
        z = self.standardised(norms, self.state)
        std = self.state["std"][self.state["keep"]]
        return (0.5 * z.pow(2) + std.log() + 0.5 * math.log(2 * math.pi)).sum(dim=1)

    @property
    def kept_layers(self) -> list[str]:
        """Names of the layers the fitted detector uses."""
        return [n for n, k in zip(self.state["names"], self.state["keep"].tolist(), strict=False) if k]
