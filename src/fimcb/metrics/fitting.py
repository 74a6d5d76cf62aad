"""Where a metric's estimate of the Fisher matrix comes from, chosen explicitly.

``F = E[s sᵀ]`` with ``s = ∇_θ log p_θ(x)``; the expectation runs over ``x ~ p_θ`` (the *true*
Fisher: a generative model can sample) or over training data (the *empirical* Fisher). Both are
streamed in batches, so a metric can use as many samples as asked with bounded memory.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from fimcb.core.modes import eval_mode
from fimcb.core.protocol import unpack_batch

FisherSource = Literal["empirical", "true"]


def check_source(source: str) -> FisherSource:
    """``source`` if it names a Fisher source, else a clear error."""
    if source not in get_args(FisherSource):
        raise ValueError(
            f"fisher must be 'empirical' (training data) or 'true' (samples from the model), got {source!r}"
        )
    return source  # type: ignore[return-value]


def fisher_inputs(
    model: nn.Module,
    data: Iterable[Any] | None,
    source: FisherSource,
    n_samples: int,
    batch_size: int = 64,
    seed: int = 0,
) -> Iterator[Tensor]:
    """Batches of inputs, ``n_samples`` in all, over which to average ``s sᵀ``: batches of ``data``
    (``empirical``) or ``model.sample(batch_size)`` drawn with a private seed (``true``)."""
    check_source(source)
    if n_samples < 1:
        raise ValueError(f"n_samples must be positive, got {n_samples}")
    if source == "empirical":
        if data is None:
            raise ValueError("the empirical Fisher needs data: pass a loader (or iterable of batches)")
        yield from _take(((unpack_batch(batch)[0]) for batch in data), n_samples)
        return
    sample = getattr(model, "sample", None)
    if not callable(sample):
        raise ValueError(
            f"the true Fisher needs samples from the model, but {type(model).__name__} has no sample(n) "
            "method; add one or use fisher='empirical'"
        )
    yield from _take(_model_samples(model, sample, batch_size, seed), n_samples)


def _model_samples(model: nn.Module, sample: Any, batch_size: int, seed: int) -> Iterator[Tensor]:
    """Endless batches ``model.sample(batch_size)`` in eval mode, batch ``i`` seeded ``seed + i`` with
    the global RNG forked, so that training's random streams are untouched."""
    parameter = next(model.parameters())
    devices = [parameter.device] if parameter.is_cuda else []
    for i in itertools.count():
        with torch.random.fork_rng(devices=devices), torch.no_grad(), eval_mode(model):
            torch.manual_seed(seed + i)
            x = sample(batch_size)
        yield x


def _take(batches: Iterable[Tensor], n_samples: int) -> Iterator[Tensor]:
    """The first ``n_samples`` samples of ``batches``, as batches; an error if there are none."""
    seen = 0
    for x in batches:
        x = x[: n_samples - seen]
        seen += len(x)
        yield x
        if seen >= n_samples:
            return
    if seen == 0:
        raise ValueError("no samples to estimate the Fisher matrix from: the data is empty")
