"""The most and least novel samples of an OOD evaluation, with where their novelty sits and what trained it.

After :func:`fimcb.evaluation.evaluate_ood`, :func:`collect_novel_samples` picks, per evaluated set
(``test`` and each OOD set), the samples a detector ranks most and least novel, fetches their inputs
back from the loaders, adds a double-backprop heat map for the most novel images
(:func:`fimcb.attribution.saliency.input_saliency`) and, for a few of them, the training samples of
largest influence ``s_aᵀ F⁻¹ s_b`` (:func:`fimcb.attribution.influence.influence`). The result is a dict
of plain tensors, lists and strings (``novel_samples.pt`` in a run directory) for
:mod:`fimcb.viz.figures` and the report.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fimcb.attribution.influence import influence
from fimcb.attribution.saliency import input_saliency, saliency_map
from fimcb.core.metric import Metric
from fimcb.core.protocol import unpack_batch
from fimcb.detectors import BASELINE_METHODS
from fimcb.evaluation.ood import OODResult


def novelty_method(result: OODResult, method: str | None = None) -> str:
    """``method`` if given (it must have been evaluated), else the first FIM-norm detector evaluated."""
    evaluated = list(result.scores["test"])
    if method is not None:
        if method not in evaluated:
            raise ValueError(f"method {method!r} was not evaluated; choose from {evaluated}")
        return method
    return next((m for m in evaluated if m not in BASELINE_METHODS), evaluated[0])


def fetch_rows(loader: Iterable[Any], positions: Tensor) -> Tensor:
    """The inputs at ``positions`` of the sample stream of ``loader`` (in the order of ``positions``);
    the loader must yield its samples in the same order as in the evaluation (no shuffling)."""
    wanted = positions.tolist()
    found: dict[int, Tensor] = {}
    offset = 0
    for batch in loader:
        x, _ = unpack_batch(batch)
        for p in wanted:
            if offset <= p < offset + len(x):
                found[p] = x[p - offset].cpu()
        offset += len(x)
        if len(found) == len(set(wanted)):
            return torch.stack([found[p] for p in wanted])
    raise IndexError(f"the loader yielded {offset} samples, fewer than position {max(wanted)} needs")


def collect_novel_samples(
    model: nn.Module,
    result: OODResult,
    loaders: Mapping[str, Iterable[Any]],
    *,
    method: str | None = None,
    k: int = 8,
    group_size: int = 1,
    metric: Metric | None = None,
    saliency: bool = True,
    decode: Callable[[Tensor], str] | None = None,
    train_inputs: Tensor | None = None,
    train_ids: Tensor | None = None,
    n_queries: int = 2,
    n_influence: int = 6,
) -> dict[str, Any]:
    """Per set of ``result`` (``test`` and each OOD set, with their ``loaders``), the ``k`` most and
    least novel samples under ``method``, in the ``novel_samples.pt`` layout (:mod:`fimcb.viz.figures`).

    ``index`` holds sample ids (the scored rows' ids, else stream positions). With groups
    (``group_size`` k > 1) a row stands for k consecutive samples; its first one is shown. Images of the
    most novel samples get a saliency heat map under ``metric`` (default: the evaluation's metric; NaN
    for samples with a non-finite score or input). With ``train_inputs``, the ``n_queries`` most novel
    samples of each set with finite scores get the ``n_influence`` training samples of largest and of
    most negative influence on them.
    """
    method = novelty_method(result, method)
    metric = metric if metric is not None else result.metric
    out: dict[str, Any] = {"method": method, "sets": {}}
    queries: list[dict[str, Any]] = []
    for name, by_method in result.scores.items():
        scores = by_method[method]
        order = torch.argsort(torch.nan_to_num(scores.double(), nan=float("inf")), descending=True)
        rows = {"most": order[:k], "least": order.flip(0)[:k]}
        inputs = fetch_rows(loaders[name], torch.cat(list(rows.values())) * group_size).split(
            [len(r) for r in rows.values()]
        )
        norms = result.norms.get(name)
        ids = norms.ids if norms is not None and norms.ids is not None else None
        entry = {
            which: {
                "index": ids[r] if ids is not None else r * group_size,
                "score": scores[r],
                "input": x,
                **_text(x, decode),
            }
            for (which, r), x in zip(rows.items(), inputs, strict=True)
        }
        most = entry["most"]
        usable = torch.isfinite(most["score"]) & torch.isfinite(most["input"].flatten(1).double()).all(1)
        if saliency and most["input"].is_floating_point() and most["input"].ndim == 4:
            maps = torch.full((len(usable), *most["input"].shape[2:]), float("nan"))
            if usable.any():  # a NaN score means non-finite gradients: nothing to differentiate
                maps[usable] = saliency_map(input_saliency(model, most["input"][usable], metric=metric)).cpu()
            most["saliency"] = maps
        out["sets"][name] = entry
        queries += [
            {
                "set": name,
                "index": int(most["index"][i]),
                "score": float(most["score"][i]),
                "input": most["input"][i],
            }
            for i in usable.nonzero().flatten()[:n_queries].tolist()
        ]
    if train_inputs is not None and queries:
        out["influence"] = _influence(model, queries, train_inputs, train_ids, metric, n_influence, decode)
    return out


def _influence(
    model: nn.Module,
    queries: list[dict[str, Any]],
    train_inputs: Tensor,
    train_ids: Tensor | None,
    metric: Metric | None,
    m: int,
    decode: Callable[[Tensor], str] | None,
) -> dict[str, Any]:
    ids = train_ids if train_ids is not None else torch.arange(len(train_inputs))
    training = [{"x": train_inputs, "id": ids}]
    ranked = influence(model, torch.stack([q["input"] for q in queries]), training, metric=metric).top(m)
    for i, query in enumerate(queries):
        if decode is not None:
            query["text"] = decode(query["input"])
        for side, best in (("top", ranked.top), ("bottom", ranked.bottom)):
            columns = best.columns[i].cpu()
            inputs = train_inputs[columns]
            query[side] = {
                "index": best.ids[i].cpu(),
                "value": best.values[i].cpu(),
                "input": inputs,
                **_text(inputs, decode),
            }
    return {"metric": getattr(metric, "name", "identity"), "queries": queries}


def _text(inputs: Tensor, decode: Callable[[Tensor], str] | None) -> dict[str, list[str]]:
    return {"text": [decode(x) for x in inputs]} if decode is not None else {}
