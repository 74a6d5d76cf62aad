"""Per-group gradients of one parameter in factored form, and their squared norms.

A rule turns what it captured of a layer (inputs, output gradients) into one of these:
- :class:`OuterSum` — ``G_g = Σ_t u_t v_tᵀ`` (Linear, convolutions after unfolding, ``x @ W``): its
  squared norm is either the "ghost norm" ``⟨U Uᵀ, V Vᵀ⟩`` (cost ∝ T²) or ``||Uᵀ V||²`` after
  materialising (cost ∝ T·p·q), whichever is cheaper for the shapes; K-FAC reads its rows;
- :class:`IndexSum` — ``G_g[v] = Σ_{t: idx_t = v} v_t`` (Embedding): ghost norm over equal indices;
- :class:`Dense` — the per-group gradient itself (normalisation layers, the local fallbacks);
- :class:`Masked` — another factor times a fixed 0/1 mask (masked linear layers of autoregressive flows);
- :class:`Sum` — a parameter used in several places (tied weights): the sum of its parts, with cross
  terms by ghost inner products where the parts allow them.
Groups of k samples are handled by concatenating their positions (``T`` becomes ``k·T``).
"""

from __future__ import annotations

import enum
import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from fimcb.core.metric import Metric, squared_row_norms

# Materialised per-group gradients are produced this many floats at a time at most, and no more than the
# factor itself holds (its footprint), down to a floor below which more steps cost more than they save:
# so that norming a layer never takes much more memory than its activations.
MATERIALISE_BUDGET = 1 << 26
MATERIALISE_FLOOR = 1 << 18


class NormRoute(enum.Enum):
    """How an :class:`OuterSum` computes its Euclidean norms."""

    AUTO = "auto"  # by operation count
    GHOST = "ghost"  # Gram matrices of the rows, never the gradient
    DENSE = "dense"  # materialise the gradient by one batched product


