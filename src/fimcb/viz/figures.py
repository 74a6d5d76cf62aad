"""Figures of a finished run: FIM-norms over training, per-layer heat maps, OOD curves, novel samples.

Every function builds a :class:`matplotlib.figure.Figure` directly, never through pyplot: no GUI
backend, no global figure registry, nothing to close, safe in a headless job (``fig.savefig(path)``
renders with Agg). :func:`run_figures` draws every figure a run folder's artifacts allow
(:func:`fimcb.run.folder.load_run` reads them)
and :func:`save_run_figures` writes them as PNGs. The ``*_data`` functions return the numbers a
figure draws, so that they can be checked or reused without a plot.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor
from torchmetrics.functional.classification import binary_roc

from fimcb.core.norms import log_norms
from fimcb.evaluation.ood import ood_measures, to_unit_interval
from fimcb.run.folder import MetricsFrame, RunArtifacts, load_metrics_csv, load_run
from fimcb.run.history import History

DPI = 110
TITLE_SIZE, LABEL_SIZE, TICK_SIZE, CAPTION_SIZE = 10, 9, 8, 7
_SPLIT_COLORS = {"train_batch": "C9", "train": "C0", "val": "C1", "test": "C2"}  # first matching prefix
Scores = Mapping[str, Mapping[str, Tensor]]


# ---- styling -------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _style(ax: Axes, title: str | None = None, xlabel: str | None = None, ylabel: str | None = None) -> None:
    """The look every panel shares: light grid, no top/right frame, one set of font sizes."""
    ax.grid(alpha=0.3, linewidth=0.5)
    ax.spines[["top", "right"]].set_visible(False)
    ax.tick_params(labelsize=TICK_SIZE)
    if title:
        ax.set_title(title, fontsize=TITLE_SIZE)
    if xlabel:
        ax.set_xlabel(xlabel, fontsize=LABEL_SIZE)
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=LABEL_SIZE)


def _color(name: str, index: int) -> str:
    """Train, val and test keep one colour in every figure; other names cycle through the rest."""
    for prefix, color in _SPLIT_COLORS.items():
        if name.startswith(prefix):
            return color
    return f"C{3 + index % 6}"  # C3..C8: C9 is train_batch's


def _panels(n: int, width: float = 3.2, height: float = 3.0, max_cols: int = 4) -> tuple[Figure, list[Axes]]:
    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    fig = _figure(width * cols, height * rows)
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax in axes[n:]:
        ax.set_axis_off()
    return fig, axes[:n]


def png_bytes(fig: Figure, dpi: int = DPI) -> bytes:
    """The figure rendered as PNG."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


# ---- FIM-norm history ----------------------------------------------------------------------


def _split_rows(history: History, split: str) -> History:
    rows = history.select(split)
    if not len(rows):
        raise ValueError(f"no rows of split {split!r} in the history; it has {_splits(history)}")
    return rows


def _splits(history: History) -> list[str]:
    return list(dict.fromkeys(history.split))


