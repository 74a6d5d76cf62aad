"""The metric interface: how a layer's per-sample gradients become one squared norm per sample.

A metric stands for an approximation of the Fisher information matrix F; the engine hands it
each parameter tensor's per-sample gradients ``[N, *shape]`` and it returns ``s_lᵀ F_l⁻¹ s_l``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn


class Metric(ABC):
    """Per-layer squared norm ``s_lᵀ F_l⁻¹ s_l`` of per-sample gradients under an approximation of F.

    Metrics with state estimate it in :meth:`fit` (from training data or model samples, see
    :mod:`fimcb.metrics.fitting`) and keep it in ``state_dict``; the others need no fit.
    """

    name: str = "metric"

    def fit(self, model: nn.Module, data: Iterable[Any] | None = None, **options: Any) -> Metric:
        """Estimate the metric's state for ``model``; a no-op for metrics without state."""
        return self

    @property
    def fitted(self) -> bool:
        """Whether the metric can turn gradients into norms (always, for metrics without state)."""
        return True

    @abstractmethod
    def squared_norms(self, name: str, grads: Tensor) -> Tensor:
        """Squared norms ``[N]`` of per-sample gradients ``grads`` ``[N, *shape]`` of parameter ``name``."""

    def diagonal(self, name: str) -> Tensor | float | None:
        """For a diagonal metric, the weights ``1 / F_jj`` of parameter ``name`` (a float when they are
        all equal), so that engines can skip materialising gradients; ``None`` for other metrics."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Fitted state, for saving next to a run (empty for metrics that need no fit)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        if state:
            raise ValueError(f"{self.name} has no fitted state, got keys {sorted(state)}")


def squared_row_norms(x: Tensor) -> Tensor:
    """``[N]`` squared Euclidean norm of each row of ``x`` ``[N, ...]``; ``vector_norm`` is one fused
    pass, many times faster on CPU than squaring into a temporary and summing it."""
    return torch.linalg.vector_norm(x.flatten(start_dim=1), dim=1).square()


class Identity(Metric):
    """F = I: the plain squared L2 norm of each parameter tensor's gradient (the paper's features)."""

    name = "identity"

    def squared_norms(self, name: str, grads: Tensor) -> Tensor:
        return squared_row_norms(grads)

    def diagonal(self, name: str) -> float:
        return 1.0


class Diagonal(Metric):
    """A given diagonal Fisher: ``Σ_j s_j² / (F_jj + damping)`` per parameter tensor.

    Args:
        fisher: diagonal of F per parameter name, each shaped like the parameter.
        damping: added to every diagonal entry (keeps near-zero entries from dominating).
    """

    name = "given_diagonal"

    def __init__(self, fisher: dict[str, Tensor], damping: float = 1e-8) -> None:
        if damping < 0:
            raise ValueError(f"damping must be >= 0, got {damping}")
        self.damping = damping
        self.weights = {name: 1.0 / (f.detach() + damping) for name, f in fisher.items()}
        bad = [n for n, w in self.weights.items() if not torch.isfinite(w).all() or (w < 0).any()]
        if bad:
            raise ValueError(f"the diagonal Fisher of {bad} has negative or zero entries; raise damping")

    def _weights(self, name: str) -> Tensor:
        if name not in self.weights:
            raise KeyError(f"no diagonal Fisher entry for parameter {name!r}")
        return self.weights[name]

    def squared_norms(self, name: str, grads: Tensor) -> Tensor:
        w = self._weights(name).to(grads.device, grads.dtype)
        return grads.flatten(start_dim=1).square() @ w.flatten()

    def diagonal(self, name: str) -> Tensor:
        return self._weights(name)

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.weights, "damping": self.damping}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weights, self.damping = state["weights"], state["damping"]


METRICS: dict[str, type[Metric]] = {"identity": Identity}


def resolve_metric(metric: Metric | str | None) -> Metric:
    """A metric from an instance, a registered name, or ``None`` (identity)."""
    if metric is None:
        return Identity()
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, str) and metric in METRICS:
        return METRICS[metric]()
    raise ValueError(f"unknown metric {metric!r}; use one of {sorted(METRICS)} or a fimcb.metrics.Metric")
