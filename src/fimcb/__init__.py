"""fimcb: Fisher-information-metric gradient norms of generative models, as novelty scores.

The library (engine, metrics, detectors, evaluation, tracking, history, saliency, influence) works
on any ``nn.Module`` with ``log_likelihood(x) -> Tensor[B]``; ``FIMNormCallback`` and the models and
datamodules are the Lightning layer on top and are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from fimcb.attribution.influence import Influences, influence, top_influences
from fimcb.attribution.saliency import input_saliency, saliency_map
from fimcb.core.protocol import LikelihoodModel, ModelProtocolError
from fimcb.detectors import DETECTORS, Detector, build_detector
from fimcb.engine import LayerNorms, per_sample_layer_norms
from fimcb.evaluation.ood import OODResult, evaluate_ood, ood_measures
from fimcb.evaluation.scoring import ScoringOptions, layer_norms_over
from fimcb.metrics import Identity, Metric
from fimcb.run.history import load_history
from fimcb.run.summaries import summarize

__version__ = "0.1.0"

_LAZY = {"FIMNormCallback": "fimcb.lightning.callback", "TrainingSignals": "fimcb.lightning.signals"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fimcb' has no attribute {name!r}")


__all__ = [
    "DETECTORS",
    "Detector",
    "FIMNormCallback",
    "Identity",
    "Influences",
    "LayerNorms",
    "LikelihoodModel",
    "Metric",
    "ModelProtocolError",
    "OODResult",
    "ScoringOptions",
    "TrainingSignals",
    "build_detector",
    "evaluate_ood",
    "influence",
    "input_saliency",
    "layer_norms_over",
    "load_history",
    "ood_measures",
    "per_sample_layer_norms",
    "saliency_map",
    "summarize",
    "top_influences",
]
