"""Pictures for Lightning's loggers: one small adapter per logger kind.

The callback and the models say *what* to show (a histogram, an image, a figure, a table, text); a
:class:`Dashboard` adapter gives it to its logger in that logger's own form (``wandb.Histogram`` and
``wandb.Table`` for W&B, ``add_histogram`` and ``add_image`` for TensorBoard). Loggers without pictures
(``CSVLogger``) get the base adapter, which shows nothing: their numbers come from ``log_metrics``.
Other loggers are added with :func:`register_dashboard`, by class name, so that no logger's package is
imported unless it is used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor
from torchvision.io import ImageReadMode, decode_png, read_file
from torchvision.utils import save_image

from fimcb.core.registry import register
from fimcb.lightning.runs import is_smoke_test, logger_folder
from fimcb.run.folder import RunArtifacts
from fimcb.run.history import trajectory_rows
from fimcb.viz.figures import roc_curves_of

HISTOGRAM_BINS = 64
CURVE_POINTS = 200  # points per curve of an interactive chart (a ROC curve has one per sample)
Points = Sequence[float] | np.ndarray
Curve = tuple[Points, Points]


class Dashboard:
    """The adapter of a logger that takes only numbers: every picture is dropped."""

    #: Whether pictures reach the logger, so that callers can skip drawing them for nothing.
    shows_pictures = False

    def __init__(self, logger: Any) -> None:
        self.logger = logger

    def histogram(self, key: str, values: Tensor, step: int) -> None:
        """A histogram of ``values`` at ``step`` (one slice of a histogram-over-time panel)."""

    def image(self, key: str, image: Tensor, step: int) -> None:
        """A ``[C, H, W]`` image with values in ``[0, 1]``."""

    def table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        """A table of ``rows``, one value per column."""

    def text(self, key: str, texts: Sequence[str], step: int) -> None:
        """Lines of text, shown verbatim."""

    def curves(
        self, key: str, curves: Mapping[str, Curve], step: int, title: str = "", xname: str = "x"
    ) -> None:
        """Named ``(x, y)`` curves on one chart, for loggers with interactive charts (the figure of the
        same curves reaches the others)."""

    def summary(self, values: Mapping[str, float]) -> None:
        """Final values of a run (the OOD table), where the logger keeps them apart from its series."""

    def artifact(self, folder: Path, name: str) -> None:
        """The run folder's files, where the logger stores files for others to download."""

    def define_series(self, prefixes: Sequence[str]) -> None:
        """Declare the series logged under ``prefixes`` as functions of the trainer's global step."""

    def figure(self, key: str, figure: Figure, step: int) -> None:
        """A matplotlib figure, rendered to an image."""
        self.image(key, figure_to_image(figure), step)

    def png(self, key: str, path: str | Path, step: int) -> None:
        """A PNG file already rendered (a figure written to disk): decoded, not drawn again."""
        self.image(key, decode_png(read_file(str(path)), ImageReadMode.RGB).float() / 255, step)


class WandbDashboard(Dashboard):
    """Weights & Biases: histograms over steps, images, tables (``WandbLogger``)."""

    shows_pictures = True

    def histogram(self, key: str, values: Tensor, step: int) -> None:
        import wandb

        finite = values[torch.isfinite(values)].double().cpu().numpy()
        if len(finite):
            histogram = wandb.Histogram(finite.tolist(), num_bins=HISTOGRAM_BINS)
            self.logger.log_metrics({key: histogram}, step=step)

    def image(self, key: str, image: Tensor, step: int) -> None:
        self.logger.log_image(key=key, images=[image], step=step)

    def table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        self.logger.log_table(key=key, columns=list(columns), data=[list(r) for r in rows], step=step)

    def text(self, key: str, texts: Sequence[str], step: int) -> None:
        self.logger.log_text(key=key, columns=["step", "sample"], data=[[step, text] for text in texts])

    def curves(
        self, key: str, curves: Mapping[str, Curve], step: int, title: str = "", xname: str = "x"
    ) -> None:
        import wandb

        xs, ys = zip(*(_thinned(x, y) for x, y in curves.values()), strict=True)
        chart = wandb.plot.line_series(xs=xs, ys=ys, keys=list(curves), title=title, xname=xname)
        self.logger.log_metrics({key: chart}, step=step)

    def summary(self, values: Mapping[str, float]) -> None:
        self.logger.experiment.summary.update(dict(values))

    def artifact(self, folder: Path, name: str) -> None:
        import wandb

        artifact = wandb.Artifact(
            name, type="fimcb-run", description="fimcb run folder: history, OOD results"
        )
        artifact.add_dir(str(folder))
        self.logger.experiment.log_artifact(artifact)

    def define_series(self, prefixes: Sequence[str]) -> None:
        experiment = self.logger.experiment
        experiment.define_metric("trainer/global_step")
        for prefix in prefixes:
            experiment.define_metric(f"{prefix}*", step_metric="trainer/global_step")


