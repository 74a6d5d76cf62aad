"""The callback's options, in four groups: what to track, how to score, what to evaluate, what to draw.

Plain dataclasses, so that LightningCLI YAML sets any field and leaves the others at their defaults::

    callbacks:
      - class_path: fimcb.FIMNormCallback
        init_args:
          tracking: {every_n_train_steps: 50, n_train_probe: 128}
          scoring: {metric: kfac, group_size: 5}
          evaluation: {methods: [fim_gaussian, fim_gaussian_full, typicality]}
          pictures: {enabled: false}
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fimcb.core.checks import check_bool, check_int
from fimcb.core.metric import Metric, resolve_metric
from fimcb.detectors import DETECTORS
from fimcb.engine import Engine
from fimcb.evaluation.scoring import ScoringOptions
from fimcb.run.summaries import DEFAULT_QUANTILES


@dataclass(frozen=True)
class Tracking:
    """What to measure while training runs.

    Attributes:
        every_n_train_steps: score the training probe every this many optimizer steps (and before the
            first); 0 never.
        n_train_probe: size of the fixed probe drawn from the training data.
        n_val_probe: size of the fixed probe drawn from the validation (test) data, scored at the end of
            each validation (test) epoch; 0 never.
        track_train_batches: also score the training batch's own samples every this many optimizer steps
            (history split ``train_batch``; batches need sample ids); 0 never.
        quantiles: quantiles of the per-sample log FIM-norm to log per split.
        log_per_layer: also log each parameter tensor's mean log squared norm.
        history: record every event's per-sample rows in the run folder's ``history/``.
        history_flush_rows: rows kept in memory before they are written (and at each checkpoint).
    """

    every_n_train_steps: int = 200
    n_train_probe: int = 128
    n_val_probe: int = 256
    track_train_batches: int = 0
    quantiles: Sequence[float] = DEFAULT_QUANTILES
    log_per_layer: bool = False
    history: bool = True
    history_flush_rows: int = 50_000

    def __post_init__(self) -> None:
        for name in ("every_n_train_steps", "n_train_probe", "n_val_probe", "track_train_batches"):
            check_int(f"tracking.{name}", getattr(self, name), minimum=0)
        check_int("tracking.history_flush_rows", self.history_flush_rows)
        check_bool("tracking.log_per_layer", self.log_per_layer)
        check_bool("tracking.history", self.history)
        if not all(0.0 <= q <= 1.0 for q in self.quantiles):
            raise ValueError(f"tracking.quantiles must lie in [0, 1], got {list(self.quantiles)}")
        object.__setattr__(self, "quantiles", tuple(self.quantiles))


@dataclass(frozen=True)
class Scoring:
    """How samples are scored, during training and in the evaluation.

    Attributes:
        group_size: score the summed log-likelihood of this many consecutive samples (the paper's k).
        engine: gradient backend (``auto``, ``hooks``, ``func``, ``loop``; see
            :func:`fimcb.per_sample_layer_norms`).
        chunk_size: samples per vectorised call of the engine (default: sized from memory).
        metric: the Fisher approximation of the end-of-training evaluation, by name (``identity``,
            ``layer_scalar``, ``diagonal``, ``kfac``, ``low_rank``) or as an instance (YAML: ``class_path``
            and ``init_args``); a fitted one is fitted afresh on the training data at each evaluation.
            Tracking during training uses the plain (identity) norms.
        noise_draws: the evaluation's features averaged over this many independent draws of the model's
            eval-mode noise (``model.noise_stream``; fimcb's VAE has it), for log-likelihoods that are
            stochastic bounds: less noisy features at that many times the evaluation's scoring cost.
            Tracking during training uses one draw.
    """

    group_size: int = 1
    engine: Engine = "auto"
    chunk_size: int | None = None
    metric: Metric | str | None = None
    noise_draws: int = 1

    def __post_init__(self) -> None:
        check_int("scoring.group_size", self.group_size)
        check_int("scoring.noise_draws", self.noise_draws)
        if self.chunk_size is not None:
            check_int("scoring.chunk_size", self.chunk_size)
        resolve_metric(self.metric)  # an unknown name fails here, not after training

    def options(
        self, metric: Metric, max_samples: int | None, progress_bar: Callable[..., Any] | None
    ) -> ScoringOptions:
        """The library's scoring options for an evaluation under ``metric``."""
        return ScoringOptions(
            group_size=self.group_size,
            engine=self.engine,
            chunk_size=self.chunk_size,
            metric=metric,
            max_samples=max_samples,
            noise_draws=self.noise_draws,
            progress=progress_bar is not None,
            progress_bar=progress_bar,
        )


@dataclass(frozen=True)
class Evaluation:
    """The OOD evaluation at the end of training: detectors fitted on held-out in-distribution data
    (the validation split), test split against each OOD set.

    Attributes:
        enabled: run it.
        methods: detectors to evaluate (default :data:`fimcb.detectors.DEFAULT_METHODS`: the default
            detector chosen without OOD data, the paper's ``fim_gaussian``, ``total_norm``, and the
            ``likelihood`` and ``typicality`` baselines).
        max_samples: cap on the samples of each set (fit, test, every OOD set); None scores them all.
    """

    enabled: bool = True
    methods: Sequence[str] | None = None
    max_samples: int | None = 1000

    def __post_init__(self) -> None:
        check_bool("evaluation.enabled", self.enabled)
        if self.max_samples is not None:
            check_int("evaluation.max_samples", self.max_samples)
        unknown = [m for m in self.methods or () if m not in DETECTORS]
        if unknown:
            raise ValueError(
                f"evaluation.methods: unknown detectors {unknown}; choose from {sorted(DETECTORS)}"
            )
        if self.methods is not None:
            object.__setattr__(self, "methods", tuple(self.methods))


@dataclass(frozen=True)
class Pictures:
    """What to draw at the end of training (and log to W&B and TensorBoard).

    Attributes:
        enabled: histograms of the per-sample log norms at every tracking event; at the end, the most and
            least novel samples (after an evaluation) and ``figures/*.png``.
        n_novel: how many most (and least) novel samples per set to show.
        saliency: add double-backprop heat maps to the most novel samples of image data.
        influence_samples: training samples searched for the largest influence on the most novel ones;
            0 never.
        novelty_method: the detector that ranks samples (default: the first FIM-norm detector evaluated).
    """

    enabled: bool = True
    n_novel: int = 8
    saliency: bool = True
    influence_samples: int = 512
    novelty_method: str | None = None

    def __post_init__(self) -> None:
        check_bool("pictures.enabled", self.enabled)
        check_int("pictures.n_novel", self.n_novel)
        check_bool("pictures.saliency", self.saliency)
        check_int("pictures.influence_samples", self.influence_samples, minimum=0)
