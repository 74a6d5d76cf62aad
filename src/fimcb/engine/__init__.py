"""Gradient engine: per-sample, per-layer squared norms of log-likelihood gradients."""

from fimcb.engine.api import Engine, eval_mode, grad_enabled, per_sample_gradients, per_sample_layer_norms
from fimcb.engine.types import LayerNorms

__all__ = [
    "Engine",
    "LayerNorms",
    "eval_mode",
    "grad_enabled",
    "per_sample_gradients",
    "per_sample_layer_norms",
]
