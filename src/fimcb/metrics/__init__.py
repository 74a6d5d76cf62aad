"""Approximations of the Fisher information matrix ("metrics") that turn per-sample gradients into norms.

By name (``metric=`` of ``per_sample_layer_norms``, ``evaluate_ood`` and the callback): ``identity``
(F = I), ``layer_scalar`` (the paper: λ_l·I per layer), ``diagonal`` (diag F + damping), ``kfac``
(Kronecker factors for Linear and convolution layers) and ``low_rank`` (damping + N reference
gradients, through Woodbury). The fitted ones estimate F from training data (``fisher="empirical"``)
or from model samples (``fisher="true"``): see :mod:`fimcb.metrics.fitting`.
"""

from fimcb.metrics.base import METRICS, Diagonal, Identity, Metric, resolve_metric
from fimcb.metrics.diagonal import FittedDiagonal, FittedMetric, LayerScalar
from fimcb.metrics.kfac import KFAC
from fimcb.metrics.low_rank import CountSketch, LowRank

METRICS.update({m.name: m for m in (LayerScalar, FittedDiagonal, KFAC, LowRank)})

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
    "resolve_metric",
]