def novelty_quantiles(history: History, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps [T], quantiles [3, T])``: the 25th, 50th and 75th percentile over the split's samples of
    the log total squared FIM-norm at each step (samples not scored at a step left out)."""
    _split_rows(history, split)
    steps, quantiles = history.log_total_quantiles(split, (0.25, 0.5, 0.75))
    return steps.numpy(), quantiles.numpy()


def novelty_over_time(
    history: History, splits: Sequence[str] | None = None, n_trajectories: int = 3
) -> Figure:
    """Per split, the median log total FIM-norm over steps with its interquartile band, and thin lines for
    the first ``n_trajectories`` probe samples."""
    splits = list(splits) if splits is not None else _splits(history)
    fig = _figure(7.0, 3.8)
    ax = fig.subplots()
    for i, split in enumerate(splits):
        steps, (q25, q50, q75) = novelty_quantiles(history, split)
        _, few_steps, grid = history.trajectories(split, max_ids=n_trajectories)
        color = _color(split, i)
        for row in grid.numpy():
            seen = np.isfinite(row)
            ax.plot(few_steps[seen].numpy(), row[seen], color=color, linewidth=0.6, alpha=0.45)
        ax.fill_between(steps, q25, q75, color=color, alpha=0.2, linewidth=0)
        marker = "o" if len(steps) < 3 else None
        ax.plot(steps, q50, color=color, linewidth=2, marker=marker, label=f"{split} (median, IQR)")
    _style(ax, "FIM-norm of probe samples over training", "step", r"$\log \|s\|^2$ (total)")
    ax.legend(fontsize=TICK_SIZE)
    return fig


def layer_heatmap_data(history: History, split: str) -> tuple[np.ndarray, tuple[str, ...], np.ndarray]:
    """``(steps [T], names [L], grid [L, T])``: the mean over the split's samples of ``log ||s_l||²`` per
    layer and step (norms floored at ``LOG_FLOOR`` as in the detectors; non-finite rows left out)."""
    rows = _split_rows(history, split)
    steps, column = torch.unique(rows.step, return_inverse=True)
    logs = log_norms(rows.layers)
    finite = torch.isfinite(logs)
    shape = (len(steps), logs.shape[1])
    sums = torch.zeros(shape, dtype=torch.float64).index_add_(0, column, torch.where(finite, logs, 0.0))
    counts = torch.zeros(shape, dtype=torch.float64).index_add_(0, column, finite.double())
    return steps.numpy(), history.names, (sums / counts).T.numpy()


def layer_heatmap(history: History, split: str, max_labels: int = 45) -> Figure:
    """Mean log squared norm per layer (rows, in parameter order) and step (columns) of one split."""
    steps, names, grid = layer_heatmap_data(history, split)
    fig = _figure(8.0, float(np.clip(0.16 * len(names) + 1.6, 3.0, 14.0)))
    ax = fig.subplots()
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis")
    every = math.ceil(len(names) / max_labels)
    ax.set_yticks(range(0, len(names), every), [names[i] for i in range(0, len(names), every)])
    columns = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 8)).round().astype(int))
    ax.set_xticks(columns, [str(steps[c]) for c in columns])
    ax.tick_params(labelsize=CAPTION_SIZE)
    ax.set_title(f"{split}: mean log squared norm per layer", fontsize=TITLE_SIZE)
    ax.set_xlabel("step", fontsize=LABEL_SIZE)
    bar = fig.colorbar(image, ax=ax, shrink=0.8)
    bar.set_label(r"mean $\log \|s_l\|^2$", fontsize=LABEL_SIZE)
    bar.ax.tick_params(labelsize=TICK_SIZE)
    return fig


# ---- OOD scores ----------------------------------------------------------------------------


def _methods(scores: Scores, method: str | None) -> tuple[list[str], list[str]]:
    """The methods to draw and the OOD sets, after checking the scores mapping."""
    if "test" not in scores:
        raise ValueError(
            f"scores need the in-distribution set 'test' beside the OOD sets, got {list(scores)}"
        )
    ood_sets = [name for name in scores if name != "test"]
    if not ood_sets:
        raise ValueError("scores hold only the in-distribution set 'test': no OOD set to compare with")
    available = list(scores["test"])
    if method is not None and method not in available:
        raise ValueError(f"no scores of method {method!r}; the scores have {available}")
    return ([method] if method is not None else available), ood_sets


def roc_curve_data(scores_in: Tensor, scores_out: Tensor) -> tuple[np.ndarray, np.ndarray, float]:
    """``(fpr, tpr, auroc)`` of in-distribution (negatives) vs OOD (positives) scores, higher = more novel,
    mapped onto [0, 1] as :func:`fimcb.evaluation.ood_measures` does (so the AUROC is the reported one)."""
    auroc = ood_measures(scores_in, scores_out)["auroc"]
    preds = to_unit_interval(torch.cat([scores_in, scores_out]))
    is_ood = torch.cat([torch.zeros(len(scores_in)), torch.ones(len(scores_out))]).long()
    fpr, tpr, _ = binary_roc(preds, is_ood)
    return fpr.numpy(), tpr.numpy(), auroc


def roc_curves_of(scores: Scores, method: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"<OOD set> (<AUROC>)": (fpr, tpr)}``: one method's ROC curve of ``test`` vs each OOD set."""
    _, ood_sets = _methods(scores, method)
    curves = {}
    for ood in ood_sets:
        fpr, tpr, auroc = roc_curve_data(scores["test"][method], scores[ood][method])
        curves[f"{ood} ({auroc:.3f})"] = (fpr, tpr)
    return curves


