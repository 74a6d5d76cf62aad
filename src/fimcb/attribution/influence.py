"""Influence between samples: FIM inner products ``s_aᵀ F⁻¹ s_b`` of log-likelihood gradients
(docs/method.md §7).

With ``s(x) = ∇_θ log p_θ(x)``, a natural-gradient step of size ``lr`` on sample ``a``
(``Δθ = lr · F⁻¹ s_a``) changes ``log p(b)`` to first order by ``lr · s_aᵀ F⁻¹ s_b``: the influence of
``a`` on ``b``. Positive values mean that learning ``a`` makes ``b`` more likely ("proponents"),
negative ones less likely ("opponents"). ``F`` is any :mod:`fimcb.metrics` approximation, applied
per parameter tensor (block-diagonal over layers), so the value is a sum over parameter tensors.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial, reduce
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from fimcb.core.checks import check_int
from fimcb.core.metric import Metric, resolve_metric
from fimcb.core.protocol import LogLikelihoodFn, unpack_batch
from fimcb.engine import per_sample_gradients


def influence(
    model: nn.Module,
    queries: Tensor,
    data: Tensor | Iterable[Any],
    *,
    metric: Metric | str | None = None,
    log_likelihood: LogLikelihoodFn | None = None,
    chunk_size: int | None = None,
    normalize: bool = False,
) -> Influences:
    """Influences ``s_qᵀ F⁻¹ s_n`` between each query and each data sample, with the data's sample ids.

    Entry ``(q, n)`` is, to first order, how much a natural-gradient step of unit size on query ``q``
    raises ``log p`` of data sample ``n`` (and, F⁻¹ being symmetric, the other way round).

    Args:
        model: any ``nn.Module`` with ``log_likelihood(x) -> [B]`` (or pass ``log_likelihood``).
        queries: a batch ``[Q, ...]``; their gradients are taken once and kept.
        data: a batch ``[N, ...]`` or an iterable of batches (a DataLoader; tensors, ``(x, target, id)``
            sequences or dicts with keys ``x`` and ``id``), streamed chunk by chunk.
        metric: the Fisher approximation, fitted beforehand (default: identity, plain dot products).
        log_likelihood: overrides ``model.log_likelihood``; must compute through ``model``.
        chunk_size: samples per chunk of materialised gradients (default: sized from the parameters).
        normalize: divide by both FIM-norms: the cosine of the angle in the metric, in ``[-1, 1]``
            (1 for a sample with itself; 0 where either gradient is zero).

    The columns follow the order in which ``data`` was read and carry the sample ids its batches hold
    (running positions ``0 .. N-1`` when they hold none), so a shuffled loader gives the right samples.
    The values lie on the model's device, in its parameters' dtype. Runs the model in eval mode.
    """
    metric = resolve_metric(metric)
    if not metric.fitted:
        raise RuntimeError(
            f"the {metric.name} metric is not fitted: call metric.fit(model, data) before influence()"
        )
    if chunk_size is not None:
        check_int("chunk_size", chunk_size)
    gradients = partial(per_sample_gradients, model, log_likelihood=log_likelihood, chunk_size=chunk_size)
    q_grads = _concatenated(gradients(_checked(queries, "queries")))
    columns, data_norms, ids = [], [], []
    for x, batch_ids in _inputs(data):
        ids.append(batch_ids)
        for grads, _ in gradients(x):
            columns.append(_total(metric.inner_products(n, q_grads[n], g) for n, g in grads.items()))
            if normalize:
                data_norms.append(_squared_norms(metric, grads))
    if not columns:
        raise ValueError("data holds no samples: pass a non-empty batch or loader")
    values = torch.cat(columns, dim=1)
    if normalize:
        scale = (_squared_norms(metric, q_grads)[:, None] * torch.cat(data_norms)[None, :]).sqrt()
        cosine = torch.where(scale > 0, values / scale, torch.zeros_like(values))
        values = cosine.clamp(-1.0, 1.0)  # Cauchy–Schwarz holds exactly; only rounding steps outside
    return Influences(values, _column_ids(ids, values.shape[1]))


class Ranked(NamedTuple):
    """``[Q, k]`` values, the sample ids and the column positions of the samples they belong to, one row
    per query."""

    values: Tensor
    ids: Tensor
    columns: Tensor


@dataclass(frozen=True)
class TopInfluences:
    """The ``k`` most positive ("proponents", largest first) and most negative ("opponents", most
    negative first) influences of each query."""

    top: Ranked
    bottom: Ranked


@dataclass(frozen=True)
class Influences:
    """``values`` ``[Q, N]`` (queries × data samples) and the data samples' ``ids`` ``[N]``."""

    values: Tensor
    ids: Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.values, Tensor) or self.values.ndim != 2 or self.values.shape[1] == 0:
            shape = list(self.values.shape) if isinstance(self.values, Tensor) else type(self.values).__name__
            raise ValueError(f"values must be a [Q, N] tensor with N >= 1, got {shape}")
        if not isinstance(self.ids, Tensor) or self.ids.shape != self.values.shape[1:]:
            shape = list(self.ids.shape) if isinstance(self.ids, Tensor) else type(self.ids).__name__
            raise ValueError(
                f"ids must hold one id per column of values, [{self.values.shape[1]}], got {shape}"
            )

    def top(self, k: int) -> TopInfluences:
        """The ``k`` largest and ``k`` smallest entries of each row, with their samples' ids; ``k`` larger
        than ``N`` is clamped to ``N``."""
        return top_influences(self, k)