class TensorBoardDashboard(Dashboard):
    """TensorBoard: histograms over steps, images, and tables and text as (markdown) text."""

    shows_pictures = True

    def histogram(self, key: str, values: Tensor, step: int) -> None:
        finite = values[torch.isfinite(values)].double().cpu()
        if len(finite):
            self.logger.experiment.add_histogram(key, finite, global_step=step)

    def image(self, key: str, image: Tensor, step: int) -> None:
        self.logger.experiment.add_image(key, image, global_step=step)

    def table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
        self.logger.experiment.add_text(key, "\n".join(lines), global_step=step)

    def text(self, key: str, texts: Sequence[str], step: int) -> None:
        body = "\n".join(f"    {line}" for text in texts for line in text.splitlines() or [""])
        self.logger.experiment.add_text(key, body, global_step=step)  # indented: shown verbatim


_REGISTRY: dict[str, type[Dashboard]] = {
    "WandbLogger": WandbDashboard,
    "TensorBoardLogger": TensorBoardDashboard,
}


def register_dashboard(logger_class_name: str, adapter: type[Dashboard], *, overwrite: bool = False) -> None:
    """Use ``adapter`` for loggers of class ``logger_class_name`` (or a subclass of it); refuses to replace
    another adapter unless ``overwrite``."""
    register(_REGISTRY, adapter, logger_class_name, what="a dashboard for", overwrite=overwrite)


def show_run(board: Dashboard, run: RunArtifacts, paths: Mapping[str, Path], step: int, prefix: str) -> None:
    """A run's figures (the written PNGs), its probe trajectories and interactive ROC charts, where the
    dashboard offers them, under ``prefix``."""
    for name, path in paths.items():
        board.png(f"{prefix}/{name}", path, step)
    if run.history is not None:
        board.table(f"{prefix}/trajectories", *trajectory_rows(run.history), step)
    scores = run.ood_scores or {}
    for method in scores.get("test", {}):
        board.curves(f"{prefix}/roc/{method}", roc_curves_of(scores, method), step, f"ROC: {method}", "FPR")


def dashboard_for(logger: Any) -> Dashboard:
    """The adapter registered for the nearest class of ``logger`` (the numbers-only one if none)."""
    for cls in type(logger).__mro__:
        if cls.__name__ in _REGISTRY:
            return _REGISTRY[cls.__name__](logger)
    return Dashboard(logger)


def dashboards(trainer: L.Trainer) -> list[Dashboard]:
    """The adapters of the trainer's loggers on global rank zero (the only rank that logs), else none."""
    return [dashboard_for(logger) for logger in trainer.loggers] if trainer.is_global_zero else []


def figure_to_image(figure: Figure) -> Tensor:
    """Render ``figure`` to a ``[3, H, W]`` float image in ``[0, 1]`` (Agg: no display needed)."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    rgba = torch.frombuffer(bytearray(canvas.buffer_rgba()), dtype=torch.uint8)
    width, height = canvas.get_width_height()
    return rgba.reshape(height, width, 4)[..., :3].permute(2, 0, 1).float() / 255


def log_image(trainer: L.Trainer, key: str, image: Tensor, step: int) -> None:
    """Log a ``[C, H, W]`` image in ``[0, 1]`` to every logger that takes images, and as a PNG file."""
    path = _sample_file(trainer, "images", key, step, ".png")
    for dashboard in dashboards(trainer):
        dashboard.image(key, image, step)
    if path is not None:
        save_image(image, path)


def log_text(trainer: L.Trainer, key: str, texts: list[str], step: int) -> None:
    """Log lines of text to every logger that takes text (W&B table, TensorBoard) and as a text file."""
    path = _sample_file(trainer, "samples", key, step, ".txt")
    for dashboard in dashboards(trainer):
        dashboard.text(key, texts, step)
    if path is not None:
        multiline = any("\n" in text for text in texts)
        separator = "\n" + "-" * 40 + "\n" if multiline else "\n"  # one line per sample where possible
        path.write_text(separator.join(texts) + "\n", encoding="utf-8")


def _sample_file(trainer: L.Trainer, folder: str, key: str, step: int, suffix: str) -> Path | None:
    """``<run's logger folder>/<folder>/<key>_step<step><suffix>`` (its folder made) on rank zero, else
    ``None``: in each run's own folder, whatever the logger (:func:`fimcb.lightning.runs.logger_folder`)."""
    if not trainer.is_global_zero or is_smoke_test(trainer):  # a smoke test writes no files
        return None
    path = logger_folder(trainer, new_version=False) / folder / f"{key}_step{step:07d}{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _thinned(x: Points, y: Points) -> tuple[list[float], list[float]]:
    """At most ``CURVE_POINTS`` of a curve's own points, evenly spaced along it, first and last kept."""
    keep = (
        sorted({round(i * (len(x) - 1) / (CURVE_POINTS - 1)) for i in range(CURVE_POINTS)}) if len(x) else []
    )
    return [float(x[i]) for i in keep], [float(y[i]) for i in keep]


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value).replace("|", "\\|")