def roc_curves(scores: Scores, method: str | None = None) -> Figure:
    """ROC curves of ``test`` vs each OOD set: a panel per method (or only ``method``), AUROC in legend."""
    methods, ood_sets = _methods(scores, method)
    fig, axes = _panels(len(methods))
    for ax, name in zip(axes, methods, strict=True):
        for i, (label, (fpr, tpr)) in enumerate(roc_curves_of(scores, name).items()):
            ax.plot(fpr, tpr, color=_color(ood_sets[i], i), linewidth=1.5, label=label)
        ax.plot([0, 1], [0, 1], color="grey", linewidth=0.7, linestyle="--")
        ax.set(xlim=(0, 1), ylim=(0, 1), aspect="equal")
        _style(ax, name, "false positive rate (test)", "true positive rate (OOD)")
        ax.legend(
            title="OOD set (AUROC)", fontsize=CAPTION_SIZE, title_fontsize=CAPTION_SIZE, loc="lower right"
        )
    return fig


def _bins(values: np.ndarray) -> tuple[np.ndarray, bool]:
    """40 bins over the finite values, log-spaced (``True``) when they are positive and span > 3 decades."""
    low, high = values.min(), values.max()
    if low > 0 and high / low > 1e3:
        return np.geomspace(low, high, 41), True
    return np.histogram_bin_edges(values, bins=40), False


def score_histograms(scores: Scores, method: str) -> Figure:
    """Histograms of one method's scores, in-distribution (``test``) vs each OOD set, one panel per set."""
    _, ood_sets = _methods(scores, method)
    fig, axes = _panels(len(ood_sets), height=2.8)
    for i, (ax, ood) in enumerate(zip(axes, ood_sets, strict=True)):
        sets = {"test": scores["test"][method], ood: scores[ood][method]}
        values = {name: s.double().numpy() for name, s in sets.items()}
        finite = np.concatenate([v[np.isfinite(v)] for v in values.values()])
        if not len(finite):
            ax.text(0.5, 0.5, "no finite scores", ha="center", transform=ax.transAxes)
        else:
            bins, log = _bins(finite)
            for name, v in values.items():
                dropped = int((~np.isfinite(v)).sum())
                label = name + (f" ({dropped} non-finite)" if dropped else "")
                ax.hist(
                    v[np.isfinite(v)],
                    bins=bins.tolist(),
                    density=True,
                    alpha=0.5,
                    color=_color(name, i),  # the OOD set's colour in roc_curves
                    label=label,
                )
            if log:
                ax.set_xscale("log")
            ax.legend(fontsize=CAPTION_SIZE)
        _style(ax, f"test vs {ood}", f"{method} score (higher = more novel)", "density" if i == 0 else None)
    return fig


# ---- samples -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Cell:
    """One sample in a grid: its input, a one-line caption, its decoded text and a heat map to overlay."""

    input: Tensor
    caption: str
    text: str | None = None
    overlay: Tensor | None = None


def _is_image(x: Tensor) -> bool:
    return x.ndim == 3 and x.shape[0] in (1, 3) and x.is_floating_point()


