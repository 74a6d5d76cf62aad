"""Baselines beside the paper's detector: total gradient norm, likelihood and typicality
(docs/method.md §5)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from fimcb.core.norms import LayerNorms
from fimcb.detectors.base import Detector


class TotalNorm(Detector):
    """One-sided: the log squared norm of the whole gradient (identity metric); large = novel."""

    name = "total_norm"

    def _fit(self, norms: LayerNorms) -> dict[str, Any]:
        return {}

    def _score(self, norms: LayerNorms) -> Tensor:
        return norms.total.double().log()


class Likelihood(Detector):
    """Negative log-likelihood (or negative ELBO) of the sample or group; low likelihood = novel."""

    name = "likelihood"

    def _fit(self, norms: LayerNorms) -> dict[str, Any]:
        return {}

    def _score(self, norms: LayerNorms) -> Tensor:
        return -norms.log_likelihood.double()


class Typicality(Detector):
    """``|NLL(x) − Ĥ|`` with Ĥ the mean NLL of the fit set (Nalisnick et al. 2019); two-sided."""

    name = "typicality"

    def _fit(self, norms: LayerNorms) -> dict[str, Any]:
        return {"entropy": float(-norms.log_likelihood.double().mean())}

    def _score(self, norms: LayerNorms) -> Tensor:
        return (-norms.log_likelihood.double() - self.state["entropy"]).abs()
