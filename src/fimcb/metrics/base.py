"""The metric interface: how a layer's per-sample gradients become one squared norm per sample.

A metric stands for an approximation of the Fisher information matrix F; the engine hands it
each parameter tensor's per-sample gradients ``[N, *shape]`` and it returns ``s_lᵀ F_l⁻¹ s_l``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from torch import Tensor


class Metric(ABC):
    """Per-layer squared norm ``s_lᵀ F_l⁻¹ s_l`` of per-sample gradients under an approximation of F."""

    name: str = "metric"

    @abstractmethod
    def squared_norms(self, name: str, grads: Tensor) -> Tensor:
        """Squared norms ``[N]`` of per-sample gradients ``grads`` ``[N, *shape]`` of parameter ``name``."""

    def state_dict(self) -> dict[str, Any]:
        """Fitted state, for saving next to a run (empty for metrics that need no fit)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        if state:
            raise ValueError(f"{self.name} has no fitted state, got keys {sorted(state)}")


class Identity(Metric):
    """F = I: the plain squared L2 norm of each parameter tensor's gradient (the paper's features)."""

    name = "identity"

    def squared_norms(self, name: str, grads: Tensor) -> Tensor:
        return grads.flatten(start_dim=1).pow(2).sum(dim=1)


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
