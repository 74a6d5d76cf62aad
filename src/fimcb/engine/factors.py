"""Per-group gradients of one parameter in factored form, and their squared norms.

A rule turns a layer's captured input activations and output gradients into one of these:
- :class:`OuterSum` — ``G_g = Σ_t u_t v_tᵀ`` (Linear, convolutions after unfolding): its squared
  norm is either the "ghost norm" ``⟨U Uᵀ, V Vᵀ⟩`` (cost ∝ T²) or ``||Uᵀ V||²`` after
  materialising (cost ∝ T·p·q), whichever is cheaper for the shapes;
- :class:`IndexSum` — ``G_g[v] = Σ_{t: idx_t = v} v_t`` (Embedding): ghost norm over equal indices;
- :class:`Dense` — the per-group gradient itself (normalisation layers, module-local fallback).
Groups of k samples are handled by concatenating their positions (``T`` becomes ``k·T``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fimcb.core.metric import Metric, squared_row_norms

# Materialised per-group gradients are produced this many floats at a time at most.
MATERIALISE_BUDGET = 1 << 26


class Factor(ABC):
    """The gradient of one parameter for each of ``G`` groups, kept in whatever form is cheapest."""

    @abstractmethod
    def groups(self, group_size: int) -> Factor:
        """Sum the gradients of consecutive samples in groups of ``group_size``."""

    @abstractmethod
    def dense(self, rows: slice) -> Tensor:
        """Materialised gradients of the groups in ``rows``, shape ``[g, *param_shape]``."""

    @abstractmethod
    def total(self) -> Tensor:
        """Sum over all groups (the batch gradient), to check the rule against autograd."""

    @property
    @abstractmethod
    def n_groups(self) -> int: ...

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    def ghost_norms(self) -> Tensor | None:
        """Squared Euclidean norms without materialising, or ``None`` when materialising is cheaper."""
        return None

    def diagonal_norms(self, weights: Tensor) -> Tensor | None:
        """``Σ_j w_j G_j²`` without materialising, or ``None`` when that is not cheaper."""
        return None

    def squared_norms(self, name: str, metric: Metric, shape: torch.Size) -> Tensor:
        """``[G]`` squared norms under ``metric``, by a shortcut where the metric's form allows one."""
        weights = metric.diagonal(name)
        shortcut = None
        if isinstance(weights, float):
            ghost = self.ghost_norms()
            shortcut = None if ghost is None else (ghost if weights == 1.0 else weights * ghost)
        elif isinstance(weights, Tensor):
            shortcut = self.diagonal_norms(weights.to(self.device).reshape(shape))
        if shortcut is not None:
            return shortcut
        step = max(1, MATERIALISE_BUDGET // max(1, shape.numel()))
        # Explicit row counts: "-1" is ambiguous for an empty parameter (a layer with no inputs).
        rows = [(s, min(step, self.n_groups - s)) for s in range(0, self.n_groups, step)]
        parts = [metric.squared_norms(name, self.dense(slice(s, s + n)).reshape(n, *shape)) for s, n in rows]
        return torch.cat(parts)

    @staticmethod
    def combine(factors: Sequence[Factor]) -> Factor:
        """One factor for a parameter whose module ran several times in the forward pass."""
        if len(factors) == 1:
            return factors[0]
        first = factors[0]
        if all(isinstance(f, OuterSum) and f.same_layout(first) for f in factors):  # type: ignore[arg-type]
            return OuterSum(torch.cat([f.u for f in factors], 1), torch.cat([f.v for f in factors], 1))  # type: ignore[attr-defined]
        n = first.n_groups
        return Dense(sum(f.dense(slice(0, n)) for f in factors))  # type: ignore[arg-type]


@dataclass
class OuterSum(Factor):
    """``G_g = Σ_t u_{g,t} v_{g,t}ᵀ`` with ``u`` ``[G, T, p]`` and ``v`` ``[G, T, q]``.

    ``route`` picks how the Euclidean norm is computed: ``"auto"`` by operation count, ``"ghost"``
    or ``"dense"`` as a rule measured for its shapes.
    """

    u: Tensor
    v: Tensor
    route: str = "auto"

    @property
    def n_groups(self) -> int:
        return self.u.shape[0]

    @property
    def device(self) -> torch.device:
        return self.u.device

    def diagonal_norms(self, weights: Tensor) -> Tensor | None:
        if self.u.shape[1] != 1:
            return None
        w = weights.reshape(self.u.shape[2], self.v.shape[2])  # (b∘b)ᵀ W (a∘a), one matrix product
        return ((self.u[:, 0].square() @ w) * self.v[:, 0].square()).sum(1)

    def same_layout(self, other: OuterSum) -> bool:
        return self.u.shape[2:] == other.u.shape[2:] and self.v.shape[2:] == other.v.shape[2:]

    def groups(self, group_size: int) -> OuterSum:
        return OuterSum(
            _group_positions(self.u, group_size), _group_positions(self.v, group_size), self.route
        )

    def dense(self, rows: slice) -> Tensor:
        return torch.einsum("gtp,gtq->gpq", self.u[rows], self.v[rows])

    def total(self) -> Tensor:
        return torch.einsum("gtp,gtq->pq", self.u, self.v)

    def ghost_norms(self) -> Tensor | None:
        t, p, q = self.u.shape[1], self.u.shape[2], self.v.shape[2]
        if t == 1:  # ||u vᵀ||² = ||u||² ||v||²
            return squared_row_norms(self.u) * squared_row_norms(self.v)
        if self.route == "dense" or (self.route == "auto" and t * t * (p + q) >= t * p * q):
            return None
        gram_u = torch.bmm(self.u, self.u.transpose(1, 2))
        gram_v = torch.bmm(self.v, self.v.transpose(1, 2))
        return (gram_u * gram_v).sum((1, 2))


@dataclass
class IndexSum(Factor):
    """``G_g[r] = Σ_{t: index_t = r} v_t``, ``index`` ``[G, T]``, ``v`` ``[G, T, d]``."""

    index: Tensor
    v: Tensor
    num_rows: int

    @property
    def n_groups(self) -> int:
        return self.v.shape[0]

    @property
    def device(self) -> torch.device:
        return self.v.device

    def groups(self, group_size: int) -> IndexSum:
        return IndexSum(
            _group_positions(self.index, group_size), _group_positions(self.v, group_size), self.num_rows
        )

    def dense(self, rows: slice) -> Tensor:
        index, v = self.index[rows], self.v[rows]
        out = v.new_zeros(v.shape[0], self.num_rows, v.shape[2])
        return out.scatter_add_(1, index.unsqueeze(-1).expand_as(v), v)

    def total(self) -> Tensor:
        return self.dense(slice(None)).sum(0)

    def ghost_norms(self) -> Tensor | None:
        t, d = self.v.shape[1], self.v.shape[2]
        if t * t >= self.num_rows * d:
            return None
        same = (self.index.unsqueeze(2) == self.index.unsqueeze(1)).to(self.v.dtype)
        return (same * torch.bmm(self.v, self.v.transpose(1, 2))).sum((1, 2))


@dataclass
class Dense(Factor):
    """Materialised per-group gradients ``[G, *param_shape]``."""

    grads: Tensor

    @property
    def n_groups(self) -> int:
        return self.grads.shape[0]

    @property
    def device(self) -> torch.device:
        return self.grads.device

    def diagonal_norms(self, weights: Tensor) -> Tensor:
        return self.grads.flatten(1).square() @ weights.flatten().to(self.grads.dtype)

    def groups(self, group_size: int) -> Dense:
        g = self.grads.shape[0] // group_size
        return Dense(self.grads[: g * group_size].reshape(g, group_size, *self.grads.shape[1:]).sum(1))

    def dense(self, rows: slice) -> Tensor:
        return self.grads[rows]

    def ghost_norms(self) -> Tensor:
        return squared_row_norms(self.grads)  # already materialised: nothing to avoid

    def total(self) -> Tensor:
        return self.grads.sum(0)


def _group_positions(x: Tensor, group_size: int) -> Tensor:
    """``[B, T, ...] -> [B // k, k·T, ...]``: a group's gradient sums over its samples' positions."""
    g = x.shape[0] // group_size
    return x[: g * group_size].reshape(g, group_size * x.shape[1], *x.shape[2:])
