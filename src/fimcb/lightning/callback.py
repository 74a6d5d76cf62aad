"""``FIMNormCallback``: Lightning glue that decides when and on which samples fimcb measures FIM-norms.

The measuring itself lives in the engine, the summaries in ``tracking``, the detectors and
metrics in ``evaluation``; this module only picks the moments (every N training steps, each
validation epoch, the end of training) and the samples (fixed probe sets), and hands the
results to the trainer's loggers and log directory.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.dataloader import default_collate

from fimcb.core.distributed import score_sharded
from fimcb.core.metric import Metric, resolve_metric
from fimcb.core.norms import LayerNorms, log_norms
from fimcb.core.protocol import resolve_log_likelihood, unpack_batch
from fimcb.detectors import Detector, build_detector
from fimcb.engine import Engine, per_sample_layer_norms
from fimcb.evaluation.ood import OODResult, ood_evaluation
from fimcb.evaluation.scoring import ScoringOptions
from fimcb.lightning.dashboards import Dashboard, dashboards
from fimcb.run.history import HistoryWriter, trajectory_rows
from fimcb.run.summaries import DEFAULT_QUANTILES, summarize
from fimcb.viz.figures import RunArtifacts, load_run, roc_curves_of, run_figures, write_figures
from fimcb.viz.novel_samples import FILE_NAME as NOVEL_SAMPLES_FILE
from fimcb.viz.novel_samples import collect_novel_samples, save_novel_samples

T = TypeVar("T")


class FIMNormCallback(Callback):
    """Track per-sample FIM-norms during ``fit`` and evaluate OOD detection at the end of training.

    Args:
        every_n_train_steps: score the training probe set every this many optimizer steps
            (and once before the first step); 0 disables training-probe tracking.
        n_train_probe: size of the fixed probe set drawn from the training data.
        n_val_probe: size of the fixed probe set drawn from the validation (or test) data,
            scored at the end of each validation (test) epoch; 0 disables it.
        quantiles: quantiles of the log norm to log per split.
        log_per_layer: also log each parameter tensor's mean log squared norm.
        group_size: score groups of this many consecutive samples (the paper's k).
        evaluate_ood: at the end of training, fit the detectors on the validation split and
            evaluate OOD detection of the test split against each OOD set.
        methods: detectors to evaluate (default: ``fim_gaussian``, ``total_norm``,
            ``likelihood``, ``typicality``).
        max_eval_samples: cap on samples per set in the end-of-training evaluation (the fit,
            test and every OOD set); 1000 keeps it near 5 % of a CPU training run, None scores all.
        ood_loaders: OOD sets by name; default: the datamodule's ``ood_dataloaders()``.
        metric: the Fisher approximation of the end-of-training evaluation, by name (``identity``,
            ``layer_scalar``, ``diagonal``, ``kfac``, ``low_rank``) or as an instance (YAML:
            ``class_path``/``init_args``); it is fitted afresh on the training data at each evaluation
            (its own options say whether from the data or from model samples) and saved as
            ``fim_metric.pt``. Tracking during training uses the plain (identity) norms.
        engine: gradient backend (``auto``, ``hooks``, ``func``, ``loop``).
        chunk_size: samples per vectorised call of the engine (default: sized from memory).
        seed: seed of the probe selection (a private generator: training's RNG is untouched).
        output_file: name of the metrics JSON written into the run's log directory.
        history: append every tracking event's per-sample rows (sample id, split, step, epoch,
            per-layer norms, log-likelihood) to ``<log_dir>/history/`` (:mod:`fimcb.run.history`;
            ``fimcb.run.history.load_history`` reads them back).
        history_flush_rows: rows kept in memory before they are written (and at each checkpoint).
        progress: show a progress bar during the end-of-training scoring passes (Lightning's own
            ``Tqdm``, under the trainer's bars; none when the trainer has no progress bar).
        track_train_batches: also score the samples of the training batch itself every this many
            optimizer steps (history split ``train_batch``; needs batches with sample ids); 0: never.
        pictures: log a histogram of the per-sample log norms at every tracking event (W&B,
            TensorBoard) and, at the end of training, write ``novel_samples.pt`` (after an evaluation)
            and ``figures/*.png`` into the run directory and log those figures and the probe trajectories.
        n_novel: how many most (and least) novel samples per set to show, with saliency heat maps.
        saliency: add double-backprop heat maps (:func:`fimcb.attribution.saliency.input_saliency`) to
            the most novel samples of image data.
        influence_samples: training samples searched for the largest influence on the most novel
            samples (:func:`fimcb.attribution.influence.influence`); 0 disables it.
        novelty_method: the detector that ranks samples for the pictures (default: the first FIM-norm
            detector of ``methods``).
    """

    def __init__(
        self,
        every_n_train_steps: int = 200,
        n_train_probe: int = 128,
        n_val_probe: int = 256,
        quantiles: Sequence[float] = DEFAULT_QUANTILES,
        log_per_layer: bool = False,
        group_size: int = 1,
        evaluate_ood: bool = True,
        methods: list[str] | None = None,
        max_eval_samples: int | None = 1000,
        ood_loaders: Mapping[str, DataLoader] | None = None,
        metric: Metric | str | None = None,
        engine: Engine = "auto",
        chunk_size: int | None = None,
        seed: int = 0,
        output_file: str = "ood_metrics.json",
        history: bool = True,
        history_flush_rows: int = 50_000,
        progress: bool = True,
        track_train_batches: int = 0,
        pictures: bool = True,
        n_novel: int = 8,
        saliency: bool = True,
        influence_samples: int = 512,
        novelty_method: str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("every_n_train_steps", every_n_train_steps),
            ("n_train_probe", n_train_probe),
            ("n_val_probe", n_val_probe),
            ("track_train_batches", track_train_batches),
            ("influence_samples", influence_samples),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if n_novel < 1:
            raise ValueError(f"n_novel must be >= 1 (pictures=False turns the pictures off), got {n_novel}")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        for name, value in (("n_train_probe", n_train_probe), ("n_val_probe", n_val_probe)):
            if 0 < value < group_size:
                raise ValueError(
                    f"{name} ({value}) holds no group of group_size={group_size}: raise it or use 0"
                )
        self.every_n_train_steps = every_n_train_steps
        self.n_train_probe = n_train_probe
        self.n_val_probe = n_val_probe
        self.quantiles = tuple(quantiles)
        self.log_per_layer = log_per_layer
        self.evaluate_ood = evaluate_ood
        self.methods = methods
        self.ood_loaders = dict(ood_loaders) if ood_loaders is not None else None
        self.metric = metric
        resolve_metric(metric)  # an unknown name fails here, not after training
        self.options = ScoringOptions(
            group_size=group_size,
            engine=engine,
            chunk_size=chunk_size,
            max_samples=max_eval_samples,
            progress=progress,
        )
        self.seed = seed
        self.output_file = output_file
        self.history = history
        self.history_flush_rows = history_flush_rows
        self.track_train_batches = track_train_batches
        self.pictures = pictures
        self.n_novel = n_novel
        self.saliency = saliency
        self.influence_samples = influence_samples
        self.novelty_method = novelty_method
        self._writer: HistoryWriter | None = None
        self.probe_indices: dict[str, list[int]] = {}
        self._probe_inputs: dict[tuple[str, int], tuple[Tensor, Tensor]] = {}  # collated once
        self.last_tracked_step = -1
        self._last_batch_step = -1
        self.result: OODResult | None = None
        self.detectors: dict[str, Detector] = {}  # fitted by the last evaluation (or restored)
        self.metric_state: dict[str, Any] = {}  # the fitted metric's state_dict, when it has one
        # Wall-clock seconds spent in this callback, so its cost relative to training is visible.
        self.seconds = {"tracking": 0.0, "evaluation": 0.0, "pictures": 0.0}
        self._fit_start = 0.0

    # ---- Lightning hooks -------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        resolve_log_likelihood(pl_module)  # fail before training starts, with what to add
        if self.history and self._writer is None:
            log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective: on every rank
            self._writer = HistoryWriter(log_dir / "history", self.history_flush_rows)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: Any) -> None:
        self._flush_history(trainer)  # what a resume from this checkpoint starts after is on disk

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._flush_history(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, error: BaseException) -> None:
        self._flush_history(trainer)  # nothing measured is lost when training fails

    def _flush_history(self, trainer: L.Trainer) -> None:
        if self._writer is not None and trainer.is_global_zero:
            self._writer.flush()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()
        self._maybe_track_train(trainer, pl_module)

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

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        evaluated = self._evaluate(trainer, pl_module) if self.evaluate_ood else None
        out_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective call: on every rank
        if not trainer.is_global_zero:
            return
        if self.pictures:
            start = time.perf_counter()
            with _isolated_rng(pl_module.device):
                self._write_pictures(trainer, pl_module, evaluated, out_dir)
            self.seconds["pictures"] += time.perf_counter() - start
        spent = ", ".join(f"{seconds:.1f} s {what}" for what, seconds in self.seconds.items())
        total = time.perf_counter() - self._fit_start
        figures = f"; figures in {out_dir / 'figures'}" if self.pictures else ""
        rank_zero_info(f"FIMNormCallback took {spent}, of {total:.1f} s since training started{figures}")

    def state_dict(self) -> dict[str, Any]:
        """Probe indices and the last tracked step; after an evaluation also the fitted detectors and
        metric, so that a checkpoint saved after ``fit`` scores new samples without refitting."""
        state: dict[str, Any] = {"probe_indices": self.probe_indices}
        state["last_tracked_step"] = self.last_tracked_step
        if self.detectors:
            state["detectors"] = {name: d.state_dict() for name, d in self.detectors.items()}
        if self.metric_state:
            state["metric"] = self.metric_state
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.probe_indices = {k: list(v) for k, v in state_dict.get("probe_indices", {}).items()}
        self.last_tracked_step = int(state_dict.get("last_tracked_step", -1))
        self.detectors = {}
        for name, state in state_dict.get("detectors", {}).items():
            self.detectors[name] = build_detector(name)
            self.detectors[name].load_state_dict(state)
        self.metric_state = dict(state_dict.get("metric", {}))

    # ---- tracking --------------------------------------------------------------------------

    def _maybe_track_train(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if not self.every_n_train_steps or not self.n_train_probe:
            return
        if step % self.every_n_train_steps or step == self.last_tracked_step:
            return  # with gradient accumulation several batches end on the same step
        self.last_tracked_step = step
        probe = self._probe(trainer, "train", trainer.train_dataloader, self.n_train_probe)
        self._track(trainer, pl_module, "train_probe", probe)

    def _maybe_track_batch(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any) -> None:
        """Every N optimizer steps, score the samples of the batch that just ended. Under DDP each rank
        holds its own batch: rank zero's is recorded (as Lightning logs rank zero's training loss)."""
        step = trainer.global_step
        if not self.track_train_batches or step % self.track_train_batches or step == self._last_batch_step:
            return
        self._last_batch_step = step
        x, ids = unpack_batch(batch)
        if ids is None:
            rank_zero_warn(
                "FIMNormCallback: track_train_batches needs batches with sample ids ((x, target, id) or "
                "{'x', 'id'}) to record stable histories; the batch has none, so it is not tracked."
            )
            self.track_train_batches = 0
            return
        if len(x) >= self.options.group_size:  # a last, short batch may hold less than one group
            self._track(trainer, pl_module, "train_batch", (x, ids.cpu()), sharded=False)

    def _track_eval_split(
        self, trainer: L.Trainer, pl_module: L.LightningModule, split: str, loaders: Any
    ) -> None:
        if self.n_val_probe and loaders is not None:
            self._track(trainer, pl_module, split, self._probe(trainer, split, loaders, self.n_val_probe))

    def _track(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prefix: str,
        probe: tuple[Tensor, Tensor],
        sharded: bool = True,
    ) -> None:
        """Score ``probe`` (the same inputs on every rank: split across ranks and gathered; else this rank's
        own, with no collective) and hand the rows to the loggers and the history."""
        start = time.perf_counter()
        k = self.options.group_size
        x, ids = probe

        def score(units: list[int]) -> LayerNorms:
            positions = torch.as_tensor([u * k + i for u in units for i in range(k)], device=x.device)
            return per_sample_layer_norms(
                pl_module,
                x[positions],
                group_size=k,
                engine=self.options.engine,
                chunk_size=self.options.chunk_size,
            ).cpu()

        with _isolated_rng(pl_module.device):
            units = len(x) // k
            norms = score_sharded(units, score) if sharded else score(list(range(units)))
        metrics = summarize(norms, f"fim/{prefix}", self.quantiles, self.log_per_layer)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        boards = [board for board in dashboards(trainer) if board.shows_pictures] if self.pictures else []
        if boards:
            log_total = log_norms(norms.total)
            for board in boards:
                board.histogram(f"fim/{prefix}/log_norm_hist", log_total, trainer.global_step)
        if self._writer is not None and trainer.is_global_zero:
            rows = ids[: len(norms) * k : k]  # a group's id is its first sample's
            self._writer.append(prefix, trainer.global_step, trainer.current_epoch, norms, rows)
        self.seconds["tracking"] += time.perf_counter() - start

    def _probe(self, trainer: L.Trainer, split: str, loaders: Any, n: int) -> tuple[Tensor, Tensor]:
        """The fixed probe inputs of ``split`` and their sample ids (the batch's, else dataset positions):
        the same samples at every event, and after a resume (the indices are in the callback's state),
        collated once per dataset."""
        loader = loaders[0] if isinstance(loaders, Sequence) else loaders
        if not isinstance(loader, DataLoader):
            raise TypeError(
                f"FIMNormCallback needs a DataLoader for the {split} split, got {type(loader).__name__}"
            )
        dataset: Dataset = loader.dataset
        key = (split, id(dataset))
        if key in self._probe_inputs:
            return self._probe_inputs[key]
        size = len(dataset)  # type: ignore[arg-type]
        if split not in self.probe_indices:
            generator = torch.Generator().manual_seed(self.seed)
            self.probe_indices[split] = torch.randperm(size, generator=generator)[:n].tolist()
        indices = [i for i in self.probe_indices[split] if i < size]
        if not indices:
            raise ValueError(f"FIMNormCallback: the {split} dataset is empty: nothing to probe")
        collate = loader.collate_fn or default_collate
        x, ids = unpack_batch(collate([dataset[i] for i in indices]))
        self._probe_inputs[key] = (x, torch.as_tensor(indices) if ids is None else ids.cpu())
        return self._probe_inputs[key]

    # ---- end of training -------------------------------------------------------------------

    def _evaluate(
        self, trainer: L.Trainer, pl_module: L.LightningModule
    ) -> tuple[OODResult, dict[str, Any]] | None:
        """Fit, score and log the OOD evaluation; the result and its test and OOD loaders (by set name),
        or ``None`` when the data for it is missing."""
        loaders = self._evaluation_loaders(trainer)
        if loaders is None:
            return None
        fit_loader, test_loader, ood_loaders = loaders
        start = time.perf_counter()
        # A fresh copy per evaluation: the metric is refitted to the weights of the moment.
        metric = copy.deepcopy(resolve_metric(self.metric))
        options = replace(self.options, metric=metric, **_progress_bar(trainer, self.options.progress))
        with _isolated_rng(pl_module.device):
            metric.fit(pl_module, trainer.train_dataloader)
            result = ood_evaluation(
                pl_module, fit_loader, test_loader, ood_loaders, methods=self.methods, options=options
            )
        self.result = result
        self.detectors = dict(result.detectors)
        self.metric_state = metric.state_dict()
        self.seconds["evaluation"] += time.perf_counter() - start
        flat = {
            f"ood/{ood}/{method}/{metric}": value
            for ood, by_method in result.metrics.items()
            for method, values in by_method.items()
            for metric, value in values.items()
        }
        for logger in trainer.loggers:
            logger.log_metrics(flat, step=trainer.global_step)
        out_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective call: on every rank
        if trainer.is_global_zero:
            path = result.save(out_dir / self.output_file)
            torch.save({n: d.state_dict() for n, d in result.detectors.items()}, out_dir / "fim_detectors.pt")
            result.save_features(out_dir / "ood_features.pt")
            result.save_scores(out_dir / "ood_scores.pt")
            if metric.state_dict():
                torch.save(metric.state_dict(), out_dir / "fim_metric.pt")
            rank_zero_info(
                f"\nFIM-norm OOD detection (fit: validation split, in-distribution: test split)\n"
                f"{result.table()}\nwritten to {path}"
            )
        return result, {"test": test_loader, **ood_loaders}

    def _write_pictures(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        evaluated: tuple[OODResult, dict[str, Any]] | None,
        out_dir: Path,
    ) -> None:
        """Rank zero, at the end of training: after an evaluation, the most and least novel samples (with
        heat maps and influences); then the run's figures as PNGs and, with the probe trajectories and
        ROC charts, on the dashboards. Each part that fails is reported and the others are kept."""
        if evaluated is not None:
            _attempt(
                "writing the most novel samples",
                lambda: self._write_novel_samples(trainer, pl_module, *evaluated, out_dir),
            )
        self._flush_history(trainer)
        for logger in trainer.loggers:
            logger.save()  # the figures read metrics.csv: write what CSVLogger still holds
        run = _attempt("reading the run directory back", lambda: load_run(out_dir))
        if run is None:
            return
        paths = write_figures(run_figures(run), out_dir / "figures")
        for board in dashboards(trainer):
            if board.shows_pictures:
                name = type(board.logger).__name__
                _attempt(
                    f"logging the pictures to {name}",
                    lambda b=board: self._show(b, run, paths, trainer.global_step),
                )

    @staticmethod
    def _show(board: Dashboard, run: RunArtifacts, paths: Mapping[str, Path], step: int) -> None:
        """The figures, the probe trajectories and interactive ROC charts (where offered) on one dashboard."""
        for name, path in paths.items():
            board.png(f"fimcb/{name}", path, step)
        if run.history is not None:
            board.table("fimcb/trajectories", *trajectory_rows(run.history), step)
        for method in (run.ood_scores or {}).get("test", {}):
            board.curves(
                f"fimcb/roc/{method}", roc_curves_of(run.ood_scores, method), step, f"ROC: {method}", "FPR"
            )

    def _write_novel_samples(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        result: OODResult,
        loaders: Mapping[str, Any],
        out_dir: Path,
    ) -> None:
        train_inputs = train_ids = None
        if self.influence_samples:
            train_inputs, train_ids = self._probe(
                trainer, "influence", trainer.train_dataloader, self.influence_samples
            )
        samples = collect_novel_samples(
            pl_module,
            result,
            loaders,
            method=self.novelty_method,
            k=self.n_novel,
            group_size=self.options.group_size,
            saliency=self.saliency,
            decode=getattr(trainer.datamodule, "decode", None),
            train_inputs=train_inputs,
            train_ids=train_ids,
        )
        save_novel_samples(samples, out_dir / NOVEL_SAMPLES_FILE)

    def _evaluation_loaders(self, trainer: L.Trainer) -> tuple[Any, Any, Mapping[str, Any]] | None:
        """Validation (fit), test (in-distribution) and OOD loaders, or ``None`` with a warning."""
        datamodule = trainer.datamodule
        ood = self.ood_loaders
        if ood is None and hasattr(datamodule, "ood_dataloaders"):
            ood = datamodule.ood_dataloaders()
        fit = trainer.val_dataloaders
        test = None
        if datamodule is not None:
            datamodule.setup("test")
            test = datamodule.test_dataloader()
            fit = fit if fit is not None else datamodule.val_dataloader()
        missing = [name for name, value in (("validation", fit), ("test", test), ("OOD", ood)) if not value]
        if missing:
            rank_zero_warn(
                f"FIMNormCallback: skipping the OOD evaluation, no {', '.join(missing)} data. Use a "
                "datamodule with val_dataloader, test_dataloader and ood_dataloaders(), or pass "
                "ood_loaders= to the callback."
            )
            return None
        fit = fit[0] if isinstance(fit, Sequence) else fit
        return fit, test, ood


def _attempt(what: str, work: Callable[[], T]) -> T | None:
    """``work()``, or ``None`` with a warning when it fails: for the pictures, which are extras, after
    the results they are drawn from are written."""
    try:
        return work()
    except Exception as err:
        rank_zero_warn(
            f"FIMNormCallback: {what} failed ({type(err).__name__}: {err}); everything else is kept "
            "(pictures=False skips the pictures)"
        )
        return None


def _progress_bar(trainer: L.Trainer, wanted: bool) -> dict[str, Any]:
    """Scoring options for a progress bar like the trainer's: Lightning's ``Tqdm``, one line below its
    main bar, on rank zero only; none when the trainer shows none, or shows a Rich bar (whose live
    display a tqdm bar would garble)."""
    bar = trainer.progress_bar_callback
    if not (wanted and trainer.is_global_zero and isinstance(bar, TQDMProgressBar) and bar.is_enabled):
        return {"progress": False}
    position = 2 * bar.process_position + 1
    factory = partial(
        Tqdm, position=position, dynamic_ncols=True, file=sys.stdout, bar_format=TQDMProgressBar.BAR_FORMAT
    )
    return {"progress": True, "progress_bar": factory}


def _isolated_rng(device: torch.device) -> Any:
    """Run scoring without advancing training's CPU or CUDA random streams."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
