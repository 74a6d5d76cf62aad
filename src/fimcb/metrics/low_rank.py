"""The "full" metric: per layer, ``F_l ≈ δ_l·I + (1/N) Σ_i s_i s_iᵀ`` over N reference gradients.

Scored through the Woodbury identity, ``sᵀF⁻¹s = (1/δ)(||s||² − kᵀ(NδI + K)⁻¹k)`` with
``K_ij = s_i·s_j`` and ``k_i = s_i·s``: a Cholesky factor of ``NδI + K`` is computed once at fit,
so scoring costs one ``[B, d] × [d, N]`` product and a triangular solve per layer. The difference
``||s||² − kᵀ(…)⁻¹k`` cancels when ``s`` lies near the span of the references, so it is computed
in float64 (the references themselves are kept in the gradients' dtype).

Options that bound the cost:
- ``projection_dim=r``: layers with more than ``r`` coordinates keep count-sketched gradients ``P s``
  (:class:`CountSketch`) for references and scored samples alike, i.e. the metric is then the
  low-rank form of the sketched gradients, an approximation of the unsketched one (inner products
  are preserved in expectation, with relative spread about ``√(2/r)``). Layers with ``d ≤ r`` are
  exact.
- ``online=True``: the Sherman–Morrison form (docs/method.md §3): the inverse of
  ``NδI + Σ_i s_i s_iᵀ`` is updated one reference at a time in the (sketched) ``m``-space, so memory
  is ``m²`` per layer whatever N is; it equals the batch Woodbury result up to rounding. Since N
  and δ must be known before the first update, it first takes one cheap pass of squared norms over
  the same Fisher inputs (``data`` must yield the same samples twice: a loader without shuffling).

Distributed training: each rank fits on the references it is given (its own shard of ``data``),
then every rank takes rank zero's fitted state (one broadcast), so that all ranks score with the same
metric, whose references are rank zero's N samples.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from fimcb.core.checks import check_bool, check_int, check_positive_float
from fimcb.core.distributed import agreed, broadcast_from_zero
from fimcb.core.metric import as_rows, check_pair, squared_row_norms
from fimcb.core.protocol import LogLikelihoodFn
from fimcb.engine import per_sample_gradients, per_sample_layer_norms
from fimcb.metrics.base import FittedMetric, layer_dampings

# Largest (sketched) layer size for which ``online=True`` keeps a dense m×m inverse (128 MiB in float64).
ONLINE_MAX_DIM = 4096


@dataclass
class CountSketch:
    """A random linear map ``P: R^d → R^r``: coordinate ``j`` is added, with sign ``sign[j]``, to bucket
    ``bucket[j]``. Memory O(d) small integers instead of an ``r×d`` matrix; ``E[⟨Px, Py⟩] = ⟨x, y⟩``."""

    bucket: Tensor  # [d] int32 in [0, r)
    sign: Tensor  # [d] int8, ±1
    dim: int  # r

    @staticmethod
    def draw(d: int, r: int, generator: torch.Generator, device: torch.device | None = None) -> CountSketch:
        """A sketch from the CPU ``generator`` (the same on every device), stored on ``device``."""
        bucket = torch.randint(0, r, (d,), generator=generator, dtype=torch.int32)
        sign = (2 * torch.randint(0, 2, (d,), generator=generator) - 1).to(torch.int8)
        return CountSketch(bucket.to(device), sign.to(device), r)

    def __call__(self, x: Tensor) -> Tensor:
        """``[B, r]`` sketches of the rows of ``x`` ``[B, d]``."""
        bucket, sign = self.bucket.to(x.device), self.sign.to(x.device, x.dtype)
        return x.new_zeros(x.shape[0], self.dim).index_add_(1, bucket, x * sign)


def _project(grads: Tensor, sketch: CountSketch | None) -> Tensor:
    """``[B, m]`` gradients, flattened and (for a sketched layer) sketched."""
    flat = as_rows(grads)
    return flat if sketch is None else sketch(flat)


@dataclass
class _Layer:
    """What one layer needs to score: its damping, an optional sketch, and either the references with
    the Cholesky factor of ``NδI + K`` (batch) or the inverse of F itself (online)."""

    delta: float
    sketch: CountSketch | None
    refs: Tensor | None = None  # [N, m]
    cholesky: Tensor | None = None  # [N, N] float64, lower
    inverse: Tensor | None = None  # [m, m] float64, F⁻¹

    def squared_norms(self, grads: Tensor) -> Tensor:
        s = _project(grads, self.sketch).double()
        if self.inverse is not None:
            q = ((s @ self.inverse.to(s.device)) * s).sum(1)
        else:
            q = (squared_row_norms(s) - self._solved(s).square().sum(0)) / self.delta
        return q.clamp_min(0.0).to(grads.dtype)  # F is positive definite: only rounding goes below 0

    def inner_products(self, a: Tensor, b: Tensor) -> Tensor:
        """``[A, B]`` products ``s_aᵀ F⁻¹ s_b`` (Woodbury: ``(s_a·s_b − v_a·v_b)/δ``); when ``b is a``, the
        diagonal is clamped at zero as :meth:`squared_norms` is, so it equals the squared norms."""
        sa = _project(a, self.sketch).double()
        sb = sa if b is a else _project(b, self.sketch).double()
        if self.inverse is not None:
            q = sa @ self.inverse.to(sa.device) @ sb.T
        else:
            va = self._solved(sa)
            vb = va if sb is sa else self._solved(sb)
            q = (sa @ sb.T - va.T @ vb) / self.delta
        if b is a:
            q.diagonal().clamp_(min=0.0)
        return q.to(a.dtype)

    def _solved(self, s: Tensor) -> Tensor:
        """``[N, B]`` ``v = L⁻¹ k`` with ``k_i = s_i·s`` for each row of ``s`` and ``L Lᵀ = NδI + K``, so that
        ``sᵀ F⁻¹ s' = (s·s' − v·v')/δ`` (the batch Woodbury form)."""
        assert self.refs is not None and self.cholesky is not None
        k = s @ self.refs.to(s.device, torch.float64).T
        return torch.linalg.solve_triangular(self.cholesky.to(s.device), k.T, upper=False)

    def state(self) -> dict[str, Any]:
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        state["sketch"] = None if self.sketch is None else vars(self.sketch)
        return state

    @staticmethod
    def from_state(state: dict[str, Any]) -> _Layer:
        sketch = state["sketch"]
        return _Layer(**{**state, "sketch": None if sketch is None else CountSketch(**sketch)})


