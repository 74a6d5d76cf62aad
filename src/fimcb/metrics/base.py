"""What every fitted Fisher approximation shares: its options, its fit inputs, its reductions over ranks.

A fitted metric estimates F from per-sample gradients (:mod:`fimcb.engine`) over Fisher inputs
(:func:`fimcb.metrics.fitting.fisher_inputs`), sums its statistics over the batches of the fit, and
reduces them over DDP ranks once at the end, so that a metric fitted in parallel equals one fitted on
all the data.

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

from fimcb.core.checks import check_int
from fimcb.core.distributed import all_reduce_sum
from fimcb.core.metric import Metric
from fimcb.engine import trainable_parameters
from fimcb.metrics.fitting import check_source, fisher_inputs

T = TypeVar("T")


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
        self.n_samples = check_int("n_samples", n_samples)
        self.batch_size = check_int("batch_size", batch_size)
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
