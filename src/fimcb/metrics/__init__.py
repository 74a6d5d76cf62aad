"""Approximations of the Fisher information matrix ("metrics") that turn per-sample gradients into norms."""

from fimcb.metrics.base import Diagonal, Identity, Metric, resolve_metric

__all__ = ["Diagonal", "Identity", "Metric", "resolve_metric"]