def _as_text(cell: _Cell, width: int = 110) -> str:
    text = cell.text if cell.text is not None else " ".join(f"{v:.4g}" for v in cell.input.flatten().tolist())
    return text if len(text) <= width else text[: width - 1] + "…"


def _grid_figure(rows: Sequence[tuple[str, Sequence[_Cell]]], title: str) -> Figure:
    """Images as a grid (a row per entry, inputs rescaled over the whole grid), other inputs as text lines."""
    cells = [cell for _, row in rows for cell in row]
    if not cells:
        raise ValueError(f"{title}: no samples to show")
    if all(_is_image(cell.input) for cell in cells):
        return _image_grid(rows, title, cells)
    pad = max(len(cell.caption) for cell in cells) + 2
    lines: list[tuple[str, bool]] = []  # (text, is a row label)
    for label, row in rows:
        lines.append((label, True))
        lines.extend((f"{cell.caption:>{pad}}   {_as_text(cell)}", False) for cell in row)
    inches = max(0.07 * max(len(text) for text, _ in lines), 0.09 * len(title))  # monospace 8 pt, title 10 pt
    fig = _figure(float(np.clip(inches + 0.6, 4.0, 14.0)), 0.6 + 0.2 * len(lines))
    ax = fig.subplots()
    ax.set_axis_off()
    for i, (text, header) in enumerate(lines):
        y = 1 - (i + 0.5) / len(lines)
        weight = "bold" if header else "normal"
        ax.text(0, y, text, family="monospace", fontsize=TICK_SIZE, weight=weight, va="center")
    fig.suptitle(title, fontsize=TITLE_SIZE)
    return fig


def _image_grid(rows: Sequence[tuple[str, Sequence[_Cell]]], title: str, cells: list[_Cell]) -> Figure:
    """One mosaic image (a tile per cell, inputs rescaled over the whole grid) drawn by a single ``imshow``
    with the captions as text: a grid of a hundred small axes takes seconds to lay out and render."""
    values = torch.cat([cell.input.double().flatten() for cell in cells])
    values = values[torch.isfinite(values)]
    low, high = (float(values.min()), float(values.max())) if len(values) else (0.0, 1.0)
    span = high - low if high > low else 1.0
    height = max(cell.input.shape[1] for cell in cells)
    width = max(cell.input.shape[2] for cell in cells)
    gap = max(2, round(0.3 * height))  # room for a caption above each tile
    ncols = max(len(row) for _, row in rows)
    canvas = np.ones((len(rows) * (height + gap), ncols * (width + gap), 3))
    fig = _figure(1.25 * ncols + 0.8, 1.45 * len(rows) + 0.5)
    ax = fig.subplots()
    for r, (label, row) in enumerate(rows):
        top = r * (height + gap) + gap
        for c, cell in enumerate(row):
            left = c * (width + gap) + gap // 2
            tile = _tile(((cell.input.double() - low) / span).nan_to_num(0.0).clamp(0, 1), cell.overlay)
            canvas[top : top + tile.shape[0], left : left + tile.shape[1]] = tile
            ax.text(
                left + width / 2, top - 0.5, cell.caption, ha="center", va="bottom", fontsize=CAPTION_SIZE
            )
        ax.text(-0.5, top + height / 2, label, ha="right", va="center", rotation=90, fontsize=LABEL_SIZE)
    ax.imshow(canvas, interpolation="nearest", vmin=0, vmax=1)
    ax.set_axis_off()
    fig.suptitle(title, fontsize=TITLE_SIZE)
    return fig


def _tile(image: Tensor, overlay: Tensor | None) -> np.ndarray:
    """An image in [0, 1] as ``[H, W, 3]``; under a heat map it is grey, the map blended on top in
    ``inferno`` with its own value as opacity (cold pixels transparent)."""
    if overlay is None and image.shape[0] == 3:
        return image.permute(1, 2, 0).numpy()
    grey = image.mean(0).numpy()[..., None].repeat(3, axis=2)
    if overlay is None:
        return grey
    heat = _heat(overlay, image.shape[1:])
    alpha = 0.85 * heat[..., None]
    return (1 - alpha) * grey + alpha * colormaps["inferno"](heat)[..., :3]