def top_influences(influences: Influences, k: int) -> TopInfluences:
    """The ``k`` largest and ``k`` smallest influences of each query (see :meth:`Influences.top`)."""
    values = influences.values
    if torch.isnan(values).any():
        raise ValueError("values contain NaN: the gradients of some samples are not finite")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    k = min(k, values.shape[1])
    ids = influences.ids.to(values.device)
    ranked = []
    for largest in (True, False):
        best = values.topk(k, dim=1, largest=largest)
        ranked.append(Ranked(best.values, ids[best.indices], best.indices))
    return TopInfluences(*ranked)


def _checked(x: Any, what: str) -> Tensor:
    """``x`` if it is a non-empty batch without NaN, else a clear error naming ``what``."""
    if not isinstance(x, Tensor) or x.ndim < 1:
        raise ValueError(f"{what} must be a batched tensor [B, ...], got {type(x).__name__}")
    if x.shape[0] == 0:
        raise ValueError(f"{what} is an empty batch")
    if x.is_floating_point() and torch.isnan(x).any():
        raise ValueError(f"{what} contain NaN: influences of NaN inputs are meaningless; clean the data")
    return x


def _inputs(data: Tensor | Iterable[Any]) -> Iterator[tuple[Tensor, Tensor | None]]:
    """The input batches of ``data`` (one tensor, or each batch of an iterable) with their sample ids."""
    if isinstance(data, Tensor):
        yield _checked(data, "data"), None
        return
    for batch in data:
        x, ids = unpack_batch(batch)
        if len(x):
            yield _checked(x, "a data batch"), ids


def _column_ids(per_batch: list[Tensor | None], n: int) -> Tensor:
    """The ids of all ``n`` columns: the batches' own, or running positions when no batch carries any."""
    if all(ids is None for ids in per_batch):
        return torch.arange(n)
    if any(ids is None for ids in per_batch):
        raise ValueError("some data batches carry sample ids and others do not: give every batch its ids")
    return torch.cat([ids.detach().cpu().reshape(-1) for ids in per_batch if ids is not None])


def _concatenated(chunks: Iterable[tuple[dict[str, Tensor], Tensor]]) -> dict[str, Tensor]:
    """Per-sample gradients ``{name: [n, *shape]}`` of all chunks of :func:`per_sample_gradients`."""
    parts: dict[str, list[Tensor]] = {}
    for grads, _ in chunks:
        for name, g in grads.items():
            parts.setdefault(name, []).append(g)
    return {name: torch.cat(g) for name, g in parts.items()}


def _total(terms: Iterable[Tensor]) -> Tensor:
    """The sum over parameter tensors (a model has at least one)."""
    return reduce(operator.add, terms)


def _squared_norms(metric: Metric, grads: dict[str, Tensor]) -> Tensor:
    """``[n]`` FIM-norms squared, summed over parameter tensors."""
    return _total(metric.squared_norms(name, g) for name, g in grads.items())
