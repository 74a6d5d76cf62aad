"""Influence between samples: FIM inner products ``s_aᵀ F⁻¹ s_b`` of log-likelihood gradients (METHOD.md §7).

With ``s(x) = ∇_θ log p_θ(x)``, a natural-gradient step of size ``lr`` on sample ``a``
(``Δθ = lr · F⁻¹ s_a``) changes ``log p(b)`` to first order by ``lr · s_aᵀ F⁻¹ s_b``: the influence of
``a`` on ``b``. Positive values mean that learning ``a`` makes ``b`` more likely ("proponents"),
negative ones less likely ("opponents"). ``F`` is any :mod:`fimcb.metrics` approximation, applied
per parameter tensor (block-diagonal over layers), so the value is a sum over parameter tensors.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Iterator, Sequence
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
) -> Tensor:
    """``[Q, N]`` influences ``s_qᵀ F⁻¹ s_n`` between each query and each data sample.

    Entry ``(q, n)`` is, to first order, how much a natural-gradient step of unit size on query ``q``
    raises ``log p`` of data sample ``n`` (and, F⁻¹ being symmetric, the other way round).

    Args:
        model: any ``nn.Module`` with ``log_likelihood(x) -> [B]`` (or pass ``log_likelihood``).
        queries: a batch ``[Q, ...]``; their gradients are taken once and kept.
        data: a batch ``[N, ...]`` or an iterable of batches (a DataLoader; tensors, ``(x, target, id)``
            sequences or dicts with key ``x``), streamed chunk by chunk; columns follow its order.
        metric: the Fisher approximation, fitted beforehand (default: identity, plain dot products).
        log_likelihood: overrides ``model.log_likelihood``; must compute through ``model``.
        chunk_size: samples per chunk of materialised gradients (default: sized from the parameters).
        normalize: divide by both FIM-norms: the cosine of the angle in the metric, in ``[-1, 1]``
            (1 for a sample with itself; 0 where either gradient is zero).

    The result lies on the model's device, in its parameters' dtype. Runs the model in eval mode.
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
    columns, data_norms = [], []
    for x in _inputs(data):
        for grads, _ in gradients(x):
            columns.append(_total(metric.inner_products(n, q_grads[n], g) for n, g in grads.items()))
            if normalize:
                data_norms.append(_squared_norms(metric, grads))
    if not columns:
        raise ValueError("data holds no samples: pass a non-empty batch or loader")
    values = torch.cat(columns, dim=1)
    if not normalize:
        return values
    scale = (_squared_norms(metric, q_grads)[:, None] * torch.cat(data_norms)[None, :]).sqrt()
    cosine = torch.where(scale > 0, values / scale, torch.zeros_like(values))
    return cosine.clamp(-1.0, 1.0)  # Cauchy–Schwarz holds exactly; only rounding steps outside


class Ranked(NamedTuple):
    """``[Q, k]`` values and the indices (or ids) of the samples they belong to, one row per query."""

    values: Tensor
    indices: Tensor


@dataclass(frozen=True)
class TopInfluences:
    """The ``k`` most positive ("proponents", largest first) and most negative ("opponents", most
    negative first) influences of each query."""

    top: Ranked
    bottom: Ranked


def top_influences(values: Tensor, k: int, *, ids: Tensor | Sequence[int] | None = None) -> TopInfluences:
    """The ``k`` largest and ``k`` smallest entries of each row of ``values`` ``[Q, N]`` (as returned by
    :func:`influence`), with their column indices, mapped through ``ids`` ``[N]`` when given (for
    example the data's sample ids); ``k`` larger than ``N`` is clamped to ``N``."""
    if not isinstance(values, Tensor) or values.ndim != 2 or values.shape[1] == 0:
        shape = list(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise ValueError(f"values must be a [Q, N] tensor with N >= 1, got {shape}")
    if torch.isnan(values).any():
        raise ValueError("values contain NaN: the gradients of some samples are not finite")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    k = min(k, values.shape[1])
    top, bottom = values.topk(k, dim=1), values.topk(k, dim=1, largest=False)
    if ids is None:
        return TopInfluences(Ranked(*top), Ranked(*bottom))
    ids = torch.as_tensor(ids, device=values.device)
    if ids.shape != values.shape[1:]:
        raise ValueError(
            f"ids must hold one id per column of values, [{values.shape[1]}], got {list(ids.shape)}"
        )
    return TopInfluences(Ranked(top.values, ids[top.indices]), Ranked(bottom.values, ids[bottom.indices]))


def _checked(x: Any, what: str) -> Tensor:
    """``x`` if it is a non-empty batch without NaN, else a clear error naming ``what``."""
    if not isinstance(x, Tensor) or x.ndim < 1:
        raise ValueError(f"{what} must be a batched tensor [B, ...], got {type(x).__name__}")
    if x.shape[0] == 0:
        raise ValueError(f"{what} is an empty batch")
    if x.is_floating_point() and torch.isnan(x).any():
        raise ValueError(f"{what} contain NaN: influences of NaN inputs are meaningless; clean the data")
    return x


def _inputs(data: Tensor | Iterable[Any]) -> Iterator[Tensor]:
    """The input batches of ``data`` (one tensor, or the inputs of each batch of an iterable)."""
    if isinstance(data, Tensor):
        yield _checked(data, "data")
        return
    for batch in data:
        x, _ = unpack_batch(batch)
        if len(x):
            yield _checked(x, "a data batch")


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
