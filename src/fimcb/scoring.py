"""Stream a DataLoader through the gradient engine: layer norms for a whole dataset, with sample ids."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fimcb.engine import Engine, LayerNorms, per_sample_layer_norms
from fimcb.metrics import Metric
from fimcb.protocol import LogLikelihoodFn, unpack_batch


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
        progress: show a progress bar per pass.
    """

    group_size: int = 1
    engine: Engine = "auto"
    metric: Metric | str | None = None
    log_likelihood: LogLikelihoodFn | None = None
    chunk_size: int | None = None
    max_samples: int | None = None
    progress: bool = False


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
    """
    group_size, max_samples = options.group_size, options.max_samples
    pending_x: list[Tensor] = []
    pending_ids: list[Tensor] = []
    parts: list[LayerNorms] = []
    seen = 0
    bar = tqdm(
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
            ids = torch.arange(seen, seen + len(x))
        pending_x.append(x)
        pending_ids.append(ids.cpu())
        seen += len(x)
        bar.update(len(x))
        usable = sum(len(p) for p in pending_x) // group_size * group_size
        if usable:
            xs, id_all = torch.cat(pending_x), torch.cat(pending_ids)
            norms = per_sample_layer_norms(
                model,
                xs[:usable],
                metric=options.metric,
                log_likelihood=options.log_likelihood,
                group_size=group_size,
                engine=options.engine,
                chunk_size=options.chunk_size,
            )
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
        raise EmptyLoaderError(
            f"{name}: the loader yielded {seen} samples, fewer than one group of {group_size}; "
            "check the dataset is not empty and its size options"
        )
    return LayerNorms.cat(parts)


def _expected_samples(loader: Iterable[Any], max_samples: int | None) -> int | None:
    """How many samples a pass will see, for the progress bar (``None`` when unknown)."""
    try:
        size = len(loader.dataset)  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        return max_samples
    return size if max_samples is None else min(size, max_samples)
