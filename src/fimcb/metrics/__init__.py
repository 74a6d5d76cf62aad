"""Fitted approximations of the Fisher information matrix ("metrics"): the paper's ``layer_scalar``,
``diagonal``, ``kfac`` (Kronecker factors from the engine's layer rules) and ``low_rank`` (damping + N
reference gradients, through Woodbury). They estimate F from training data (``fisher="empirical"``)
or from model samples (``fisher="true"``, :mod:`fimcb.metrics.fitting`) and are registered by name.
The contract every metric follows, and the ones that need no fit, are in :mod:`fimcb.core.metric`.
"""

from fimcb.core.metric import METRICS, Diagonal, Identity, Metric, register_metric, resolve_metric
from fimcb.metrics.base import FittedMetric
from fimcb.metrics.diagonal import FittedDiagonal, LayerScalar
from fimcb.metrics.kfac import KFAC
from fimcb.metrics.low_rank import CountSketch, LowRank

for _metric in (LayerScalar, FittedDiagonal, KFAC, LowRank):
    register_metric(_metric)

__all__ = [
    "KFAC",
    "METRICS",
    "CountSketch",
    "Diagonal",
    "FittedDiagonal",
    "FittedMetric",
    "Identity",
    "LayerScalar",
    "LowRank",
    "Metric",
    "register_metric",
    "resolve_metric",
]
