"""The metric interface: how a layer's per-sample gradients become one squared norm per sample.

A metric stands for an approximation of the Fisher information matrix F; the engine hands it
each parameter tensor's per-sample gradients ``[N, *shape]`` and it returns ``s_lᵀ F_l⁻¹ s_l``.
The same metric gives inner products ``s_aᵀ F_l⁻¹ s_b`` between two sets of samples (influence).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from fimcb.core.protocol import LogLikelihoodFn
from fimcb.core.registry import register


class Metric(ABC):
    """Per-layer squared norm ``s_lᵀ F_l⁻¹ s_l`` of per-sample gradients under an approximation of F.

    Metrics with state estimate it in :meth:`fit` (from training data or model samples, see
    :mod:`fimcb.metrics.fitting`) and keep it in ``state_dict``; the others need no fit.
    """

    name: str = "metric"

    def fit(
        self,
        model: nn.Module,
        data: Iterable[Any] | None = None,
        log_likelihood: LogLikelihoodFn | None = None,
    ) -> Metric:
        """Estimate the metric's state for ``model`` from ``data`` (scored by ``log_likelihood``, default
        the model's own); a no-op for metrics without state."""
        return self

    @property
    def fitted(self) -> bool:
        """Whether the metric can turn gradients into norms (always, for metrics without state)."""
        return True

    @abstractmethod
    def squared_norms(self, name: str, grads: Tensor) -> Tensor:
        """Squared norms ``[N]`` of per-sample gradients ``grads`` ``[N, *shape]`` of parameter ``name``."""

    def inner_products(self, name: str, a: Tensor, b: Tensor) -> Tensor:
        """``[A, B]`` inner products ``a_iᵀ F_l⁻¹ b_j`` of per-sample gradients ``a`` ``[A, *shape]`` and
        ``b`` ``[B, *shape]`` of parameter ``name``; the diagonal of ``inner_products(a, a)`` is
        ``squared_norms(a)``.

        This default weights one side and takes one matrix product for a diagonal metric (one whose
        :meth:`inverse_diagonal` gives weights), else polarises :meth:`squared_norms` (exact for any metric,
        at the cost of two norms per pair); structured metrics override it.
        """
        a, b = check_pair(name, a, b)
        weights = self.inverse_diagonal(name)
        if weights is None:
            return polarised_inner_products(self, name, a, b)
        if isinstance(weights, Tensor):
            weights = weights.to(a.device, a.dtype).flatten()
        return (as_rows(a) * weights) @ as_rows(b).T

    def inverse_diagonal(self, name: str) -> Tensor | float | None:
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


def as_rows(x: Tensor) -> Tensor:
    """``[N, d]``: each of the N per-sample gradients ``x`` ``[N, *shape]`` flattened into a row (a 0-dim
    parameter's gradients ``[N]`` become ``[N, 1]``)."""
    return x.flatten(start_dim=1) if x.ndim > 1 else x.unsqueeze(1)


def squared_row_norms(x: Tensor) -> Tensor:
    """``[N]`` squared Euclidean norm of each row of ``x`` ``[N, ...]``; ``vector_norm`` is one fused
    pass, many times faster on CPU than squaring into a temporary and summing it."""
    return torch.linalg.vector_norm(as_rows(x), dim=1).square()


def check_pair(name: str, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """``a`` and ``b`` in their common dtype, after checking that they are batches of gradients of one
    parameter shape (``[A, *shape]`` and ``[B, *shape]``)."""
    if a.ndim < 1 or b.ndim < 1 or a.shape[1:] != b.shape[1:]:
        raise ValueError(
            f"inner products of {name!r} need gradients [A, *shape] and [B, *shape] of one parameter "
            f"shape, got {list(a.shape)} and {list(b.shape)}"
        )
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


# Elements of a, b (each) combined per chunk of pairs by :func:`polarised_inner_products`.
POLARISATION_CHUNK_ELEMENTS = 1 << 22


def polarised_inner_products(
    metric: Metric, name: str, a: Tensor, b: Tensor, *, chunk_elements: int = POLARISATION_CHUNK_ELEMENTS
) -> Tensor:
    """``[A, B]`` inner products from squared norms alone, ``(|a_i + b_j|² − |a_i − b_j|²) / 4``, taking
    pairs ``(i, j)`` in chunks of about ``chunk_elements`` gradient entries to bound memory."""
    a, b = check_pair(name, a, b)
    n_a, n_b = a.shape[0], b.shape[0]
    out = a.new_empty(n_a * n_b)
    chunk = max(1, chunk_elements // max(1, a.shape[1:].numel()))
    for start in range(0, n_a * n_b, chunk):
        pairs = torch.arange(start, min(start + chunk, n_a * n_b), device=a.device)
        x, y = a[pairs // n_b], b[pairs % n_b]
        plus, minus = metric.squared_norms(name, x + y), metric.squared_norms(name, x - y)
        out[start : start + len(pairs)] = (plus - minus) / 4
    return out.reshape(n_a, n_b)


class Identity(Metric):
    """F = I: the plain squared L2 norm of each parameter tensor's gradient (the paper's features)."""

    name = "identity"

    def squared_norms(self, name: str, grads: Tensor) -> Tensor:
        return squared_row_norms(grads)

    def inverse_diagonal(self, name: str) -> float:
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
        return as_rows(grads).square() @ w.flatten()

    def inverse_diagonal(self, name: str) -> Tensor:
        return self._weights(name)

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.weights, "damping": self.damping}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weights, self.damping = state["weights"], state["damping"]


#: Metrics by name, for ``metric="kfac"`` in Python and YAML; :mod:`fimcb.metrics` registers the fitted
#: ones when it is imported (``import fimcb`` does).
METRICS: dict[str, type[Metric]] = {}


def register_metric(metric: type[Metric], *, overwrite: bool = False) -> type[Metric]:
    """Make ``metric`` available by its ``name``; refuses to replace another one unless ``overwrite``."""
    register(METRICS, metric, metric.name, what="a metric named", overwrite=overwrite)
    return metric


register_metric(Identity)


def resolve_metric(metric: Metric | str | None) -> Metric:
    """A metric from an instance, a registered name, or ``None`` (identity)."""
    if metric is None:
        return Identity()
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, str) and metric in METRICS:
        return METRICS[metric]()
    raise ValueError(
        f"unknown metric {metric!r}; use one of {sorted(METRICS)} or a fimcb.metrics.Metric "
        "(the fitted ones are registered by importing fimcb.metrics)"
    )
