"""Novelty detectors over layer norms: fit on in-distribution data, score, save and restore."""

from __future__ import annotations

from fimcb.core.registry import register
from fimcb.detectors.base import Detector, NotFittedError
from fimcb.detectors.baselines import Likelihood, TotalNorm, Typicality
from fimcb.detectors.covariance import (
    FactorGaussian,
    FactorGaussianWithLikelihood,
    FullGaussian,
    FullGaussianWithLikelihood,
)
from fimcb.detectors.gaussian import FIMGaussian
from fimcb.detectors.pvalues import ChiSquare, FisherMethod

#: Detectors by name, for ``methods=[...]`` in Python and YAML.
DETECTORS: dict[str, type[Detector]] = {}


def register_detector(detector: type[Detector], *, overwrite: bool = False) -> type[Detector]:
    """Make ``detector`` available by its ``name`` (usable as a class decorator); refuses to replace
    another detector of that name unless ``overwrite``."""
    register(DETECTORS, detector, detector.name, what="a detector named", overwrite=overwrite)
    return detector


for _detector in (
    FIMGaussian,
    FullGaussian,
    FullGaussianWithLikelihood,
    FactorGaussian,
    FactorGaussianWithLikelihood,
    ChiSquare,
    FisherMethod,
    TotalNorm,
    Likelihood,
    Typicality,
):
    register_detector(_detector)
#: The FIM detector fimcb evaluates first by default. Chosen without OOD data, by the protocol of
#: docs/results.md (held-out in-distribution images against shifts made from them, over seeds and models).
DEFAULT_DETECTOR: str = FullGaussian.name
#: What the callback and ``evaluate_ood`` evaluate by default: the chosen detector, the paper's
#: ``fim_gaussian``, the plain ``total_norm``, and the likelihood and typicality baselines.
DEFAULT_METHODS: tuple[str, ...] = (
    DEFAULT_DETECTOR,
    FIMGaussian.name,
    TotalNorm.name,
    Likelihood.name,
    Typicality.name,
)
#: Detectors that do not use gradients: the likelihood baselines beside which FIM-norms are judged.
BASELINE_METHODS: tuple[str, ...] = (Likelihood.name, Typicality.name)


def build_detector(method: str | Detector) -> Detector:
    """A fresh detector by registered name, or the given instance."""
    if isinstance(method, Detector):
        return method
    if method not in DETECTORS:
        raise ValueError(f"unknown detector {method!r}; choose from {sorted(DETECTORS)}")
    return DETECTORS[method]()


__all__ = [
    "BASELINE_METHODS",
    "DEFAULT_DETECTOR",
    "DEFAULT_METHODS",
    "DETECTORS",
    "ChiSquare",
    "Detector",
    "FIMGaussian",
    "FactorGaussian",
    "FactorGaussianWithLikelihood",
    "FisherMethod",
    "FullGaussian",
    "FullGaussianWithLikelihood",
    "Likelihood",
    "NotFittedError",
    "TotalNorm",
    "Typicality",
    "build_detector",
    "register_detector",
]
