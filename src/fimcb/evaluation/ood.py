"""OOD evaluation: fit detectors on held-out in-distribution data, score test and OOD sets, and measure
how well each detector tells them apart (AUROC, AUPR-In, AUPR-Out, FPR@95: the *measures*; "metric"
in fimcb names a Fisher approximation only).

Conventions (docs/method.md §6): OOD is the positive class and every score is oriented so that
higher means more novel. Scores are mapped monotonically into [0, 1] over the whole evaluated set
before they reach torchmetrics, which would otherwise pass unbounded scores through a sigmoid
decided batch by batch (saturating large scores and ruining the ranking).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.functional.classification import binary_auroc, binary_average_precision, binary_roc

from fimcb.core.metric import Metric, resolve_metric
from fimcb.core.norms import LayerNorms
from fimcb.core.protocol import unpack_batch
from fimcb.detectors import DEFAULT_METHODS, Detector, build_detector
from fimcb.evaluation.scoring import EmptyLoaderError, ScoringOptions, layer_norms_over

MEASURES: tuple[str, ...] = ("auroc", "aupr_in", "aupr_out", "fpr95")
OODTable = dict[str, dict[str, dict[str, float]]]  # [OOD set][detector][measure]


def to_unit_interval(scores: Tensor) -> Tensor:
    """Map scores monotonically onto [0, 1] by dense rank, keeping ties; NaN counts as most novel."""
    scores = torch.nan_to_num(scores.double(), nan=float("inf"))
    _, rank = torch.unique(scores, sorted=True, return_inverse=True)
    top = rank.max().clamp_min(1)
    return rank.double() / top


def ood_measures(scores_in: Tensor, scores_out: Tensor) -> dict[str, float]:
    """AUROC, AUPR-In, AUPR-Out and FPR@95 for in-distribution vs OOD scores (higher = more novel).

    FPR@95 is the fraction of OOD samples accepted at the threshold that accepts 95% of
    in-distribution samples.
    """
    if len(scores_in) == 0 or len(scores_out) == 0:
        raise ValueError("need at least one in-distribution and one OOD score")
    preds = to_unit_interval(torch.cat([scores_in, scores_out]))
    is_ood = torch.cat([torch.zeros(len(scores_in)), torch.ones(len(scores_out))]).long()
    fpr, tpr, _ = binary_roc(1 - preds, 1 - is_ood)  # in-distribution as positive: tpr = ID accepted
    return {
        "auroc": float(binary_auroc(preds, is_ood)),
        "aupr_in": float(binary_average_precision(1 - preds, 1 - is_ood)),
        "aupr_out": float(binary_average_precision(preds, is_ood)),
        "fpr95": float(fpr[tpr >= 0.95].min()),
    }


@dataclass
class OODResult:
    """Everything an OOD evaluation produced: the measures, per-sample scores, fitted detectors, the layer
    norms of every set and the Fisher approximation (``metric``) they were taken under."""

    measures: OODTable
    scores: dict[str, dict[str, Tensor]]
    detectors: dict[str, Detector]
    norms: dict[str, LayerNorms] = field(default_factory=dict)
    metric: Metric | None = None

    def table(self) -> str:
        """The measures as a fixed-width text table, one row per (OOD set, detector)."""
        return format_table(self.measures)

    def flat(self, prefix: str = "ood") -> dict[str, float]:
        """The measures as ``{"<prefix>/<set>/<method>/<measure>": value}``: logged scalars, W&B summaries."""
        return {
            f"{prefix}/{ood}/{method}/{measure}": value
            for ood, by_method in self.measures.items()
            for method, values in by_method.items()
            for measure, value in values.items()
        }

    def save(self, path: str | Path) -> Path:
        """Write the measures as JSON (``[ood][method][measure]``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.measures, indent=2, sort_keys=False))
        return path

    def save_features(self, path: str | Path) -> Path:
        """Write every set's per-sample layer norms (``fit``, ``test`` and each OOD set) with
        ``torch.save`` as plain tensors and lists, for analysis without rescoring (:func:`load_features`)."""
        return torch_save({name: asdict(norms) for name, norms in self.norms.items()}, path)

    def save_scores(self, path: str | Path) -> Path:
        """Write the per-sample scores ``[set][method] -> [N]`` (``test`` and each OOD set; higher = more
        novel) with ``torch.save``, for ROC curves and histograms without rescoring (:func:`load_scores`)."""
        return torch_save({name: dict(by_method) for name, by_method in self.scores.items()}, path)


def torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj, path)``, the parent folders made first; the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


def load_scores(path: str | Path) -> dict[str, dict[str, Tensor]]:
    """The per-sample scores written by :meth:`OODResult.save_scores` (``[set][method]``)."""
    return torch.load(path, weights_only=True)


def load_features(path: str | Path) -> dict[str, LayerNorms]:
    """The per-set layer norms written by :meth:`OODResult.save_features`."""
    return {name: LayerNorms(**fields) for name, fields in torch.load(path, weights_only=True).items()}