class Factor(ABC):
    """The gradient of one parameter for each of ``G`` groups, kept in whatever form is cheapest."""

    @property
    @abstractmethod
    def n_groups(self) -> int: ...

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @abstractmethod
    def groups(self, group_size: int) -> Factor:
        """Sum the gradients of consecutive samples in groups of ``group_size``."""

    @abstractmethod
    def dense(self, rows: slice) -> Tensor:
        """Materialised gradients of the groups in ``rows``, shape ``[g, *matrix_shape]``."""

    def total(self) -> Tensor:
        """Sum over all groups (the batch gradient), to check the rule against autograd."""
        step = self.step(self.dense(slice(0, 1)).numel())
        return sum(self.dense(slice(s, s + step)).sum(0) for s in range(0, self.n_groups, step))  # type: ignore[return-value]

    def footprint(self) -> int:
        """Floats this factor holds (unknown: the budget), which bounds how many it materialises at once."""
        return MATERIALISE_BUDGET

    def step(self, per_group: int) -> int:
        """Groups to materialise at once, for gradients of ``per_group`` floats each."""
        floats = max(min(MATERIALISE_BUDGET, self.footprint()), MATERIALISE_FLOOR)
        return max(1, floats // max(1, per_group))

    def ghost_norms(self) -> Tensor | None:
        """Squared Euclidean norms without materialising, or ``None`` when materialising is cheaper."""
        return None

    def diagonal_norms(self, weights: Tensor) -> Tensor | None:
        """``Σ_j w_j G_j²`` without materialising, or ``None`` when that is not cheaper."""
        return None

    def ghost_inner(self, other: Factor) -> Tensor | None:
        """``[G]`` Euclidean inner products ``⟨self_g, other_g⟩`` without materialising, or ``None``."""
        return None

    def transposed(self) -> Factor:
        """The factor of the transposed matrix (a parameter used as ``W.T``)."""
        return _Lazy(self, lambda g: g.transpose(1, 2))

    def outer(self) -> OuterSum | None:
        """The outer-product form ``Σ_t u_t v_tᵀ`` of these gradients where the layer has one (K-FAC reads
        its rows)."""
        return None

    #: Whether several uses of a parameter combine by concatenating the positions of their outer forms
    #: (cheap where the form is already at hand; not for a bias or a convolution normed another way).
    concatenates = False

    def squared_norms(self, name: str, metric: Metric, shape: torch.Size) -> Tensor:
        """``[G]`` squared norms under ``metric``, by a shortcut where the metric's form allows one."""
        weights = metric.inverse_diagonal(name)
        shortcut = None
        if isinstance(weights, float):
            ghost = self.ghost_norms()
            shortcut = None if ghost is None else (ghost if weights == 1.0 else weights * ghost)
        elif isinstance(weights, Tensor):
            shortcut = self.diagonal_norms(weights.to(self.device).reshape(self.matrix_shape(shape)))
        if shortcut is not None:
            return shortcut
        step = self.step(shape.numel())
        # Explicit row counts: "-1" is ambiguous for an empty parameter (a layer with no inputs).
        rows = [(s, min(step, self.n_groups - s)) for s in range(0, self.n_groups, step)]
        parts = [metric.squared_norms(name, self.dense(slice(s, s + n)).reshape(n, *shape)) for s, n in rows]
        return torch.cat(parts) if parts else torch.zeros(0, device=self.device)

    def matrix_shape(self, shape: torch.Size) -> torch.Size:
        """The shape :meth:`dense` gives one group's gradient (the parameter's, or its matrix view)."""
        return shape

    @staticmethod
    def combine(factors: Sequence[Factor]) -> Factor:
        """One factor for a parameter used several times in the forward pass (calls, tied modules)."""
        if len(factors) == 1:
            return factors[0]
        outer = [f.outer() if f.concatenates else None for f in factors]
        present = [o for o in outer if o is not None]
        if len(present) == len(outer) and all(o.same_layout(present[0]) for o in present):
            first = outer[0]
            assert first is not None
            return OuterSum(
                torch.cat([f.u for f in outer], 1),  # type: ignore[union-attr]
                torch.cat([f.v for f in outer], 1),  # type: ignore[union-attr]
                first.route,
                first.input_side,
            )
        return Sum(tuple(factors))


@dataclass
class OuterSum(Factor):
    """``G_g = Σ_t u_{g,t} v_{g,t}ᵀ`` with ``u`` ``[G, T, p]`` and ``v`` ``[G, T, q]``.

    ``route`` picks how the Euclidean norm is computed (:class:`NormRoute`); ``input_side`` says which of
    ``u``, ``v`` holds the layer's inputs (the other its output gradients), for K-FAC.
    """

    u: Tensor
    v: Tensor
    route: NormRoute = NormRoute.AUTO
    input_side: Literal["u", "v"] = "v"
    concatenates = True

    @property
    def n_groups(self) -> int:
        return self.u.shape[0]

    @property
    def device(self) -> torch.device:
        return self.u.device

    def matrix_shape(self, shape: torch.Size) -> torch.Size:
        return torch.Size((self.u.shape[2], self.v.shape[2]))

    def footprint(self) -> int:
        return self.u.numel() + self.v.numel()

    def diagonal_norms(self, weights: Tensor) -> Tensor | None:
        if self.u.shape[1] != 1:
            return None
        w = weights.reshape(self.u.shape[2], self.v.shape[2])  # (b∘b)ᵀ W (a∘a), one matrix product
        return ((self.u[:, 0].square() @ w.to(self.u.dtype)) * self.v[:, 0].square()).sum(1)

    def same_layout(self, other: OuterSum) -> bool:
        return (
            self.u.shape[2:] == other.u.shape[2:]
            and self.v.shape[2:] == other.v.shape[2:]
            and self.input_side == other.input_side
        )

    def groups(self, group_size: int) -> OuterSum:
        return OuterSum(
            _group_positions(self.u, group_size),
            _group_positions(self.v, group_size),
            self.route,
            self.input_side,
        )

    def dense(self, rows: slice) -> Tensor:
        return torch.einsum("gtp,gtq->gpq", self.u[rows], self.v[rows])

    def total(self) -> Tensor:
        return torch.einsum("gtp,gtq->pq", self.u, self.v)

    def transposed(self) -> OuterSum:
        return OuterSum(self.v, self.u, self.route, "u" if self.input_side == "v" else "v")

    def outer(self) -> OuterSum:
        return self

    def ghost_norms(self) -> Tensor | None:
        t, p, q = self.u.shape[1], self.u.shape[2], self.v.shape[2]
        if t == 1:  # ||u vᵀ||² = ||u||² ||v||²
            return squared_row_norms(self.u) * squared_row_norms(self.v)
        if self.route is NormRoute.DENSE or (self.route is NormRoute.AUTO and t * t * (p + q) >= t * p * q):
            return None
        gram_u = torch.bmm(self.u, self.u.transpose(1, 2))
        gram_v = torch.bmm(self.v, self.v.transpose(1, 2))
        return (gram_u * gram_v).sum((1, 2))

    def ghost_inner(self, other: Factor) -> Tensor | None:
        if isinstance(other, Spanned):
            return other.ghost_inner(self)
        if isinstance(other, OuterSum) and self.same_layout(other):
            cross_u = torch.bmm(self.u, other.u.transpose(1, 2))  # [G, T, S]
            cross_v = torch.bmm(self.v, other.v.transpose(1, 2))
            return (cross_u * cross_v).sum((1, 2))
        if isinstance(other, IndexSum) and (self.u.shape[2], self.v.shape[2]) == (
            other.num_rows,
            other.v.shape[2],
        ):
            # <Σ_t u_t v_tᵀ, Σ_s e_{i_s} w_sᵀ> = Σ_{t,s} u_t[i_s] (v_t · w_s)
            picked = torch.gather(self.u, 2, other.index.unsqueeze(1).expand(-1, self.u.shape[1], -1))
            return (picked * torch.bmm(self.v, other.v.transpose(1, 2))).sum((1, 2))
        return None


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

    def matrix_shape(self, shape: torch.Size) -> torch.Size:
        return torch.Size((self.num_rows, self.v.shape[2]))

    def groups(self, group_size: int) -> IndexSum:
        return IndexSum(
            _group_positions(self.index, group_size), _group_positions(self.v, group_size), self.num_rows
        )

    def dense(self, rows: slice) -> Tensor:
        index, v = self.index[rows], self.v[rows]
        out = v.new_zeros(v.shape[0], self.num_rows, v.shape[2])
        return out.scatter_add_(1, index.unsqueeze(-1).expand_as(v), v)

    def ghost_norms(self) -> Tensor | None:
        t, d = self.v.shape[1], self.v.shape[2]
        if t * t >= self.num_rows * d:
            return None
        same = (self.index.unsqueeze(2) == self.index.unsqueeze(1)).to(self.v.dtype)
        return (same * torch.bmm(self.v, self.v.transpose(1, 2))).sum((1, 2))

    def ghost_inner(self, other: Factor) -> Tensor | None:
        if isinstance(other, OuterSum):
            return other.ghost_inner(self)
        if isinstance(other, IndexSum) and other.v.shape[2] == self.v.shape[2]:
            same = (self.index.unsqueeze(2) == other.index.unsqueeze(1)).to(self.v.dtype)
            return (same * torch.bmm(self.v, other.v.transpose(1, 2))).sum((1, 2))
        return None


@dataclass
class Dense(Factor):
    """Materialised per-group gradients ``[G, *param_shape]``."""

    grads: Tensor

    @property
    def n_groups(self) -> int:
        return self.grads.shape[0]

    def footprint(self) -> int:
        return self.grads.numel()

    @property
    def device(self) -> torch.device:
        return self.grads.device

    def diagonal_norms(self, weights: Tensor) -> Tensor:
        return self.grads.reshape(self.n_groups, -1).square() @ weights.flatten().to(self.grads.dtype)

    def groups(self, group_size: int) -> Dense:
        g = self.grads.shape[0] // group_size
        return Dense(self.grads[: g * group_size].reshape(g, group_size, *self.grads.shape[1:]).sum(1))

    def dense(self, rows: slice) -> Tensor:
        return self.grads[rows]

    def ghost_norms(self) -> Tensor:
        return squared_row_norms(self.grads)  # already materialised: nothing to avoid

    def total(self) -> Tensor:
        return self.grads.sum(0)


@dataclass
class Blockwise(Factor):
    """Per-group gradients formed densely a block of samples at a time by ``make(samples) -> [n, *shape]``,
    never all at once: for a layer whose gradients are fastest to materialise but larger than what it
    holds (``footprint`` floats: its inputs and output gradients)."""

    make: Callable[[slice], Tensor]
    n_samples: int
    shape: torch.Size  # of one sample's gradient
    held: int
    like: Tensor  # any tensor of the gradients' dtype and device
    group_size: int = 1

    @property
    def n_groups(self) -> int:
        return self.n_samples // self.group_size

    @property
    def device(self) -> torch.device:
        return self.like.device

    def footprint(self) -> int:
        return self.held

    def groups(self, group_size: int) -> Blockwise:
        return Blockwise(
            self.make, self.n_samples, self.shape, self.held, self.like, self.group_size * group_size
        )

    def dense(self, rows: slice) -> Tensor:
        start, stop, step = rows.indices(self.n_groups)
        k, n = self.group_size, max(0, stop - start)
        if step != 1:
            raise ValueError("Blockwise gradients are read in contiguous blocks")
        if n == 0:
            return self.like.new_zeros(0, *self.shape)
        grads = self.make(slice(start * k, (start + n) * k))
        return grads.reshape(n, k, *grads.shape[1:]).sum(1) if k > 1 else grads

    def _per_block(self, norms: Callable[[Tensor], Tensor]) -> Tensor:
        step = self.step(self.shape.numel())
        parts = [norms(self.dense(slice(s, s + step))) for s in range(0, self.n_groups, step)]
        return torch.cat(parts) if parts else self.like.new_zeros(0)

    def ghost_norms(self) -> Tensor:
        return self._per_block(squared_row_norms)

    def diagonal_norms(self, weights: Tensor) -> Tensor:
        return self._per_block(lambda block: Dense(block).diagonal_norms(weights))


@dataclass
class Masked(Factor):
    """``mask ⊙ G_g`` for a fixed 0/1 ``mask`` shaped like the parameter (``y = x (W ⊙ M)ᵀ``)."""

    inner: Factor
    mask: Tensor

    @property
    def n_groups(self) -> int:
        return self.inner.n_groups

    def footprint(self) -> int:
        return self.inner.footprint()

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def groups(self, group_size: int) -> Masked:
        return Masked(self.inner.groups(group_size), self.mask)

    def dense(self, rows: slice) -> Tensor:
        g = self.inner.dense(rows)
        return g * self.mask.to(g.dtype).reshape(g.shape[1:])

    def diagonal_norms(self, weights: Tensor) -> Tensor | None:
        return self.inner.diagonal_norms(weights * self.mask.reshape(weights.shape).to(weights.dtype))

    def ghost_norms(self) -> Tensor | None:  # M ⊙ M = M: the masked norm is a diagonal norm
        return self.inner.diagonal_norms(self.mask.float())

    def outer(self) -> OuterSum | None:  # K-FAC's statistics are those of the unmasked layer
        return self.inner.outer()


@dataclass
class Sum(Factor):
    """``Σ_i part_i``: a parameter reached in several forms (an embedding tied to an output layer).

    Euclidean norms expand ``||Σ a_i||² = Σ ||a_i||² + 2 Σ_{i<j} ⟨a_i, a_j⟩`` when every part has a ghost
    norm and every pair a ghost inner product; otherwise the sum is materialised a few groups at a time.
    """

    parts: tuple[Factor, ...]

    @property
    def n_groups(self) -> int:
        return self.parts[0].n_groups

    def footprint(self) -> int:
        return sum(p.footprint() for p in self.parts)

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    def groups(self, group_size: int) -> Sum:
        return Sum(tuple(p.groups(group_size) for p in self.parts))

    def dense(self, rows: slice) -> Tensor:
        out = self.parts[0].dense(rows).clone()
        for part in self.parts[1:]:
            out += part.dense(rows).reshape(out.shape)
        return out

    def ghost_norms(self) -> Tensor | None:
        # The cross terms first: a part without ghost inner products (a materialised one) says so at once,
        # before any part's own norms are computed for nothing.
        total: Tensor | None = None
        for a, b in itertools.combinations(self.parts, 2):
            inner = a.ghost_inner(b)
            if inner is None:
                return None
            total = 2 * inner if total is None else total + 2 * inner
        for part in self.parts:
            norms = part.ghost_norms()
            if norms is None:
                return None
            total = norms if total is None else total + norms
        return total


@dataclass
class Spanned(Factor):
    """``G_g = Σ_k c_{g,k} J_k``: per-sample gradients in the span of fixed directions ``J`` ``[K, *shape]``
    (the Jacobian rows of a scalar log-determinant or a learned scale, weighted by each sample's cotangent
    ``c`` ``[G, K]``). Norms come from the ``K × K`` Gram matrix of the directions."""

    coef: Tensor
    basis: Tensor

    @property
    def n_groups(self) -> int:
        return self.coef.shape[0]

    @property
    def device(self) -> torch.device:
        return self.coef.device

    def groups(self, group_size: int) -> Spanned:
        g = self.coef.shape[0] // group_size
        return Spanned(self.coef[: g * group_size].reshape(g, group_size, -1).sum(1), self.basis)

    def dense(self, rows: slice) -> Tensor:
        flat = self.coef[rows].to(self.basis.dtype) @ self.basis.reshape(self.basis.shape[0], -1)
        return flat.reshape(-1, *self.basis.shape[1:])

    def total(self) -> Tensor:
        return (self.coef.sum(0).to(self.basis.dtype) @ self.basis.reshape(self.basis.shape[0], -1)).reshape(
            self.basis.shape[1:]
        )

    def _quadratic(self, gram: Tensor) -> Tensor:
        c = self.coef.to(gram.dtype)
        return ((c @ gram) * c).sum(1)

    def ghost_norms(self) -> Tensor:
        flat = self.basis.reshape(self.basis.shape[0], -1)
        return self._quadratic(flat @ flat.T)

    def diagonal_norms(self, weights: Tensor) -> Tensor:
        flat = self.basis.reshape(self.basis.shape[0], -1)
        return self._quadratic((flat * weights.reshape(1, -1).to(flat.dtype)) @ flat.T)

    def ghost_inner(self, other: Factor) -> Tensor | None:
        outer = other.outer() if other.concatenates else None
        if (
            outer is None
            or self.basis.ndim != 3
            or self.basis.shape[1:] != (outer.u.shape[2], outer.v.shape[2])
        ):
            return None
        # <Σ_k c_k J_k, Σ_t u_t v_tᵀ> = Σ_k c_k Σ_t u_tᵀ J_k v_t
        products = torch.einsum("gtp,kpq,gtq->gk", outer.u, self.basis.to(outer.u.dtype), outer.v)
        return (products * self.coef.to(products.dtype)).sum(1)


@dataclass
class _Lazy(Factor):
    """A factor seen through a per-group reshaping of its dense gradients (a transpose, a view)."""

    inner: Factor
    view: object  # Callable[[Tensor], Tensor], applied to [g, ...] blocks

    @property
    def n_groups(self) -> int:
        return self.inner.n_groups

    def footprint(self) -> int:
        return self.inner.footprint()

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def groups(self, group_size: int) -> _Lazy:
        return _Lazy(self.inner.groups(group_size), self.view)

    def dense(self, rows: slice) -> Tensor:
        return self.view(self.inner.dense(rows))  # type: ignore[operator]

    def ghost_norms(self) -> Tensor | None:  # a permutation of entries keeps the Euclidean norm
        return self.inner.ghost_norms()


@dataclass
class BiasSum(Factor):
    """A bias's per-sample gradients ``G_g = Σ_t u_{g,t}`` over the positions of its layer, ``u``
    ``[G, T, p]``: a layer whose input is fixed at 1, which is how K-FAC sees it (:meth:`outer`)."""

    u: Tensor

    @property
    def n_groups(self) -> int:
        return self.u.shape[0]

    @property
    def device(self) -> torch.device:
        return self.u.device

    def groups(self, group_size: int) -> BiasSum:
        return BiasSum(_group_positions(self.u, group_size))

    def dense(self, rows: slice) -> Tensor:
        return self.u[rows].sum(1)

    def total(self) -> Tensor:
        return self.u.sum((0, 1))

    def ghost_norms(self) -> Tensor:
        return squared_row_norms(self.u.sum(1))

    def diagonal_norms(self, weights: Tensor) -> Tensor:
        return self.u.sum(1).square() @ weights.flatten().to(self.u.dtype)

    def outer(self) -> OuterSum:
        return OuterSum(self.u, self.u.new_ones(*self.u.shape[:2], 1))


def _group_positions(x: Tensor, group_size: int) -> Tensor:
    """``[B, T, ...] -> [B // k, k·T, ...]``: a group's gradient sums over its samples' positions."""
    g = x.shape[0] // group_size
    return x[: g * group_size].reshape(g, group_size * x.shape[1], *x.shape[2:])
