"""Stream a DataLoader through the gradient engine: layer norms for a whole dataset, with sample ids."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fimcb.engine import Engine, LayerNorms, per_sample_layer_norms
from fimcb.metrics import Metric
from fimcb.protocol import LogLikelihoodFn, unpack_batch


def layer_norms_over(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    name: str = "data",
    group_size: int = 1,
    max_samples: int | None = None,
    input_shape: tuple[int, ...] | None = None,
    engine: Engine = "auto",
    metric: Metric | str | None = None,
    log_likelihood: LogLikelihoodFn | None = None,
    chunk_size: int | None = None,
    progress: bool = False,
) -> LayerNorms:
    """Layer norms of every sample (or group of ``group_size`` consecutive samples) that ``loader`` yields.

    Groups run across batch boundaries; at most ``max_samples`` samples are used. Rows carry the
    batch's sample ids (the first of each group), or running positions when the batch has none.
    ``input_shape`` (per-sample shape) makes a mismatched loader fail with a clear message.
    """
    pending_x: list[Tensor] = []
    pending_ids: list[Tensor] = []
    parts: list[LayerNorms] = []
    seen = 0
    bar = tqdm(
        total=_expected_samples(loader, max_samples),
        desc=f"fimcb: scoring {name}",
        leave=False,
        disable=not progress,
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
                metric=metric,
                log_likelihood=log_likelihood,
                group_size=group_size,
                engine=engine,
                chunk_size=chunk_size,
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
        raise ValueError(
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
