"""Gradient engine: per-sample, per-layer squared norms of log-likelihood gradients."""

from fimcb.core.norms import LayerNorms
from fimcb.engine.api import (
    Engine,
    per_sample_gradients,
    per_sample_layer_norms,
    trainable_parameters,
)

__all__ = [
    "Engine",
    "LayerNorms",
    "per_sample_gradients",
    "per_sample_layer_norms",
    "trainable_parameters",
]
