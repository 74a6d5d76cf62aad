"""Diagonal approximations of the Fisher matrix, fitted from per-sample gradients.

- :class:`LayerScalar` (the paper's metric): block ``l`` of F is ``λ_l·I`` with ``λ_l = E||s_l||² / d_l``;
- :class:`FittedDiagonal`: ``diag(F) = E[s²]`` entry by entry, plus damping.

Both stream sums over the Fisher inputs and reduce them over DDP ranks (:mod:`fimcb.metrics.base`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from fimcb.core.checks import check_bool, check_positive_float
from fimcb.core.distributed import agreed
from fimcb.core.metric import Diagonal, squared_row_norms
from fimcb.core.protocol import LogLikelihoodFn
from fimcb.engine import per_sample_gradients, per_sample_layer_norms
from fimcb.metrics.base import FittedMetric, layer_dampings, layer_scales, reduced_means


class LayerScalar(FittedMetric):
    """The paper's metric: ``||s_l||² / λ_l`` with ``λ_l = E||s_l||² / d_l`` per parameter tensor.

    Block ``l`` of F is ``λ_l·I``: every coordinate of a layer gets the layer's mean diagonal Fisher
    entry. Fitting needs only squared norms, so it runs the fast identity-metric engine.
    """

    name = "layer_scalar"

    def __init__(
        self, fisher: str = "empirical", n_samples: int = 1000, batch_size: int = 64, seed: int = 0
    ) -> None:
        super().__init__(fisher, n_samples, batch_size, seed)
        self.scales: dict[str, float] = {}

    def fit(
        self,
        model: nn.Module,
        data: Iterable[Any] | None = None,
        log_likelihood: LogLikelihoodFn | None = None,
    ) -> LayerScalar:
        def accumulate() -> tuple[dict[str, Tensor], int]:
            sums: Tensor | None = None
            count = 0
            for x in self._inputs(model, data):
                norms = per_sample_layer_norms(model, x, metric="identity", log_likelihood=log_likelihood)
                batch = norms.values.double().sum(0)
                sums = batch if sums is None else sums + batch
                count += len(norms)
            assert sums is not None  # fisher_inputs raises when there are no samples
            return dict(zip(norms.names, sums, strict=True)), count

        sums, count = agreed(accumulate)  # every rank reaches the reduction, or none does
        dims = {name: p.numel() for name, p in self._parameters(model).items()}
        means = reduced_means(sums, count)
        self.scales = layer_scales(means, dims)
        self.dims = dims
        return self

    def inverse_diagonal(self, name: str) -> float:
        return 1.0 / self._lookup(self.scales, name)

    def squared_norms(self, name: str, grads: Tensor) -> Tensor:
        return squared_row_norms(grads) * self.inverse_diagonal(name)

    def state_dict(self) -> dict[str, Any]:
        return {"options": self.options(), "dims": self.dims, "scales": self.scales}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restore_options(state)
        self.scales, self.dims = dict(state["scales"]), dict(state["dims"])


class FittedDiagonal(FittedMetric):
    """``Σ_j s_j² / (F_jj + δ_l)`` with ``F_jj = E[s_j²]`` estimated from per-sample gradients.

    Args:
        damping: δ, or with ``relative_damping`` (the default) the factor ``δ_l = damping × mean_j F_jj``
            of each layer: scale-free, so one value suits layers and models of any gradient scale,
            and it keeps coordinates the fitting samples never moved from dominating the norm.
        relative_damping: whether ``damping`` is relative to each layer's mean diagonal entry.
        fisher, n_samples, batch_size, seed: see :class:`FittedMetric`.
    """

    name = "diagonal"

    def __init__(
        self,
        fisher: str = "empirical",
        damping: float = 1e-3,
        relative_damping: bool = True,
        n_samples: int = 1000,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__(fisher, n_samples, batch_size, seed)
        self.damping = check_positive_float("damping", damping)
        self.relative_damping = check_bool("relative_damping", relative_damping)
        self.damped: dict[str, Tensor] = {}  # F_jj + δ_l, shaped like each parameter
        self._weights = Diagonal({})

    def options(self) -> dict[str, Any]:
        return {**super().options(), "damping": self.damping, "relative_damping": self.relative_damping}

    def fit(
        self,
        model: nn.Module,
        data: Iterable[Any] | None = None,
        log_likelihood: LogLikelihoodFn | None = None,
    ) -> FittedDiagonal:
        def accumulate() -> tuple[dict[str, Tensor], int]:
            sums: dict[str, Tensor] = {}
            count = 0
            for x in self._inputs(model, data):
                for grads, ll in per_sample_gradients(model, x, log_likelihood=log_likelihood):
                    for name, g in grads.items():
                        square = g.double().square().sum(0)
                        sums[name] = sums[name] + square if name in sums else square
                    count += len(ll)
            return sums, count

        sums, count = agreed(accumulate)  # every rank reaches the reduction, or none does
        fisher = reduced_means(sums, count)
        params = self._parameters(model)
        dims = {name: p.numel() for name, p in params.items()}
        mean_norms = {name: f.sum() for name, f in fisher.items()}
        deltas = layer_dampings(self.damping, self.relative_damping, mean_norms, dims)
        self._set({name: (f + deltas[name]).to(params[name].dtype) for name, f in fisher.items()})
        self.dims = dims
        return self

    def _set(self, damped: dict[str, Tensor]) -> None:
        self.damped = damped
        self._weights = Diagonal(damped, damping=0.0)  # scores with the weights 1 / (F_jj + δ_l)

    def inverse_diagonal(self, name: str) -> Tensor:
        self._lookup(self.damped, name)
        return self._weights.inverse_diagonal(name)

    def squared_norms(self, name: str, grads: Tensor) -> Tensor:
        self._lookup(self.damped, name)
        return self._weights.squared_norms(name, grads)

    def state_dict(self) -> dict[str, Any]:
        return {"options": self.options(), "dims": self.dims, "damped": self.damped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restore_options(state)
        self._set(dict(state["damped"]))
        self.dims = dict(state["dims"])
