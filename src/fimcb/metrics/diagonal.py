"""Diagonal approximations of the Fisher matrix, fitted from per-sample gradients.

- :class:`LayerScalar` (the paper's metric): block ``l`` of F is ``λ_l·I`` with ``λ_l = E||s_l||² / d_l``;
- :class:`FittedDiagonal`: ``diag(F) = E[s²]`` entry by entry, plus damping.

Both stream sums over the Fisher inputs (:func:`fimcb.metrics.fitting.fisher_inputs`) and reduce them
over DDP ranks once at the end of :meth:`fit`, so a metric fitted in parallel equals one fitted on all
the data. ``fimcb.engine`` and ``fimcb.distributed`` import this package, so they are imported lazily.

Convention for a layer whose gradient is exactly zero on every fitting sample (a parameter the
likelihood does not depend on there): it has no scale to estimate, so its scale is taken as 1
(a warning names it) rather than dividing by zero.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from fimcb.metrics.base import Diagonal, Metric, squared_row_norms
from fimcb.metrics.fitting import check_source, fisher_inputs
from fimcb.protocol import LogLikelihoodFn

T = TypeVar("T")


def check_positive_int(name: str, value: Any) -> int:
    """``value`` if it is a positive integer (not a bool), else a clear error naming the option."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_positive_float(name: str, value: Any) -> float:
    """``value`` as a float if it is a positive finite number, else a clear error naming the option."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool (YAML ``true``/``false``), else a clear error naming the option."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def layer_scales(mean_squared_norms: dict[str, Tensor], dims: dict[str, int]) -> dict[str, float]:
    """Mean diagonal entry ``E||s_l||² / d_l`` of each layer's Fisher block; 1 for layers whose gradient
    was zero on every fitting sample (see the module docstring), with a warning naming them."""
    scales = {name: float(m) / dims[name] for name, m in mean_squared_norms.items()}
    zero = [name for name, s in scales.items() if s == 0.0]
    if zero:
        warnings.warn(
            f"the gradients of {zero} were zero on every Fisher sample; their scale is taken as 1",
            stacklevel=2,
        )
    return {name: s if s > 0 else 1.0 for name, s in scales.items()}


def layer_dampings(
    damping: float, relative: bool, mean_squared_norms: dict[str, Tensor], dims: dict[str, int]
) -> dict[str, float]:
    """δ_l per layer: ``damping`` itself, or relative to the layer's mean diagonal Fisher entry."""
    if not relative:
        return dict.fromkeys(mean_squared_norms, damping)
    return {name: damping * s for name, s in layer_scales(mean_squared_norms, dims).items()}


def reduced_means(sums: dict[str, Tensor], count: int) -> dict[str, Tensor]:
    """``sums / count`` with sums and count added up over DDP ranks in one collective call."""
    from fimcb.distributed import all_reduce_sum

    first = next(iter(sums.values()))
    flat = torch.cat([*(s.reshape(-1) for s in sums.values()), first.new_tensor([count])])
    flat = all_reduce_sum(flat)
    total = flat[-1]
    means, start = {}, 0
    for name, s in sums.items():
        means[name] = (flat[start : start + s.numel()] / total).reshape(s.shape)
        start += s.numel()
    return means


class FittedMetric(Metric):
    """Options and plumbing shared by metrics estimated from per-sample gradients.

    Args:
        fisher: ``"empirical"`` (expectation over the ``data`` given to :meth:`fit`) or ``"true"``
            (over samples drawn from the model with ``model.sample``).
        n_samples: how many samples to average over.
        batch_size: batch size of the model samples (the true Fisher); data keeps its own batches.
        seed: seed of the model samples (and of any other randomness of the metric).
    """

    def __init__(self, fisher: str, n_samples: int, batch_size: int, seed: int) -> None:
        self.fisher = check_source(fisher)
        self.n_samples = check_positive_int("n_samples", n_samples)
        self.batch_size = check_positive_int("batch_size", batch_size)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.seed = seed
        self.dims: dict[str, int] | None = None  # parameter sizes d_l by name, once fitted

    def options(self) -> dict[str, Any]:
        """The constructor's keyword arguments, saved in ``state_dict``."""
        return {
            "fisher": self.fisher,
            "n_samples": self.n_samples,
            "batch_size": self.batch_size,
            "seed": self.seed,
        }

    @property
    def fitted(self) -> bool:
        return self.dims is not None

    def _inputs(self, model: nn.Module, data: Iterable[Any] | None) -> Iterator[Tensor]:
        self.dims = None  # a failed refit must not leave stale state that looks fitted
        return fisher_inputs(model, data, self.fisher, self.n_samples, self.batch_size, self.seed)

    def _parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The parameters the engine differentiates (trainable ones), by name."""
        from fimcb.engine.api import trainable_parameters

        return trainable_parameters(model)

    def _lookup(self, store: dict[str, T], name: str) -> T:
        """``store[name]`` with clear errors before fit or for a parameter the metric was not fitted on."""
        if not self.fitted:
            raise RuntimeError(f"the {self.name} metric is not fitted: call fit(model, data) before scoring")
        if name not in store:
            raise KeyError(
                f"the {self.name} metric was not fitted on parameter {name!r} (fitted on {sorted(store)})"
            )
        return store[name]

    def _restore_options(self, state: dict[str, Any]) -> None:
        """Re-validate and adopt the options a state was fitted with (they decide how it scores)."""
        type(self).__init__(self, **state["options"])


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
        from fimcb.engine import per_sample_layer_norms

        sums: Tensor | None = None
        count = 0
        for x in self._inputs(model, data):
            norms = per_sample_layer_norms(model, x, metric="identity", log_likelihood=log_likelihood)
            batch = norms.values.double().sum(0)
            sums = batch if sums is None else sums + batch
            count += len(norms)
        assert sums is not None  # fisher_inputs raises when there are no samples
        dims = {name: p.numel() for name, p in self._parameters(model).items()}
        means = reduced_means(dict(zip(norms.names, sums, strict=True)), count)
        self.scales = layer_scales(means, dims)
        self.dims = dims
        return self

    def diagonal(self, name: str) -> float:
        return 1.0 / self._lookup(self.scales, name)

    def squared_norms(self, name: str, grads: Tensor) -> Tensor:
        return squared_row_norms(grads) * self.diagonal(name)

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
        from fimcb.engine import per_sample_gradients

        sums: dict[str, Tensor] = {}
        count = 0
        for x in self._inputs(model, data):
            for grads, ll in per_sample_gradients(model, x, log_likelihood=log_likelihood):
                for name, g in grads.items():
                    square = g.double().square().sum(0)
                    sums[name] = sums[name] + square if name in sums else square
                count += len(ll)
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

    def diagonal(self, name: str) -> Tensor:
        self._lookup(self.damped, name)
        return self._weights.diagonal(name)

    def squared_norms(self, name: str, grads: Tensor) -> Tensor:
        self._lookup(self.damped, name)
        return self._weights.squared_norms(name, grads)

    def state_dict(self) -> dict[str, Any]:
        return {"options": self.options(), "dims": self.dims, "damped": self.damped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restore_options(state)
        self._set(dict(state["damped"]))
        self.dims = dict(state["dims"])