def _heat(saliency: Tensor, shape: torch.Size) -> np.ndarray:
    """A saliency map scaled to [0, 1] by its own maximum, checked against the image's height and width."""
    if saliency.shape != shape:
        raise ValueError(f"saliency map of shape {list(saliency.shape)} for an image of {list(shape)}")
    heat = saliency.double().nan_to_num(0.0).clamp_min(0)
    return (heat / heat.max().clamp_min(1e-300)).numpy()


def _cells(part: Mapping[str, Any], where: str, values: str, prefix: str = "") -> list[_Cell]:
    """The cells of one ranked part (``index``, ``values``, ``input``, optional ``text``) of the samples."""
    missing = [key for key in ("index", values, "input") if key not in part]
    if missing:
        raise ValueError(f"{where} lacks {missing}: expected keys 'index', {values!r}, 'input'")
    index, value, inputs = part["index"], part[values], part["input"]
    texts = part.get("text")
    sizes = {len(index), len(value), len(inputs), *([len(texts)] if texts is not None else [])}
    if len(sizes) != 1:
        raise ValueError(f"{where}: index, {values}, input (and text) differ in length")
    return [
        _Cell(inputs[i], f"{prefix}#{int(index[i])} {float(value[i]):.3g}", texts[i] if texts else None)
        for i in range(len(index))
    ]


def sample_grid(novel_samples: Mapping[str, Any], which: str = "most") -> Figure:
    """The ``which`` (``"most"`` or ``"least"``) novel samples of each set with their scores, one row per
    set; for ``"most"`` with saliency maps, a second row per set with the map (scaled to its maximum)
    over the image. Non-image inputs are listed as text (decoded when ``text`` is present)."""
    if which not in ("most", "least"):
        raise ValueError(f"which must be 'most' or 'least', got {which!r}")
    sets = novel_samples.get("sets")
    if not sets:
        raise ValueError(
            "novel_samples has no 'sets': expected {'method', 'sets': {name: {'most', 'least'}}}"
        )
    rows: list[tuple[str, list[_Cell]]] = []
    for name, entry in sets.items():
        if which not in entry:
            raise ValueError(f"novel_samples set {name!r} has no {which!r} entry")
        part = entry[which]
        cells = _cells(part, f"novel_samples set {name!r} ({which})", "score")
        rows.append((name, cells))
        saliency = part.get("saliency") if which == "most" else None
        if saliency is not None and all(_is_image(c.input) for c in cells):
            if len(saliency) != len(cells):
                raise ValueError(
                    f"novel_samples {name!r}: {len(saliency)} saliency maps for {len(cells)} inputs"
                )
            overlays = [_Cell(c.input, c.caption, overlay=m) for c, m in zip(cells, saliency, strict=True)]
            rows.append((f"{name}: saliency", overlays))
    method = novel_samples.get("method", "unknown detector")
    return _grid_figure(rows, f"{which} novel samples by {method} (score, higher = more novel)")


def influence_grid(influence: Mapping[str, Any]) -> Figure:
    """One row per query: the query, then its top and bottom training samples with their influence values."""
    queries = influence.get("queries")
    if not queries:
        raise ValueError("influence has no 'queries': expected {'metric': ..., 'queries': [...]}")
    rows = []
    for q in queries:
        where = f"influence query {q.get('set')}#{q.get('index')}"
        cells = [_Cell(q["input"], f"query {float(q['score']):.3g}", q.get("text"))]
        for key in ("top", "bottom"):
            if key in q:
                cells += _cells(q[key], f"{where} ({key})", "value", prefix=f"{key} ")
        rows.append((f"{q['set']} #{q['index']}", cells))
    metric = influence.get("metric", "FIM")
    return _grid_figure(rows, f"influence ({metric} inner product): training samples most and least aligned")