def format_table(measures: OODTable) -> str:
    """A plain-text table, one row per (OOD set, method), columns wide enough for every name."""
    sets = max([len("OOD set"), *map(len, measures)]) + 2
    methods = max([len("method"), *(len(m) for by_method in measures.values() for m in by_method)]) + 2
    header = f"{'OOD set':<{sets}}{'method':<{methods}}" + "".join(f"{m:>10}" for m in MEASURES)
    lines = [header, "-" * len(header)]
    for ood, by_method in measures.items():
        for method, values in by_method.items():
            cells = "".join(f"{values[m]:>10.4f}" for m in MEASURES)
            lines.append(f"{ood:<{sets}}{method:<{methods}}{cells}")
    return "\n".join(lines)


def fit_and_score(
    fit: LayerNorms,
    test: LayerNorms,
    ood: Mapping[str, LayerNorms],
    methods: Sequence[str | Detector] = DEFAULT_METHODS,
) -> OODResult:
    """Fit each detector on ``fit``, score ``test`` and every OOD set, and compute the measures."""
    detectors = {d.name: d for d in (build_detector(m) for m in methods)}
    scores: dict[str, dict[str, Tensor]] = {"test": {}}
    for name, detector in detectors.items():
        detector.fit(fit)
        scores["test"][name] = detector.score(test)
    measures: OODTable = {}
    for ood_name, norms in ood.items():
        scores[ood_name] = {name: d.score(norms) for name, d in detectors.items()}
        measures[ood_name] = {
            name: ood_measures(scores["test"][name], scores[ood_name][name]) for name in detectors
        }
    return OODResult(measures, scores, detectors, {"fit": fit, "test": test, **ood})


def evaluate_ood(
    model: nn.Module,
    fit_loader: Iterable[Any],
    test_loader: Iterable[Any],
    ood_loaders: Mapping[str, Iterable[Any]],
    *,
    methods: Sequence[str | Detector] | None = None,
    options: ScoringOptions | None = None,
    metric_data: Iterable[Any] | None = None,
    skip_failures: bool = False,
    **scoring: Any,
) -> OODResult:
    """Out-of-distribution detection by a model with a log-likelihood, against named OOD sets.

    Detectors (``methods``, default :data:`~fimcb.detectors.DEFAULT_METHODS`: the default detector chosen
    without OOD data, the paper's ``fim_gaussian``, ``total_norm``, and the ``likelihood`` and
    ``typicality`` baselines) are fitted on ``fit_loader`` (held-out in-distribution
    data), then ``test_loader`` (in-distribution) is compared with each OOD set:
    ``result.measures[ood_name][method]`` holds ``auroc``, ``aupr_in``, ``aupr_out``, ``fpr95`` (OOD =
    positive class); the result also keeps per-sample scores, fitted detectors and layer norms.

    How samples are scored: ``options`` (:class:`~fimcb.evaluation.scoring.ScoringOptions`) or its fields as
    keywords (``metric="kfac"``, ``group_size=5``, ``max_samples=1000``...). A Fisher approximation that
    needs fitting and is not fitted yet is fitted first, on ``metric_data`` (training data, for an
    empirical Fisher) or else on ``fit_loader``. An empty OOD loader is skipped with a warning, and so,
    with ``skip_failures``, is one whose scoring fails (the others are still evaluated).
    """
    if not ood_loaders:
        raise ValueError("no OOD sets given: pass ood_loaders as a mapping name -> DataLoader")
    options = replace(options or ScoringOptions(), **scoring)
    input_shape = _first_sample_shape(fit_loader, "fit_loader")
    metric = resolve_metric(options.metric)
    if not metric.fitted:
        data = metric_data if metric_data is not None else fit_loader
        metric.fit(model, data, log_likelihood=options.log_likelihood)
    options = replace(options, metric=metric)

    def norms_of(loader: Iterable[Any], name: str) -> LayerNorms:
        return layer_norms_over(model, loader, options, name=name, input_shape=input_shape)

    fit, test = norms_of(fit_loader, "fit"), norms_of(test_loader, "test")
    ood: dict[str, LayerNorms] = {}
    for name, loader in ood_loaders.items():
        try:
            ood[name] = norms_of(loader, name)
        except EmptyLoaderError as err:
            warnings.warn(f"skipping OOD set {err}", stacklevel=2)
        except Exception as err:
            if not skip_failures:
                raise
            warnings.warn(
                f"skipping OOD set {name}: scoring it failed ({type(err).__name__}: {err})", stacklevel=2
            )
    if not ood:
        raise ValueError("no OOD set could be scored: nothing to evaluate")
    return replace(fit_and_score(fit, test, ood, methods or DEFAULT_METHODS), metric=metric)


def _first_sample_shape(loader: Iterable[Any], name: str) -> tuple[int, ...]:
    for batch in loader:
        x, _ = unpack_batch(batch)
        return tuple(x.shape[1:])
    raise ValueError(f"{name} yielded no samples: the detectors need held-out in-distribution data to fit")
