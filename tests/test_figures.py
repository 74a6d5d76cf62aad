"""Run figures: the numbers each figure draws against hand-computed references, and every PNG non-blank."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from fimcb.engine import LayerNorms
from fimcb.evaluation.ood import ood_measures
from fimcb.run.folder import ARTIFACTS, RunDirectoryError, load_run
from fimcb.run.history import HistoryWriter, load_history
from fimcb.viz.figures import (
    influence_grid,
    layer_heatmap_data,
    novelty_quantiles,
    roc_curve_data,
    roc_curves,
    run_figures,
    sample_grid,
    save_run_figures,
    score_histograms,
    training_curves,
    training_curves_data,
    training_dynamics,
)

LAYERS = ("embed.weight", "block.0.weight", "head.bias")
#: (split, step, sample ids) of every event in the synthetic history.
EVENTS = [("train_probe", s, [3, 5, 7, 9]) for s in (0, 10, 20, 30)] + [
    ("val", s, [1, 2, 4]) for s in (10, 30)
]
METHODS = ("fim_gaussian", "likelihood")
OOD_SETS = {"noise": 2.0, "vflip": 0.5}  # OOD set -> shift of its scores
METRICS_COLUMNS = [
    "epoch",
    "fim/val/log_norm_mean",
    "step",
    "train/acc_epoch",
    "train/acc_step",
    "train/nll_step",
    "val/acc",
    "val/nll",
]


def make_run(
    directory: Path, artifacts: tuple[str, ...] = ARTIFACTS, tokens: bool = False, influence: bool = True
) -> dict[str, Any]:
    """A run directory written with the real writers and the callback's formats; returns what it wrote."""
    directory.mkdir(parents=True, exist_ok=True)
    written: dict[str, Any] = {}
    if "history" in artifacts:
        writer = HistoryWriter(directory / "history", flush_rows=9)  # several parts
        written["history"] = []
        for split, step, ids in EVENTS:
            values = torch.randn(len(ids), len(LAYERS)).mul(2).exp()
            if split == "train_probe" and step == 20:
                values[1, 2] = math.nan  # a non-finite norm is left out of the means
            norms = LayerNorms(values, LAYERS, -values.sum(1))
            writer.append(split, step, step // 10, norms, ids)
            written["history"].append((split, step, ids, values))
        writer.flush()
    scores = {"test": {m: torch.randn(60) for m in METHODS}}
    scores |= {name: {m: torch.randn(40) + shift for m in METHODS} for name, shift in OOD_SETS.items()}
    written["scores"] = scores
    if "ood_scores.pt" in artifacts:
        torch.save(scores, directory / "ood_scores.pt")
    if "ood_metrics.json" in artifacts:
        metrics = {o: {m: ood_measures(scores["test"][m], scores[o][m]) for m in METHODS} for o in OOD_SETS}
        (directory / "ood_metrics.json").write_text(json.dumps(metrics))
        written["ood_metrics"] = metrics
    if "novel_samples.pt" in artifacts:
        written["novel_samples"] = _novel_samples(tokens, influence)
        torch.save(written["novel_samples"], directory / "novel_samples.pt")
    if "metrics.csv" in artifacts:
        with open(directory / "metrics.csv", "w", newline="") as file:
            out = csv.DictWriter(file, METRICS_COLUMNS, restval="")
            out.writeheader()
            for step in range(0, 40, 5):
                out.writerow({"step": step, "train/acc_step": step / 35, "train/nll_step": 4.0 - 0.1 * step})
                if step % 10 == 0:
                    epoch = {"epoch": step // 10, "fim/val/log_norm_mean": 3.0, "train/acc_epoch": step / 30}
                    out.writerow({**epoch, "step": step, "val/acc": step / 40, "val/nll": 4.5 - 0.05 * step})
    (directory / "config.yaml").write_text(
        "model:\n  class_path: fimcb.models.VAE\ndata:\n  class_path: fimcb.data.ImageDataModule\n"
    )
    return written


def _samples(k: int, tokens: bool, offset: float = 0.0) -> dict[str, Any]:
    if tokens:
        ids = torch.randint(0, 10, (k, 6))
        return {"input": ids, "text": [" ".join(f"tok{t}" for t in row.tolist()) for row in ids]}
    return {"input": torch.rand(k, 3, 8, 8) * 4 - 2 + offset}


def _novel_samples(tokens: bool, influence: bool) -> dict[str, Any]:
    k = 4
    sets = {}
    for name in ("test", *OOD_SETS):
        most = {"index": torch.arange(k) * 3, "score": torch.linspace(9, 6, k), **_samples(k, tokens, 1.0)}
        if not tokens:
            most["saliency"] = torch.rand(k, 8, 8)
        least = {"index": torch.arange(k) + 100, "score": torch.linspace(-1, -4, k), **_samples(k, tokens)}
        sets[name] = {"most": most, "least": least}
    result: dict[str, Any] = {"method": "fim_gaussian", "sets": sets}
    if influence:
        queries = []
        for i, name in enumerate(("test", "noise")):
            one = _samples(1, tokens)
            query = {"set": name, "index": i, "score": 5.0 + i, "input": one["input"][0]}
            if tokens:
                query["text"] = one["text"][0]
            for key, sign in (("top", 1.0), ("bottom", -1.0)):
                ranked = {"index": torch.arange(3) + 10 * i, "value": sign * torch.rand(3)}
                query[key] = {**ranked, **_samples(3, tokens)}
            queries.append(query)
        result["influence"] = {"metric": "layer_scalar", "queries": queries}
    return result


def assert_png(path: Path) -> None:
    """A PNG that decodes, has a real size and is not one flat colour."""
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100, pixels.shape
    assert pixels[..., :3].var() > 0


def test_layer_heatmap_data_is_the_mean_log_norm_per_layer_and_step(tmp_path: Path) -> None:
    written = make_run(tmp_path, ("history",))
    history = load_history(tmp_path / "history")
    for split in ("train_probe", "val"):
        steps, names, grid = layer_heatmap_data(history, split)
        events = [(step, values.double().numpy()) for s, step, _, values in written["history"] if s == split]
        assert steps.tolist() == [step for step, _ in events] and names == LAYERS
        assert grid.shape == (len(LAYERS), len(events))
        for t, (_, values) in enumerate(events):
            for layer in range(len(LAYERS)):
                column = values[:, layer]
                expected = sum(math.log(v) for v in column if math.isfinite(v)) / np.isfinite(column).sum()
                assert grid[layer, t] == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match=r"no rows of split 'test'.*train_probe"):
        layer_heatmap_data(history, "test")


def test_novelty_quantiles_are_the_percentiles_of_the_log_total_norm(tmp_path: Path) -> None:
    written = make_run(tmp_path, ("history",))
    history = load_history(tmp_path / "history")
    steps, quantiles = novelty_quantiles(history, "train_probe")
    events = [(step, values.double()) for s, step, _, values in written["history"] if s == "train_probe"]
    assert steps.tolist() == [0, 10, 20, 30]
    for t, (_, values) in enumerate(events):
        totals = [math.log(v) for v in values.sum(1).tolist() if math.isfinite(v)]  # the NaN row is left out
        assert len(totals) == (3 if t == 2 else 4)
        np.testing.assert_allclose(quantiles[:, t], np.percentile(totals, [25, 50, 75]), rtol=1e-6)


def test_roc_curve_data_agrees_with_sklearn() -> None:
    scores_in = torch.randn(300).round(decimals=1)  # ties inside and across the sets
    scores_out = (torch.randn(200) + 0.8).round(decimals=1)
    fpr, tpr, auroc = roc_curve_data(scores_in, scores_out)
    labels = np.r_[np.zeros(300), np.ones(200)]
    raw = torch.cat([scores_in, scores_out]).double().numpy()
    ref_fpr, ref_tpr, _ = roc_curve(labels, raw, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-6)
    np.testing.assert_allclose(tpr, ref_tpr, atol=1e-6)
    assert auroc == pytest.approx(roc_auc_score(labels, raw), abs=1e-6)
    assert auroc == ood_measures(scores_in, scores_out)["auroc"]  # the number the run reports


def test_roc_figure_draws_one_panel_per_method_and_the_curve_data(tmp_path: Path) -> None:
    scores = make_run(tmp_path, ())["scores"]
    fig = roc_curves(scores)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == list(METHODS)
    fpr, tpr, auroc = roc_curve_data(scores["test"]["likelihood"], scores["vflip"]["likelihood"])
    curve = next(line for line in panels[1].get_lines() if line.get_label().startswith("vflip"))
    np.testing.assert_allclose(curve.get_xdata(), fpr)
    np.testing.assert_allclose(curve.get_ydata(), tpr)
    assert curve.get_label() == f"vflip ({auroc:.3f})"
    assert len(roc_curves(scores, "likelihood").axes) == 1
    with pytest.raises(ValueError, match="no scores of method 'nope'"):
        roc_curves(scores, "nope")
    with pytest.raises(ValueError, match="in-distribution set 'test'"):
        roc_curves({"noise": scores["noise"]})
    with pytest.raises(ValueError, match="no OOD set"):
        roc_curves({"test": scores["test"]})


def test_score_histograms_are_densities_and_count_non_finite_scores() -> None:
    noise = torch.cat([torch.randn(50) + 3, torch.tensor([math.nan])])
    scores = {"test": {"m": torch.randn(100)}, "noise": {"m": noise}}
    fig = score_histograms(scores, "m")
    (ax,) = fig.axes
    for container in ax.containers:
        heights = np.array([patch.get_height() for patch in container])
        widths = np.array([patch.get_width() for patch in container])
        assert (heights * widths).sum() == pytest.approx(1.0)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["test", "noise (1 non-finite)"]
    wide = {"test": {"m": torch.rand(50) + 1}, "noise": {"m": torch.rand(50) * 1e6 + 1}}
    assert score_histograms(wide, "m").axes[0].get_xscale() == "log"  # > 3 decades: log-spaced bins


def test_training_curves_data_reads_path_mapping_and_dataframe_alike(tmp_path: Path) -> None:
    make_run(tmp_path, ("metrics.csv",))
    curves = training_curves_data(tmp_path / "metrics.csv")
    assert list(curves) == ["acc", "nll"]  # fim/val/log_norm_mean and epoch are not training curves
    names = {name: (steps, values) for name, steps, values in curves["nll"]}
    assert set(names) == {"train/nll_step", "val/nll"}
    np.testing.assert_array_equal(names["train/nll_step"][0], np.arange(0, 40, 5))
    np.testing.assert_allclose(names["val/nll"][1], [4.5 - 0.05 * s for s in range(0, 40, 10)])
    pandas = pytest.importorskip("pandas")
    frame = pandas.read_csv(tmp_path / "metrics.csv")
    for other in (frame, {c: frame[c].to_numpy() for c in frame.columns}):
        again = training_curves_data(other)
        for quantity, lines in curves.items():
            for (name, steps, values), (name2, steps2, values2) in zip(lines, again[quantity], strict=True):
                assert name == name2
                np.testing.assert_array_equal(steps, steps2)
                np.testing.assert_array_equal(values, values2)
    fig = training_curves(frame)
    assert sorted(ax.get_title() for ax in fig.axes if ax.get_title()) == ["acc", "nll"]
    with pytest.raises(ValueError, match="no 'step' column"):
        training_curves_data({"val/nll": [1.0]})
    with pytest.raises(ValueError, match="no '<split>/<quantity>' column"):
        training_curves({"step": [0.0], "fim/val/log_norm_mean": [1.0]})


def test_training_dynamics_puts_accuracy_nll_and_fim_norm_on_one_time_axis(tmp_path: Path) -> None:
    make_run(tmp_path, ("history", "metrics.csv"))
    history = load_history(tmp_path / "history")
    fig = training_dynamics(history, tmp_path / "metrics.csv")
    top, bottom, right = fig.axes
    assert [line.get_label() for line in top.get_lines()] == ["train/acc_epoch", "val/acc"]
    assert [line.get_label() for line in right.get_lines()] == ["train/nll_step", "val/nll"]
    np.testing.assert_allclose(top.get_lines()[1].get_ydata(), [s / 40 for s in range(0, 40, 10)])
    steps, quantiles = novelty_quantiles(history, "val")
    val = next(line for line in bottom.get_lines() if line.get_label().startswith("val"))
    np.testing.assert_array_equal(val.get_xdata(), steps)
    np.testing.assert_allclose(val.get_ydata(), quantiles[1])
    only_nll = training_dynamics(history, {"step": [0.0, 1.0], "val/nll": [2.0, 1.0]})
    assert len(only_nll.axes) == 2 and only_nll.axes[0].get_ylabel() == "NLL (dashed)"  # no empty twin
    with pytest.raises(ValueError, match="neither"):
        training_dynamics(history, {"step": [0.0], "train/bpd": [1.0]})


def _tiles(fig) -> tuple[np.ndarray, list[str]]:
    """The mosaic a grid figure draws and its texts (captions, row labels), in drawing order."""
    (ax,) = fig.axes
    (image,) = ax.get_images()
    return np.asarray(image.get_array()), [t.get_text() for t in ax.texts]


def test_sample_grid_rescales_images_over_the_whole_grid_and_overlays_saliency() -> None:
    samples = _novel_samples(tokens=False, influence=False)
    samples["sets"]["test"]["most"]["input"][0] *= 0.1  # a narrow range: stretched if rescaled on its own
    canvas, texts = _tiles(sample_grid(samples, "most"))
    gap = 2  # round(0.3 * 8): the caption row above each 8 x 8 tile
    assert canvas.shape == (2 * 3 * (8 + gap), 4 * (8 + gap), 3)  # an image and a saliency row per set
    inputs = torch.cat([samples["sets"][s]["most"]["input"] for s in samples["sets"]])
    scaled = (inputs.double() - inputs.min()) / (inputs.max() - inputs.min())  # one range for the grid
    first = scaled[0].mean(0) if scaled.shape[1] == 1 else scaled[0].permute(1, 2, 0)
    tile = canvas[gap : gap + 8, gap // 2 : gap // 2 + 8]
    np.testing.assert_allclose(tile if scaled.shape[1] == 3 else tile[..., 0], first.numpy(), rtol=1e-6)
    assert canvas.min() >= 0 and canvas.max() <= 1
    heat = samples["sets"]["test"]["most"]["saliency"][0]
    hottest = divmod(int(heat.argmax()), 8)
    overlay = canvas[8 + 2 * gap + hottest[0], gap // 2 + hottest[1]]
    plain = canvas[gap + hottest[0], gap // 2 + hottest[1]]
    assert not np.allclose(overlay, plain)  # the saliency row blends the heat map over the image
    assert texts[:4] == ["#0 9", "#3 8", "#6 7", "#9 6"] and texts[4] == "test"
    assert texts[9] == "test: saliency"
    least_canvas, _ = _tiles(sample_grid(samples, "least"))
    assert least_canvas.shape[0] == 3 * (8 + gap)
    samples["sets"]["test"]["most"]["saliency"] = torch.rand(4, 7, 7)
    with pytest.raises(ValueError, match=r"saliency map of shape \[7, 7\] for an image of \[8, 8\]"):
        sample_grid(samples, "most")
    with pytest.raises(ValueError, match="'most' or 'least'"):
        sample_grid(samples, "median")


def test_token_samples_and_influence_are_shown_as_text() -> None:
    samples = _novel_samples(tokens=True, influence=True)
    texts = [t.get_text() for t in sample_grid(samples, "most").axes[0].texts]
    assert texts[0] == "test"
    assert texts[1].split() == ["#0", "9", *samples["sets"]["test"]["most"]["text"][0].split()]
    influence = samples["influence"]
    lines = [t.get_text() for t in influence_grid(influence).axes[0].texts]
    assert lines[0] == "test #0" and len(lines) == 2 * (1 + 1 + 3 + 3)
    top = influence["queries"][0]["top"]
    assert lines[2].split() == ["top", "#0", f"{float(top['value'][0]):.3g}", *top["text"][0].split()]
    one = {"index": torch.tensor([4]), "score": torch.tensor([1.5]), "input": torch.tensor([[7, 8]])}
    numbers = {"sets": {"test": {"least": one}}}
    assert sample_grid(numbers, "least").axes[0].texts[1].get_text().split() == ["#4", "1.5", "7", "8"]


def test_influence_grid_has_a_row_per_query_with_top_and_bottom_samples() -> None:
    influence = _novel_samples(tokens=False, influence=True)["influence"]
    canvas, texts = _tiles(influence_grid(influence))
    assert canvas.shape[:2] == (2 * (8 + 2), (1 + 3 + 3) * (8 + 2))
    assert texts[0] == "query 5" and texts[1].startswith("top #0 ") and texts[4].startswith("bottom #0 ")
    assert texts[7] == "test #0" and texts[-1] == "noise #1"


def test_run_figures_draws_what_the_artifacts_allow_and_every_png_is_an_image(tmp_path: Path) -> None:
    make_run(tmp_path)
    paths = save_run_figures(tmp_path)
    expected = {
        "training_curves",
        "training_dynamics",
        "novelty_over_time",
        "layer_heatmap_train_probe",
        "layer_heatmap_val",
        "roc_curves",
        "score_histograms_fim_gaussian",
        "score_histograms_likelihood",
        "novel_samples_most",
        "novel_samples_least",
        "influence",
    }
    assert set(paths) == expected
    for path in paths.values():
        assert path.parent == tmp_path / "figures"
        assert_png(path)
    only_csv = tmp_path / "csv_only"
    make_run(only_csv, ("metrics.csv",))
    assert set(run_figures(only_csv)) == {"training_curves"}
    tokens = tmp_path / "tokens"
    make_run(tokens, ("novel_samples.pt",), tokens=True, influence=False)
    titles = {name: fig.get_suptitle().split()[0] for name, fig in run_figures(tokens).items()}
    assert titles == {"novel_samples_most": "most", "novel_samples_least": "least"}
    for path in save_run_figures(tokens, tmp_path / "out").values():
        assert_png(path)


def test_load_run_lists_what_is_missing_and_rejects_empty_directories(tmp_path: Path) -> None:
    make_run(tmp_path, ("ood_metrics.json", "history"))
    run = load_run(tmp_path)
    assert run.missing == ("ood_scores.pt", "novel_samples.pt", "metrics.csv")
    assert run.history is not None and run.ood_scores is None
    with pytest.raises(RunDirectoryError, match="not found"):
        load_run(tmp_path / "nope")
    (tmp_path / "empty" / "history").mkdir(parents=True)
    with pytest.raises(RunDirectoryError, match="none of the run artifacts"):
        load_run(tmp_path / "empty")
    (tmp_path / "empty" / "ood_scores.pt").write_text("not a tensor file")
    with pytest.raises(ValueError, match=r"cannot read .*ood_scores\.pt"):
        load_run(tmp_path / "empty")