# ---- training curves -----------------------------------------------------------------------


def _columns(metrics: MetricsFrame) -> dict[str, np.ndarray]:
    """Float columns of a metrics.csv path, a mapping of columns or a pandas DataFrame."""
    if isinstance(metrics, (str, Path)):
        return load_metrics_csv(metrics)
    return {str(name): np.asarray(metrics[name], dtype=np.float64) for name in metrics}


def training_curves_data(metrics: MetricsFrame) -> dict[str, list[tuple[str, np.ndarray, np.ndarray]]]:
    """``{quantity: [(column, steps, values)]}`` of every ``<split>/<quantity>[_step|_epoch]`` column (one
    ``/``: the callback's ``fim/...`` and ``ood/...`` columns are drawn elsewhere), logged rows only."""
    columns = _columns(metrics)
    if "step" not in columns:
        raise ValueError(f"metrics have no 'step' column (columns: {sorted(columns)[:10]}...)")
    steps = columns["step"]
    curves: dict[str, list[tuple[str, np.ndarray, np.ndarray]]] = {}
    for name, values in columns.items():
        _, _, rest = name.partition("/")
        if not rest or "/" in rest:
            continue
        logged = np.isfinite(values) & np.isfinite(steps)
        if logged.any():
            quantity = re.sub(r"_(step|epoch)$", "", rest)
            curves.setdefault(quantity, []).append((name, steps[logged], values[logged]))
    return curves


def training_curves(metrics: MetricsFrame) -> Figure:
    """One panel per logged quantity (loss, NLL, accuracy, ...) over steps, a line per column; per-step
    columns thin, epoch and validation columns bold."""
    curves = training_curves_data(metrics)
    if not curves:
        raise ValueError("metrics hold no '<split>/<quantity>' column (e.g. train/nll_step, val/acc) to draw")
    fig, axes = _panels(len(curves), width=3.6, max_cols=3)
    for ax, (quantity, lines) in zip(axes, curves.items(), strict=True):
        for i, (name, steps, values) in enumerate(lines):
            per_step = name.endswith("_step")
            ax.plot(
                steps,
                values,
                color=_color(name, i),
                linewidth=0.7 if per_step else 1.6,
                alpha=0.5 if per_step else 1.0,
                marker="o" if len(steps) < 3 else None,
                label=name,
            )
        _style(ax, quantity, "step")
        ax.legend(fontsize=CAPTION_SIZE)
    return fig


