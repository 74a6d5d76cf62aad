"""Logger adapters: what W&B (offline run files), TensorBoard (event files) and CSV receive, read back."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from matplotlib.figure import Figure
from PIL import Image

from fimcb.engine import LayerNorms
from fimcb.lightning.dashboards import (
    Dashboard,
    TensorBoardDashboard,
    WandbDashboard,
    dashboard_for,
    figure_to_image,
    register_dashboard,
)
from fimcb.run.history import TRAJECTORY_COLUMNS, HistoryWriter, load_history, trajectory_rows


def _figure() -> Figure:
    figure = Figure(figsize=(2, 1.5), dpi=50)
    figure.add_subplot().plot([0, 1, 2], [2, 0, 1], color="red")
    return figure


def test_figure_to_image_renders_the_figure() -> None:
    image = figure_to_image(_figure())
    assert image.shape == (3, 75, 100) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) < float(image.max()) <= 1.0
    red = (image[0] > 0.8) & (image[1] < 0.3) & (image[2] < 0.3)
    assert red.any()  # the line is drawn, not only the white background


def test_adapters_are_chosen_by_logger_class(tmp_path: Path) -> None:
    assert isinstance(dashboard_for(TensorBoardLogger(tmp_path)), TensorBoardDashboard)
    csv = dashboard_for(CSVLogger(tmp_path))
    assert type(csv) is Dashboard
    csv.histogram("h", torch.ones(3), 0)  # numbers-only loggers accept pictures and drop them
    csv.figure("f", _figure(), 0)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]

    class MyLogger(CSVLogger):
        pass

    class MyDashboard(Dashboard):
        pass

    register_dashboard("MyLogger", MyDashboard)
    assert type(dashboard_for(MyLogger(tmp_path))) is MyDashboard
    register_dashboard("MyLogger", Dashboard, overwrite=True)


def test_tensorboard_receives_histograms_images_and_tables(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    board = dashboard_for(logger)
    values = torch.tensor([1.0, 2.0, 2.0, 3.0, float("nan")])
    board.histogram("fim/val/log_norm_hist", values, step=7)
    board.figure("fimcb/roc", _figure(), step=9)
    board.table(
        "fimcb/trajectories", ["split", "id", "log_norm"], [["val", 3, 1.25], ["val", 4, 2.5]], step=9
    )
    logger.experiment.flush()

    events = EventAccumulator(str(logger.log_dir), size_guidance={"tensors": 0, "images": 0, "histograms": 0})
    events.Reload()
    (hist,) = events.Histograms("fim/val/log_norm_hist")
    assert hist.step == 7
    assert hist.histogram_value.num == 4  # the NaN is left out
    assert hist.histogram_value.sum == pytest.approx(8.0)
    assert (hist.histogram_value.min, hist.histogram_value.max) == (1.0, 3.0)
    (image,) = events.Images("fimcb/roc")
    assert (image.step, image.width, image.height) == (9, 100, 75)
    decoded = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)))
    assert decoded.shape[:2] == (75, 100) and decoded.std() > 0
    (text,) = events.Tensors("fimcb/trajectories/text_summary")
    markdown = text.tensor_proto.string_val[0].decode()
    assert "| split | id | log_norm |" in markdown and "| val | 4 | 2.5 |" in markdown


def test_wandb_offline_run_files_hold_histograms_images_and_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger
    from wandb_records import history_rows

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(project="fimcb-test", save_dir=str(tmp_path), offline=True)
    board = dashboard_for(logger)
    assert isinstance(board, WandbDashboard)
    board.histogram("fim/val/log_norm_hist", torch.tensor([1.0, 2.0, 2.0, 3.0, float("inf")]), step=3)
    board.figure("fimcb/roc", _figure(), step=5)
    board.table(
        "fimcb/trajectories", ["split", "id", "log_norm"], [["val", 3, 1.25], ["val", 4, 2.5]], step=5
    )
    long = torch.linspace(0, 1, 1001)  # a curve of 1 001 points: thinned to 200 of its own points
    board.curves("fimcb/roc/m", {"a": ([0.0, 0.5, 1.0], [0.0, 0.8, 1.0]), "b": (long, long.square())}, step=5)
    wandb.finish()
    (run_dir,) = tmp_path.glob("wandb/offline-run-*")
    rows = history_rows(run_dir)

    (hist,) = [r for r in rows if "fim/val/log_norm_hist/_type" in r]
    assert hist["fim/val/log_norm_hist/_type"] == "histogram" and hist["trainer/global_step"] == 3
    counts, bins = hist["fim/val/log_norm_hist/values"], hist["fim/val/log_norm_hist/bins"]
    assert sum(counts) == 4 and bins[0] == 1.0 and bins[-1] == 3.0  # the inf is left out
    expected, _ = np.histogram([1.0, 2.0, 2.0, 3.0], bins=len(bins) - 1)
    assert counts == expected.tolist()

    (image_row,) = [r for r in rows if "fimcb/roc/_type" in r]
    assert image_row["trainer/global_step"] == 5
    (png,) = run_dir.glob("files/media/images/fimcb/roc_*.png")
    assert np.asarray(Image.open(png)).shape[:2] == (75, 100)

    (table_row,) = [r for r in rows if "fimcb/trajectories/_type" in r]
    table = json.loads((run_dir / "files" / table_row["fimcb/trajectories/path"]).read_text())
    assert table["columns"] == ["split", "id", "log_norm"]
    assert table["data"] == [["val", 3, 1.25], ["val", 4, 2.5]]

    (curve_row,) = [r for r in rows if "fimcb/roc/m_table/_type" in r]
    chart = json.loads((run_dir / "files" / curve_row["fimcb/roc/m_table/path"]).read_text())
    assert chart["columns"] == ["step", "lineKey", "lineVal"]
    a = [[x, y] for x, key, y in chart["data"] if key == "a"]
    b = [[x, y] for x, key, y in chart["data"] if key == "b"]
    assert a == [[0.0, 0.0], [0.5, 0.8], [1.0, 1.0]]
    assert len(b) == 200 and b[0][0] == 0.0 and b[-1][0] == 1.0
    assert all(y == pytest.approx(x * x) for x, y in b)  # points of the curve itself, not interpolated


def test_trajectory_rows_are_complete_trajectories_of_the_kept_ids(tmp_path: Path) -> None:
    writer = HistoryWriter(tmp_path)
    names = ("a", "b")
    for step in (0, 10, 20):
        for split, ids in (("train_probe", [5, 1, 9]), ("val", [2, 7])):
            values = torch.rand(len(ids), 2) + step
            norms = LayerNorms(values, names, -values.sum(1))
            writer.append(split, step, step // 10, norms, torch.tensor(ids))
    writer.flush()
    history = load_history(tmp_path)
    assert len(trajectory_rows(history, max_rows=7)[1]) == 2 * 3  # one whole trajectory per split
    columns, rows = trajectory_rows(history, max_rows=12)  # two ids per split, 3 events each
    assert columns == TRAJECTORY_COLUMNS
    kept = {(r[0], r[1]) for r in rows}
    assert kept == {("train_probe", 1), ("train_probe", 5), ("val", 2), ("val", 7)}
    assert len(rows) == 4 * 3  # every kept sample at every step
    for split, sample, step, epoch, log_norm, log_likelihood in rows:
        row = [
            i
            for i in range(len(history))
            if history.split[i] == split and history.id[i] == sample and history.step[i] == step
        ]
        (i,) = row
        assert epoch == step // 10
        assert log_norm == pytest.approx(float(history.total[i].double().log()))
        assert log_likelihood == pytest.approx(float(history.log_likelihood[i]))


def test_a_written_png_reaches_the_logger_as_the_figure_itself(tmp_path: Path) -> None:
    from fimcb.viz.figures import png_bytes

    figure = _figure()
    path = tmp_path / "figure.png"
    path.write_bytes(png_bytes(figure, dpi=50))
    shown = {}

    class Recorder(Dashboard):
        def image(self, key: str, image: torch.Tensor, step: int) -> None:
            shown[key, step] = image

    Recorder(None).png("fimcb/figure", path, step=3)
    torch.testing.assert_close(shown["fimcb/figure", 3], figure_to_image(figure))  # decoded, same pixels
