"""Gradient engine: per-sample, per-layer squared norms of log-likelihood gradients."""

from fimcb.core.norms import LayerNorms
from fimcb.engine.api import (
    Engine,
    capture_factors,
    per_sample_gradients,
    per_sample_layer_norms,
    trainable_parameters,
)
from fimcb.engine.capture import Capture, Route, UnsupportedModelError, describe_routes

__all__ = [
    "Capture",
    "Engine",
    "LayerNorms",
    "Route",
    "UnsupportedModelError",
    "capture_factors",
    "describe_routes",
    "per_sample_gradients",
    "per_sample_layer_norms",
    "trainable_parameters",
]
