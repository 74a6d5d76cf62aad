"""``FIMNormCallback``: Lightning glue that decides when and on which samples fimcb measures FIM-norms.

The measuring lives in the library (engine, evaluation), the files in the run folder
(:mod:`fimcb.run.folder`, located by :mod:`fimcb.lightning.runs`), the pictures in :mod:`fimcb.viz`;
this module picks the moments (every N training steps, each validation epoch, the end of training)
and the samples (fixed probe sets), and hands the results to the trainer's loggers.

Failure policy: what can be known before training fails at ``setup`` with what to fix. Once
tracking has worked, a failure while scoring (out of memory, an error in the model's
``log_likelihood``, an engine error) never ends training: it is reported (a warning, and
``fim/errors`` on the loggers), that event is skipped, later events try again, and the evaluation at
the end writes whatever it could compute; ``on_error="raise"`` restores strictness.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypeVar

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader

from fimcb.core.metric import resolve_metric
from fimcb.core.norms import LayerNorms, log_norms
from fimcb.core.protocol import (
    ModelProtocolError,
    check_noise_streams,
    resolve_log_likelihood,
    unpack_batch,
)
from fimcb.detectors import Detector
from fimcb.engine import trainable_parameters
from fimcb.evaluation.ood import OODResult, evaluate_ood
from fimcb.evaluation.probes import Probes, score_groups
from fimcb.lightning.dashboards import dashboards, show_run
from fimcb.lightning.options import Evaluation, Pictures, Scoring, Tracking
from fimcb.lightning.progress import progress_bar
from fimcb.lightning.runs import datamodule_of, evaluation_loaders, is_smoke_test, resolve_run_folder
from fimcb.run.folder import RunFolder
from fimcb.run.history import HistoryWriter
from fimcb.run.summaries import summarize
from fimcb.viz.figures import run_figures, write_figures
from fimcb.viz.novel_samples import collect_novel_samples

T = TypeVar("T")
OnError = Literal["warn", "raise"]
SMOKE_SAMPLES = 16  # per set, in the evaluation of a fast_dev_run


class FIMNormCallback(Callback):
    """Track per-sample FIM-norms during ``fit`` and evaluate OOD detection at the end of training.

    Args:
        tracking: what to measure while training runs (:class:`~fimcb.lightning.options.Tracking`).
        scoring: how samples are scored (:class:`~fimcb.lightning.options.Scoring`).
        evaluation: the OOD evaluation at the end (:class:`~fimcb.lightning.options.Evaluation`).
        pictures: what to draw at the end (:class:`~fimcb.lightning.options.Pictures`).
        name: tells several callbacks of one trainer apart: their checkpoint state, their logged keys
            (``fim/<name>/...``, ``ood/<name>/...``) and their outputs (a subfolder of the run folder).
        seed: seed of the probe selection (a private generator: training's random streams are untouched).
        progress: progress bars for the evaluation's scoring passes, drawn by the trainer's own bar.
        on_error: ``"warn"`` (a scoring failure after tracking has worked skips that event) or ``"raise"``.
        fit_loader, test_loader, ood_loaders: the evaluation's data without a datamodule (held-out
            in-distribution data to fit detectors on, in-distribution test data, OOD sets by name);
            by default the trainer's validation loader and the datamodule's ``test_dataloader()`` and
            ``ood_dataloaders()``.
    """

    def __init__(
        self,
        tracking: Tracking = Tracking(),
        scoring: Scoring = Scoring(),
        evaluation: Evaluation = Evaluation(),
        pictures: Pictures = Pictures(),
        *,
        name: str | None = None,
        seed: int = 0,
        progress: bool = True,
        on_error: OnError = "warn",
        fit_loader: DataLoader | None = None,
        test_loader: DataLoader | None = None,
        ood_loaders: Mapping[str, DataLoader] | None = None,
    ) -> None:
        super().__init__()
        if on_error not in ("warn", "raise"):
            raise ValueError(f"on_error must be 'warn' or 'raise', got {on_error!r}")
        if name is not None and (not name or "/" in name):
            raise ValueError(f"name must be a non-empty string without '/', got {name!r}")
        for label, value in (
            ("n_train_probe", tracking.n_train_probe),
            ("n_val_probe", tracking.n_val_probe),
        ):
            if 0 < value < scoring.group_size:
                raise ValueError(
                    f"tracking.{label} ({value}) holds no group of scoring.group_size={scoring.group_size}: "
                    "raise it or use 0"
                )
        self.tracking, self.scoring, self.evaluation, self.pictures = tracking, scoring, evaluation, pictures
        self.name = name
        self.seed = seed
        self.progress = progress
        self.on_error: OnError = on_error
        self.fit_loader, self.test_loader = fit_loader, test_loader
        self.ood_loaders = dict(ood_loaders) if ood_loaders is not None else None
        self.folder: RunFolder | None = None
        self.run_id: str | None = None
        self._restored_folder: str | None = None
        self._writer: HistoryWriter | None = None
        self.probes = Probes(seed)
        self.last_tracked_step = -1
        self._last_batch_step = -1
        self._tracked_once = False  # tracking has worked: from now on a failure skips the event
        self.errors = 0
        self.result: OODResult | None = None
        self.detectors: dict[str, Detector] = {}  # fitted by the last evaluation (or restored)
        self.metric_state: dict[str, Any] = {}  # the fitted metric's state_dict, when it has one
        # Wall-clock seconds spent in this callback, so that its cost relative to training is visible.
        self.seconds = {"tracking": 0.0, "evaluation": 0.0, "pictures": 0.0}
        self._fit_start = 0.0

    @property
    def state_key(self) -> str:
        return type(self).__qualname__ if self.name is None else f"{type(self).__qualname__}[{self.name}]"

    def _key(self, kind: str) -> str:
        """The logged-key prefix of ``kind`` (``fim``, ``ood``, ``fimcb``) for this callback."""
        return kind if self.name is None else f"{kind}/{self.name}"

    # ---- before training: what can be known fails here ----------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        resolve_log_likelihood(pl_module)  # no log_likelihood: what to add
        trainable_parameters(pl_module)  # nothing to differentiate
        check_noise_streams(pl_module, self.scoring.noise_draws)  # not after training, in the evaluation
        for name, module in pl_module.named_modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.running_mean is None:
                raise ModelProtocolError(
                    f"{name} ({type(module).__name__}) normalises with batch statistics even in eval mode "
                    "(track_running_stats=False), so samples interact and per-sample gradients are "
                    "undefined: keep running statistics, or use GroupNorm/LayerNorm"
                )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()
        self._open_folder(trainer)
        for board in dashboards(trainer):
            board.define_series([f"{self._key('fim')}/", f"{self._key('ood')}/"])
        self._maybe_track_train(trainer, pl_module)

    def _open_folder(self, trainer: L.Trainer) -> None:
        """The run folder (and the history writer) once per run: restored from a checkpoint, else claimed;
        none in a ``fast_dev_run``."""
        if self.folder is not None or is_smoke_test(trainer):
            return
        self.folder, self.run_id = resolve_run_folder(trainer, self.run_id, self._restored_folder, self.name)
        if self.tracking.history and trainer.is_global_zero:
            self._writer = self.folder.history_writer(self.tracking.history_flush_rows)

    # ---- checkpoints and the end of a run: nothing recorded is lost ----------------------------

    def state_dict(self) -> dict[str, Any]:
        """Small: the run folder and id, the probe indices and the last tracked step. Fitted detectors and
        metrics stay in the run folder (``fim_detectors.pt``, ``fim_metric.pt``), read back on resume."""
        return {
            "run_folder": None if self.folder is None else str(self.folder.path),
            "run_id": self.run_id,
            "probe_indices": self.probes.state_dict(),
            "last_tracked_step": self.last_tracked_step,
            "errors": self.errors,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Also reads back the fitted detectors and metric of the run's last evaluation, where there was one,
        so that a checkpoint saved after ``fit`` scores new samples without refitting."""
        self._restored_folder = state_dict.get("run_folder")
        self.run_id = state_dict.get("run_id")
        if self._restored_folder is not None and Path(self._restored_folder).is_dir():
            folder = RunFolder(self._restored_folder)
            self.detectors, self.metric_state = folder.read_detectors(), folder.read_metric_state()
        self.probes.load_state_dict(state_dict.get("probe_indices", {}))
        self.last_tracked_step = int(state_dict.get("last_tracked_step", -1))
        self.errors = int(state_dict.get("errors", 0))
        self._tracked_once = self.last_tracked_step >= 0

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: Any) -> None:
        self._flush_history(trainer)  # what a resume from this checkpoint starts after is on disk

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._flush_history(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, error: BaseException) -> None:
        self._flush_history(trainer)

    def _flush_history(self, trainer: L.Trainer) -> None:
        if self._writer is not None and trainer.is_global_zero:
            self._writer.flush()

    # ---- tracking ------------------------------------------------------------------------------

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._maybe_track_train(trainer, pl_module)
        self._maybe_track_batch(trainer, pl_module, batch)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._track_eval_split(trainer, pl_module, "val", trainer.val_dataloaders)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._track_eval_split(trainer, pl_module, "test", trainer.test_dataloaders)

    def _maybe_track_train(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step, every = trainer.global_step, self.tracking.every_n_train_steps
        if not every or not self.tracking.n_train_probe or step == self.last_tracked_step:
            return  # with gradient accumulation several batches end on the same step
        if step % every or (is_smoke_test(trainer) and self.last_tracked_step >= 0):
            return  # a fast_dev_run tracks once
        self.last_tracked_step = step
        self._track(trainer, pl_module, "train_probe", lambda: self._probe("train", trainer.train_dataloader))

    def _maybe_track_batch(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any) -> None:
        """Every N optimizer steps, score the samples of the batch that just ended. Under DDP each rank
        holds its own batch: rank zero's is recorded (as Lightning logs rank zero's training loss)."""
        step, every = trainer.global_step, self.tracking.track_train_batches
        if not every or step % every or step == self._last_batch_step or is_smoke_test(trainer):
            return
        self._last_batch_step = step
        x, ids = unpack_batch(batch)
        if ids is None:
            rank_zero_warn(
                "FIMNormCallback: tracking.track_train_batches needs batches with sample ids ((x, target, "
                "id) or {'x', 'id'}) to record stable histories; the batch has none, so it is not tracked."
            )
            self.tracking = replace(self.tracking, track_train_batches=0)
            return
        if len(x) >= self.scoring.group_size:  # a last, short batch may hold less than one group
            self._track(trainer, pl_module, "train_batch", lambda: (x, ids.cpu()), sharded=False)

    def _track_eval_split(
        self, trainer: L.Trainer, pl_module: L.LightningModule, split: str, loaders: Any
    ) -> None:
        if (
            self.tracking.n_val_probe
            and loaders is not None
            and not (is_smoke_test(trainer) and self._tracked_once)
        ):
            self._open_folder(trainer)  # also outside fit (trainer.test)
            self._track(trainer, pl_module, split, lambda: self._probe(split, loaders))

    def _track(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prefix: str,
        probe: Callable[[], tuple[Tensor, Tensor]],
        sharded: bool = True,
    ) -> None:
        """Score a probe (split across ranks and gathered when ``sharded``, else this rank's own with no
        collective) and hand the rows to the loggers and the history; a failure after tracking has worked
        skips the event (see the failure policy)."""
        start = time.perf_counter()
        try:
            norms_and_ids = self._attempt(
                trainer, f"tracking {prefix}", lambda: self._score(pl_module, probe(), sharded)
            )
            if norms_and_ids is None:
                return
            norms, ids = norms_and_ids
            self._tracked_once = True
            logged = summarize(
                norms, f"{self._key('fim')}/{prefix}", self.tracking.quantiles, self.tracking.log_per_layer
            )
            for logger in trainer.loggers:
                logger.log_metrics(logged, step=trainer.global_step)
            pictures = self.pictures.enabled
            for board in [board for board in dashboards(trainer) if pictures and board.shows_pictures]:
                board.histogram(
                    f"{self._key('fim')}/{prefix}/log_norm_hist", log_norms(norms.total), trainer.global_step
                )
            if self._writer is not None and trainer.is_global_zero:
                self._writer.append(prefix, trainer.global_step, trainer.current_epoch, norms, ids)
        finally:
            self.seconds["tracking"] += time.perf_counter() - start

    def _score(
        self, pl_module: L.LightningModule, probe: tuple[Tensor, Tensor], sharded: bool
    ) -> tuple[LayerNorms, Tensor]:
        with _isolated_rng(pl_module.device):
            return score_groups(
                pl_module,
                *probe,
                group_size=self.scoring.group_size,
                engine=self.scoring.engine,
                chunk_size=self.scoring.chunk_size,
                sharded=sharded,
            )

    def _attempt(
        self, trainer: L.Trainer, what: str, work: Callable[[], T], early_raises: bool = True
    ) -> T | None:
        """``work()``; its failure raises with ``on_error="raise"`` or (``early_raises``) before tracking has
        worked once, and otherwise is reported (a warning, ``fim/errors`` on the loggers) and skipped."""
        try:
            return work()
        except Exception as err:
            if self.on_error == "raise" or (early_raises and not self._tracked_once):
                raise
            self.errors += 1
            if isinstance(err, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            rank_zero_warn(
                f"FIMNormCallback: {what} failed at step {trainer.global_step} ({type(err).__name__}: "
                f"{err}); training goes on and later events try again (on_error='raise' stops instead)"
            )
            for logger in trainer.loggers:
                logger.log_metrics(
                    {f"{self._key('fim')}/errors": float(self.errors)}, step=trainer.global_step
                )
            return None

    def _probe(self, split: str, loaders: Any) -> tuple[Tensor, Tensor]:
        """The fixed probe of ``split``: the same samples at every event and after a resume."""
        sizes = {"train": self.tracking.n_train_probe, "influence": self.pictures.influence_samples}
        return self.probes.inputs(split, loaders, sizes.get(split, self.tracking.n_val_probe))

    @property
    def probe_indices(self) -> dict[str, list[int]]:
        """The dataset positions of every probe, by split."""
        return self.probes.indices

    # ---- end of training -----------------------------------------------------------------------

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        evaluated = None
        if self.evaluation.enabled:
            start = time.perf_counter()
            evaluated = self._evaluate(trainer, pl_module)
            self.seconds["evaluation"] += time.perf_counter() - start
        if not trainer.is_global_zero or is_smoke_test(trainer):
            return
        if self.pictures.enabled:
            start = time.perf_counter()
            with _isolated_rng(pl_module.device):
                self._write_pictures(trainer, pl_module, evaluated)
            self.seconds["pictures"] += time.perf_counter() - start
        self._flush_history(trainer)
        if self.folder is not None:
            for board in dashboards(trainer):
                _warn_on_failure(
                    f"uploading the run folder to {type(board.logger).__name__}",
                    partial(board.artifact, self.folder.path, f"fimcb-{self.run_id}"),
                )
        spent = ", ".join(f"{seconds:.1f} s {what}" for what, seconds in self.seconds.items())
        total = time.perf_counter() - self._fit_start
        where = f"; outputs in {self.folder.path}" if self.folder is not None else ""
        rank_zero_info(f"FIMNormCallback took {spent}, of {total:.1f} s since training started{where}")

    def _evaluate(
        self, trainer: L.Trainer, pl_module: L.LightningModule
    ) -> tuple[OODResult, dict[str, Any]] | None:
        """Fit, score and log the OOD evaluation; the result and its test and OOD loaders (by set name), or
        ``None`` when its data is missing or it failed (reported, see the failure policy)."""
        loaders = evaluation_loaders(trainer, self.fit_loader, self.test_loader, self.ood_loaders)
        if loaders is None:
            return None
        fit_loader, test_loader, ood_loaders = loaders
        metric = copy.deepcopy(resolve_metric(self.scoring.metric))  # refitted to the weights of the moment
        smoke = is_smoke_test(trainer)
        limit = SMOKE_SAMPLES * self.scoring.group_size if smoke else self.evaluation.max_samples
        if smoke and limit is not None and isinstance(getattr(metric, "n_samples", None), int):
            metric.n_samples = min(metric.n_samples, limit)  # type: ignore[attr-defined]
        options = self.scoring.options(metric, limit, progress_bar(trainer, self.progress))

        def evaluate() -> OODResult:
            with _isolated_rng(pl_module.device):
                if not metric.fitted:
                    metric.fit(pl_module, trainer.train_dataloader)
                return evaluate_ood(
                    pl_module,
                    fit_loader,
                    test_loader,
                    ood_loaders,
                    methods=self.evaluation.methods,
                    options=options,
                    skip_failures=self.on_error == "warn",
                )

        result = self._attempt(trainer, "the OOD evaluation", evaluate, early_raises=False)
        if result is None:
            return None
        self.result = result
        self.detectors = dict(result.detectors)
        self.metric_state = metric.state_dict()
        flat = result.flat(self._key("ood"))
        for logger in trainer.loggers:
            logger.log_metrics(flat, step=trainer.global_step)
        for board in dashboards(trainer):
            board.summary(flat)
        if trainer.is_global_zero:
            where = ""
            if self.folder is not None:
                where = f"\nwritten to {self.folder.write_evaluation(result, self.metric_state)}"
            smoke_note = " (fast_dev_run: a smoke test on a few samples)" if smoke else ""
            rank_zero_info(
                f"\nFIM-norm OOD detection{smoke_note} (fit: validation split, in-distribution: test split)\n"
                f"{result.table()}{where}"
            )
        return result, {"test": test_loader, **ood_loaders}

    def _write_pictures(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        evaluated: tuple[OODResult, dict[str, Any]] | None,
    ) -> None:
        """Rank zero, at the end of training: after an evaluation, the most and least novel samples (with heat
        maps and influences); then the run's figures as PNGs and, with the probe trajectories and ROC charts,
        on the dashboards. Each part that fails is reported and the others are kept."""
        folder = self.folder
        if folder is None:
            return
        if evaluated is not None:
            _warn_on_failure(
                "writing the most novel samples",
                lambda: folder.write_novel_samples(self._novel_samples(trainer, pl_module, *evaluated)),
            )
        self._flush_history(trainer)
        for logger in trainer.loggers:
            logger.save()  # the figures read metrics.csv: write what CSVLogger still holds
        run = _warn_on_failure("reading the run folder back", folder.read)
        if run is None:
            return
        paths = write_figures(run_figures(run), folder.figures)
        for board in dashboards(trainer):
            if board.shows_pictures:
                _warn_on_failure(
                    f"logging the pictures to {type(board.logger).__name__}",
                    partial(show_run, board, run, paths, trainer.global_step, self._key("fimcb")),
                )

    def _novel_samples(
        self, trainer: L.Trainer, pl_module: L.LightningModule, result: OODResult, loaders: Mapping[str, Any]
    ) -> dict[str, Any]:
        train_inputs = train_ids = None
        if self.pictures.influence_samples:
            train_inputs, train_ids = self._probe("influence", trainer.train_dataloader)
        return collect_novel_samples(
            pl_module,
            result,
            loaders,
            method=self.pictures.novelty_method,
            k=self.pictures.n_novel,
            group_size=self.scoring.group_size,
            saliency=self.pictures.saliency,
            decode=getattr(datamodule_of(trainer), "decode", None),
            train_inputs=train_inputs,
            train_ids=train_ids,
        )


def _warn_on_failure(what: str, work: Callable[[], T]) -> T | None:
    """``work()``, or ``None`` with a warning when it fails: for the pictures and uploads, which are extras
    written after the results they are drawn from."""
    try:
        return work()
    except Exception as err:
        rank_zero_warn(
            f"FIMNormCallback: {what} failed ({type(err).__name__}: {err}); everything else is kept"
        )
        return None


def _isolated_rng(device: torch.device) -> Any:
    """Run scoring without advancing training's CPU or CUDA random streams."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
