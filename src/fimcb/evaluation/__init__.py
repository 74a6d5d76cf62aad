"""Evaluation: scoring a loader (:mod:`.scoring`), fitting detectors and computing OOD measures
(:mod:`.ood`), and which layers carry the decision (:mod:`.analysis`)."""

from fimcb.evaluation.ood import (
    OODResult,
    evaluate_ood,
    fit_and_score,
    load_features,
    load_scores,
    ood_measures,
)
from fimcb.evaluation.scoring import EmptyLoaderError, ScoringOptions, layer_norms_over

__all__ = [
    "EmptyLoaderError",
    "OODResult",
    "ScoringOptions",
    "evaluate_ood",
    "fit_and_score",
    "layer_norms_over",
    "load_features",
    "load_scores",
    "ood_measures",
]