def _series(metrics: MetricsFrame, quantity: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """One curve per split of ``quantity``: the plain or epoch column before the noisy per-step one."""
    rank = {quantity: 0, f"{quantity}_epoch": 1, f"{quantity}_step": 2}
    best: dict[str, tuple[int, tuple[str, np.ndarray, np.ndarray]]] = {}
    for curve in training_curves_data(metrics).get(quantity, []):
        split, _, rest = curve[0].partition("/")
        if split not in best or rank[rest] < best[split][0]:
            best[split] = (rank[rest], curve)
    return [curve for _, curve in best.values()]


def training_dynamics(history: History, metrics: MetricsFrame, log_steps: bool = True) -> Figure:
    """Training dynamics on one time axis: accuracy (left axis) and NLL (right, twin axis; or alone) of train
    and val above, the median FIM-norm of each history split with its interquartile band below."""
    columns = _columns(metrics)
    accuracy, nll = _series(columns, "acc"), _series(columns, "nll")
    if not accuracy and not nll:
        raise ValueError("metrics hold neither '<split>/acc' nor '<split>/nll' columns to draw")
    fig = _figure(7.5, 6.0)
    top, bottom = fig.subplots(2, 1, sharex=True)
    _style(top)
    loss = top.twinx() if accuracy and nll else top
    for i, (name, steps, values) in enumerate(accuracy):
        top.plot(steps, values, color=_color(name, i), linewidth=1.6, label=name)
    for i, (name, steps, values) in enumerate(nll):
        loss.plot(steps, values, color=_color(name, i), linewidth=1.0, linestyle="--", label=name)
    if accuracy:
        top.set_ylabel("accuracy (solid)", fontsize=LABEL_SIZE)
    if nll:
        loss.tick_params(labelsize=TICK_SIZE)
        loss.set_ylabel("NLL (dashed)", fontsize=LABEL_SIZE)
    handles = [h for ax in dict.fromkeys((top, loss)) for h in ax.get_legend_handles_labels()[0]]
    fig.legend(handles=handles, fontsize=CAPTION_SIZE, loc="outside upper center", ncols=4)
    for i, split in enumerate(_splits(history)):
        steps, (q25, q50, q75) = novelty_quantiles(history, split)
        color = _color(split, i)
        bottom.fill_between(steps, q25, q75, color=color, alpha=0.2, linewidth=0)
        bottom.plot(steps, q50, color=color, linewidth=1.6, label=f"{split} FIM-norm (median, IQR)")
    _style(bottom, None, "step", r"$\log \|s\|^2$ (total)")
    bottom.legend(fontsize=CAPTION_SIZE)
    if log_steps:
        bottom.set_xscale("symlog", linthresh=1.0)
    return fig


# ---- a whole run ---------------------------------------------------------------------------


def run_figures(run: str | Path | RunArtifacts) -> dict[str, Figure]:
    """Every figure the artifacts of a run allow, by name (a run directory or :func:`load_run`'s result).

    A figure that cannot be drawn (a malformed artifact) is left out with a warning naming it, so that
    one bad file does not cost the others."""
    run = run if isinstance(run, RunArtifacts) else load_run(run)
    figures: dict[str, Figure] = {}

    def add(name: str, draw: Callable[[], Figure]) -> None:
        try:
            figures[name] = draw()
        except Exception as err:
            warnings.warn(f"figure {name!r} of {run.directory} left out: {err}", stacklevel=3)

    has_steps = run.metrics is not None and "step" in run.metrics
    curves = training_curves_data(run.metrics) if has_steps else {}
    if curves:
        add("training_curves", lambda: training_curves(run.metrics))
    if run.history is not None:
        history = run.history
        if "acc" in curves or "nll" in curves:
            add("training_dynamics", lambda: training_dynamics(history, run.metrics))
        add("novelty_over_time", lambda: novelty_over_time(history))
        for split in _splits(history):
            add(f"layer_heatmap_{split}", partial(layer_heatmap, history, split))
    if run.ood_scores is not None:
        scores = run.ood_scores
        add("roc_curves", lambda: roc_curves(scores))
        for method in scores.get("test", {}):
            add(f"score_histograms_{method}", partial(score_histograms, scores, method))
    if run.novel_samples is not None:
        samples = run.novel_samples
        add("novel_samples_most", lambda: sample_grid(samples, "most"))
        add("novel_samples_least", lambda: sample_grid(samples, "least"))
        if samples.get("influence"):
            add("influence", lambda: influence_grid(samples["influence"]))
    return figures


def file_name(name: str) -> str:
    """A figure name as a safe PNG file name (set and method names may hold any character)."""
    return re.sub(r"[^\w.-]+", "_", name) + ".png"


def write_figures(figures: Mapping[str, Figure], out_dir: str | Path) -> dict[str, Path]:
    """Write each figure as ``out_dir/<name>.png``; the paths by name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / file_name(name) for name in figures}
    for name, figure in figures.items():
        paths[name].write_bytes(png_bytes(figure))
    return paths


def save_run_figures(run_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write :func:`run_figures` as PNGs to ``out_dir`` (default ``<run_dir>/figures``); paths by name."""
    run = load_run(run_dir)
    return write_figures(
        run_figures(run), Path(out_dir) if out_dir is not None else run.directory / "figures"
    )