class LowRank(FittedMetric):
    """``s_lᵀ F_l⁻¹ s_l`` with ``F_l = δ_l·I + (1/N) Σ_i s_i s_iᵀ`` over N reference gradients per layer.

    Args:
        fisher: ``"empirical"`` (references from ``data``) or ``"true"`` (samples of the model).
        n_reference: N, the number of reference samples (fewer if the data runs out).
        damping: δ, or with ``relative_damping`` (the default) the factor
            ``δ_l = damping × mean_i ||s_i||² / d_l`` (the layer's mean diagonal Fisher entry):
            scale-free, and it sets how much directions no reference spans count.
        relative_damping: whether ``damping`` is relative to each layer's mean diagonal entry.
        projection_dim: r; layers with more than r coordinates are count-sketched to r (an
            approximation, see the module docstring); ``None`` keeps every layer exact.
        online: update the inverse one reference at a time (Sherman–Morrison) instead of storing the
            references; needs every (sketched) layer to have at most ``ONLINE_MAX_DIM`` coordinates.
        seed: seed of the model samples and of the sketches.
        batch_size: batch size of the model samples (the true Fisher).

    Memory (batch form): N × (number of parameters, or r per sketched layer) stored gradients.
    """

    name = "low_rank"

    def __init__(
        self,
        fisher: str = "empirical",
        n_reference: int = 256,
        damping: float = 1e-3,
        relative_damping: bool = True,
        projection_dim: int | None = None,
        online: bool = False,
        seed: int = 0,
        batch_size: int = 64,
    ) -> None:
        super().__init__(fisher, check_int("n_reference", n_reference), batch_size, seed)
        self.damping = check_positive_float("damping", damping)
        self.relative_damping = check_bool("relative_damping", relative_damping)
        self.projection_dim = None if projection_dim is None else check_int("projection_dim", projection_dim)
        self.online = check_bool("online", online)
        self.layers: dict[str, _Layer] = {}

    def options(self) -> dict[str, Any]:
        options = super().options()
        return {
            **{k: v for k, v in options.items() if k != "n_samples"},
            "n_reference": options["n_samples"],
            "damping": self.damping,
            "relative_damping": self.relative_damping,
            "projection_dim": self.projection_dim,
            "online": self.online,
        }

    def fit(
        self,
        model: nn.Module,
        data: Iterable[Any] | None = None,
        log_likelihood: LogLikelihoodFn | None = None,
    ) -> LowRank:
        params = self._parameters(model)
        sketches = self._sketches(params)
        fit = self._fit_online if self.online else self._fit_batch
        self.layers = agreed(lambda: fit(model, data, log_likelihood, params, sketches))
        self.dims = {name: p.numel() for name, p in params.items()}
        shared = broadcast_from_zero(self.state_dict())  # every DDP rank scores with rank zero's metric
        if shared is not None:
            self.load_state_dict(shared)
        return self

    def _fit_batch(
        self,
        model: nn.Module,
        data: Iterable[Any] | None,
        log_likelihood: LogLikelihoodFn | None,
        params: dict[str, nn.Parameter],
        sketches: dict[str, CountSketch | None],
    ) -> dict[str, _Layer]:
        """One pass: keep the (sketched) references, then factor ``NδI + K`` per layer."""
        refs: dict[str, list[Tensor]] = {name: [] for name in params}
        totals = {n: torch.zeros((), dtype=torch.float64, device=p.device) for n, p in params.items()}
        count = 0
        for x in self._inputs(model, data):
            for grads, ll in per_sample_gradients(model, x, log_likelihood=log_likelihood):
                for name, g in grads.items():
                    totals[name] += squared_row_norms(g).double().sum()
                    refs[name].append(_project(g, sketches[name]))
                count += len(ll)
        deltas = self._deltas(totals, count, params)
        return {n: _woodbury(torch.cat(refs[n]), deltas[n], sketches[n]) for n in params}

    def _fit_online(
        self,
        model: nn.Module,
        data: Iterable[Any] | None,
        log_likelihood: LogLikelihoodFn | None,
        params: dict[str, nn.Parameter],
        sketches: dict[str, CountSketch | None],
    ) -> dict[str, _Layer]:
        """Two passes: squared norms (N and δ_l, cheap), then Sherman–Morrison updates per reference."""
        dims = {n: p.numel() if (s := sketches[n]) is None else s.dim for n, p in params.items()}
        too_big = {n: d for n, d in dims.items() if d > ONLINE_MAX_DIM}
        if too_big:
            raise ValueError(
                f"online=True keeps an m×m inverse per layer, but {too_big} have more than "
                f"{ONLINE_MAX_DIM} coordinates: set projection_dim <= {ONLINE_MAX_DIM}"
            )
        if self.fisher == "empirical" and data is not None and iter(data) is data:
            raise ValueError(
                "online=True reads the data twice, but got a one-shot iterator: pass a re-iterable (a "
                "list of batches, or a loader without shuffling) that yields the same samples each time"
            )
        sums, count = torch.zeros(len(params), dtype=torch.float64), 0
        for x in self._inputs(model, data):
            norms = per_sample_layer_norms(model, x, metric="identity", log_likelihood=log_likelihood)
            sums += norms.values.double().sum(0).cpu()
            count += len(norms)
        deltas = self._deltas(dict(zip(norms.names, sums, strict=True)), count, params)
        inverses = {n: _SequentialInverse(count, deltas[n], dims[n], p.device) for n, p in params.items()}
        seen = 0
        for x in self._inputs(model, data):
            for grads, ll in per_sample_gradients(model, x, log_likelihood=log_likelihood):
                for name, g in grads.items():
                    inverses[name].update(_project(g, sketches[name]).double())
                seen += len(ll)
        if seen != count:
            raise ValueError(
                f"online fitting reads the Fisher inputs twice, but got {count} then {seen} samples: "
                "pass data that yields the same samples each time (a loader without shuffling)"
            )
        return {n: _Layer(deltas[n], sketches[n], inverse=inv.inverse()) for n, inv in inverses.items()}

    def _sketches(self, params: dict[str, nn.Parameter]) -> dict[str, CountSketch | None]:
        """A count sketch for each layer larger than ``projection_dim``, drawn from ``seed`` in name order."""
        r = self.projection_dim
        generator = torch.Generator().manual_seed(self.seed)
        return {
            n: CountSketch.draw(p.numel(), r, generator, p.device)
            if r is not None and p.numel() > r
            else None
            for n, p in params.items()
        }

    def _deltas(
        self, sums: dict[str, Tensor], count: int, params: dict[str, nn.Parameter]
    ) -> dict[str, float]:
        """δ_l per layer from the sums of squared reference norms (see ``relative_damping``)."""
        means = {n: s / count for n, s in sums.items()}
        dims = {n: p.numel() for n, p in params.items()}
        return layer_dampings(self.damping, self.relative_damping, means, dims)

    def squared_norms(self, name: str, grads: Tensor) -> Tensor:
        return self._lookup(self.layers, name).squared_norms(grads)

    def inner_products(self, name: str, a: Tensor, b: Tensor) -> Tensor:
        return self._lookup(self.layers, name).inner_products(*check_pair(name, a, b))  # keeps b is a

    def state_dict(self) -> dict[str, Any]:
        layers = {n: layer.state() for n, layer in self.layers.items()}
        return {"options": self.options(), "dims": self.dims, "layers": layers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restore_options(state)
        self.layers = {n: _Layer.from_state(layer) for n, layer in state["layers"].items()}
        self.dims = dict(state["dims"])


def _woodbury(refs: Tensor, delta: float, sketch: CountSketch | None) -> _Layer:
    """The batch form: references ``[N, m]`` and the Cholesky factor of ``NδI + K``, ``K = R Rᵀ``."""
    r = refs.double()
    n = r.shape[0]
    system = r @ r.T + n * delta * torch.eye(n, dtype=torch.float64, device=r.device)
    return _Layer(delta, sketch, refs=refs, cholesky=torch.linalg.cholesky(system))


class _SequentialInverse:
    """``(NδI + Σ_i s_i s_iᵀ)⁻¹`` built by Sherman–Morrison, one reference ``s_i`` at a time."""

    def __init__(self, n: int, delta: float, dim: int, device: torch.device) -> None:
        self.n = n
        self.matrix = torch.eye(dim, dtype=torch.float64, device=device) / (n * delta)

    def update(self, rows: Tensor) -> None:
        """Add ``s sᵀ`` for each row ``s`` of ``rows`` ``[b, m]`` (float64), in order."""
        for s in rows:
            u = self.matrix @ s
            self.matrix -= torch.outer(u, u) / (1.0 + s @ u)

    def inverse(self) -> Tensor:
        """``F⁻¹ = N·(NδI + Σ s sᵀ)⁻¹`` for ``F = δI + (1/N) Σ s sᵀ``."""
        return self.n * self.matrix
