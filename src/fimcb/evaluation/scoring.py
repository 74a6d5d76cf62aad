"""Stream a DataLoader through the gradient engine: layer norms for a whole dataset, with sample ids."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, Subset
from tqdm.auto import tqdm

from fimcb.core.checks import check_int
from fimcb.core.distributed import rank_and_world, score_sharded
from fimcb.core.metric import Metric
from fimcb.core.norms import LayerNorms
from fimcb.core.protocol import LogLikelihoodFn, noise_streams, unpack_batch
from fimcb.engine import Engine, per_sample_layer_norms

# Batch size of the per-rank loaders when the original loader has none (it used a batch sampler).
DEFAULT_BATCH_SIZE = 256


class EmptyLoaderError(ValueError):
    """A loader yielded fewer samples than one group."""


@dataclass(frozen=True)
class ScoringOptions:
    """How samples are scored; shared by :func:`layer_norms_over`, ``evaluate_ood`` and the callback.

    Attributes:
        group_size: score the summed log-likelihood of this many consecutive samples (the paper's k).
        engine: gradient backend, see :func:`fimcb.per_sample_layer_norms`.
        metric: Fisher approximation (default: identity).
        log_likelihood: overrides ``model.log_likelihood``.
        chunk_size: groups per vectorised engine call (default: sized from memory).
        max_samples: use at most this many samples of a loader.
        noise_draws: for a model whose log-likelihood is a stochastic bound (a VAE's ELBO, one latent
            draw per sample), the squared norms and log-likelihoods averaged over this many independent
            draws of its eval-mode noise (``model.noise_stream``): less noisy features, at that many
            times the cost. 1 scores the model's own stream.
        progress: show a progress bar per pass.
        progress_bar: the bar's factory, with tqdm's signature (default ``tqdm.auto.tqdm``); the callback
            passes Lightning's own ``Tqdm``, placed and formatted like the trainer's bars.
    """

    group_size: int = 1
    engine: Engine = "auto"
    metric: Metric | str | None = None
    log_likelihood: LogLikelihoodFn | None = None
    chunk_size: int | None = None
    max_samples: int | None = None
    noise_draws: int = 1
    progress: bool = False
    progress_bar: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        check_int("group_size", self.group_size)
        check_int("noise_draws", self.noise_draws)


def layer_norms_over(
    model: nn.Module,
    loader: Iterable[Any],
    options: ScoringOptions = ScoringOptions(),
    *,
    name: str = "data",
    input_shape: tuple[int, ...] | None = None,
) -> LayerNorms:
    """Layer norms of every sample (or group of ``options.group_size`` consecutive samples) of ``loader``.

    Groups run across batch boundaries; at most ``options.max_samples`` samples are used. Rows carry
    the batch's sample ids (the first of each group), or running positions when the batch has none.
    ``input_shape`` (per-sample shape) makes a mismatched loader fail with a clear message.

    Inside an initialised ``torch.distributed`` process group (every rank must call this), a
    DataLoader over a map-style dataset is split by groups across the ranks and the rows are
    gathered back in order (see :mod:`fimcb.core.distributed`): every rank returns the single-process
    result. Other iterables are scored whole on every rank.
    """
    if rank_and_world()[1] == 1 or not isinstance(loader, DataLoader) or not _is_map_style(loader.dataset):
        return _stream(model, loader, options, name, input_shape)
    dataset: Any = loader.dataset  # sized and indexable
    k = options.group_size
    n = len(dataset) if options.max_samples is None else min(len(dataset), options.max_samples)
    if n < k:
        raise EmptyLoaderError(_empty_message(name, n, k))

    def score(units: list[int]) -> LayerNorms:
        positions = [u * k + i for u in units for i in range(k)]
        shard = DataLoader(
            Subset(dataset, positions),
            batch_size=loader.batch_size or DEFAULT_BATCH_SIZE,
            collate_fn=loader.collate_fn,
            num_workers=loader.num_workers,
        )
        local_options = replace(options, max_samples=None)
        return _stream(model, shard, local_options, name, input_shape, torch.as_tensor(positions))

    return score_sharded(n // k, score)


def _is_map_style(dataset: Any) -> bool:
    """Whether ``dataset`` can be indexed and sized, so that ranks can take their shares of it."""
    return not isinstance(dataset, IterableDataset) and all(
        hasattr(dataset, attribute) for attribute in ("__getitem__", "__len__")
    )


def _empty_message(name: str, seen: int, group_size: int) -> str:
    return (
        f"{name}: the loader yielded {seen} samples, fewer than one group of {group_size}; "
        "check the dataset is not empty and its size options"
    )


def _stream(
    model: nn.Module,
    loader: Iterable[Any],
    options: ScoringOptions,
    name: str,
    input_shape: tuple[int, ...] | None,
    positions: Tensor | None = None,
) -> LayerNorms:
    """Score ``loader`` in this process; ``positions`` (one per sample) are the ids of batches without
    ids (default: running positions)."""
    group_size, max_samples = options.group_size, options.max_samples
    pending_x: list[Tensor] = []
    pending_ids: list[Tensor] = []
    parts: list[LayerNorms] = []
    seen = 0
    bar = (options.progress_bar or tqdm)(
        total=_expected_samples(loader, max_samples),
        desc=f"fimcb: scoring {name}",
        leave=False,
        disable=not options.progress,
        unit="sample",
    )
    for batch in loader:
        x, ids = unpack_batch(batch)
        if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
            raise ValueError(
                f"{name}: samples have shape {list(x.shape[1:])} but the model takes {list(input_shape)}; "
                "resize or convert this set (for example to grayscale) before scoring it"
            )
        if max_samples is not None:
            x = x[: max_samples - seen]
            ids = None if ids is None else ids[: max_samples - seen]
        if ids is None:
            ids = torch.arange(seen, seen + len(x)) if positions is None else positions[seen : seen + len(x)]
        pending_x.append(x)
        pending_ids.append(ids.cpu())
        seen += len(x)
        bar.update(len(x))
        usable = sum(len(p) for p in pending_x) // group_size * group_size
        if usable:
            xs, id_all = torch.cat(pending_x), torch.cat(pending_ids)
            norms = _averaged_norms(model, xs[:usable], options)
            parts.append(
                LayerNorms(
                    norms.values.cpu(),
                    norms.names,
                    norms.log_likelihood.cpu(),
                    ids=id_all[:usable:group_size],
                )
            )
            pending_x, pending_ids = [xs[usable:]], [id_all[usable:]]
        if max_samples is not None and seen >= max_samples:
            break
    bar.close()
    if not parts:
        raise EmptyLoaderError(_empty_message(name, seen, group_size))
    return LayerNorms.cat(parts)


def _averaged_norms(model: nn.Module, x: Tensor, options: ScoringOptions) -> LayerNorms:
    """Layer norms of ``x``, averaged over ``options.noise_draws`` streams of the model's eval-mode noise."""
    draws = []
    with noise_streams(model, options.noise_draws) as streams:
        for stream in streams:
            if options.noise_draws > 1:
                setattr(model, "noise_stream", stream)  # noqa: B010  # the protocol's attribute
            draws.append(
                per_sample_layer_norms(
                    model,
                    x,
                    metric=options.metric,
                    log_likelihood=options.log_likelihood,
                    group_size=options.group_size,
                    engine=options.engine,
                    chunk_size=options.chunk_size,
                )
            )
    if len(draws) == 1:
        return draws[0]
    return LayerNorms(
        torch.stack([d.values for d in draws]).mean(0),
        draws[0].names,
        torch.stack([d.log_likelihood for d in draws]).mean(0),
    )


def _expected_samples(loader: Iterable[Any], max_samples: int | None) -> int | None:
    """How many samples a pass will see, for the progress bar (``None`` when unknown)."""
    try:
        size = len(loader.dataset)  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        return max_samples
    return size if max_samples is None else min(size, max_samples)
