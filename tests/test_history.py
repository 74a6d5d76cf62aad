"""The per-sample history store: bounded buffering, parts that never overwrite, last recording wins."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fimcb.engine import LayerNorms
from fimcb.run.history import HistoryWriter, load_history


def _norms(n: int, value: float) -> LayerNorms:
    return LayerNorms(torch.full((n, 2), value), ("a", "b"), torch.full((n,), -value))


def test_writer_buffers_at_most_flush_rows_and_never_overwrites_parts(tmp_path: Path) -> None:
    writer = HistoryWriter(tmp_path, flush_rows=10)
    for step in range(5):
        writer.append("train_probe", step, 0, _norms(4, float(step + 1)), [7, 8, 9, 10])
        assert writer._buffered < 10  # flushed as soon as the buffer holds flush_rows rows
    writer.flush()
    parts = sorted(p.name for p in tmp_path.glob("part-*.pt"))
    assert parts == ["part-000000.pt", "part-000001.pt"]  # 12 rows at the third event, 8 at the end
    again = HistoryWriter(tmp_path, flush_rows=10)  # a resumed run appends after the existing parts
    again.append("train_probe", 4, 1, _norms(4, 99.0), [7, 8, 9, 10])  # step 4 recorded again
    assert again.flush().name == "part-000002.pt"
    history = load_history(tmp_path)
    assert len(history) == 5 * 4
    assert history.step.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4
    torch.testing.assert_close(history.total[-4:], torch.full((4,), 198.0))  # the later recording won
    assert history.epoch[-4:].tolist() == [1] * 4 and history.log_likelihood[0] == -1.0
    ids, steps, grid = history.trajectories("train_probe")
    assert ids.tolist() == [7, 8, 9, 10] and steps.tolist() == [0, 1, 2, 3, 4]
    torch.testing.assert_close(grid[:, 0], torch.full((4,), 2.0, dtype=torch.float64).log())


def test_history_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no history parts"):
        load_history(tmp_path)
    with pytest.raises(ValueError, match="2 ids for 3 rows"):
        HistoryWriter(tmp_path).append("val", 0, 0, _norms(3, 1.0), [1, 2])
    writer = HistoryWriter(tmp_path)
    writer.append("val", 0, 0, _norms(1, 1.0), [0])
    writer.flush()
    other = HistoryWriter(tmp_path)
    other.append("val", 1, 0, LayerNorms(torch.ones(1, 1), ("c",), torch.zeros(1)), [0])
    other.flush()
    with pytest.raises(ValueError, match="different layers"):
        load_history(tmp_path)


def test_dataframe_has_one_column_per_layer(tmp_path: Path) -> None:
    writer = HistoryWriter(tmp_path)
    writer.append("val", 3, 1, _norms(2, 2.0), [5, 6])
    writer.flush()
    frame = load_history(tmp_path).to_dataframe()
    columns = ["split", "step", "epoch", "id", "log_likelihood", "total", "layer/a", "layer/b"]
    assert list(frame.columns) == columns
    assert frame["total"].tolist() == [4.0, 4.0]


def test_per_step_quantiles_and_few_trajectories_of_a_batch_split(tmp_path: Path) -> None:
    """A split of training batches: new ids at every step, so no sample × step grid is formed."""
    writer = HistoryWriter(tmp_path)
    generator = torch.Generator().manual_seed(0)
    values = {}
    for step in (0, 5, 10):
        ids = torch.randperm(1000, generator=generator)[:7] + 10 * step
        totals = torch.rand(7, generator=generator) * 10 + 0.1
        totals[0] = float("nan") if step == 5 else totals[0]
        writer.append(
            "train_batch",
            step,
            0,
            LayerNorms(torch.stack([totals, totals], 1) / 2, ("a", "b"), torch.zeros(7)),
            ids,
        )
        values[step] = totals
    writer.flush()
    history = load_history(tmp_path)
    steps, quantiles = history.log_total_quantiles("train_batch", (0.25, 0.5, 0.75))
    assert steps.tolist() == [0, 5, 10]
    for t, step in enumerate((0, 5, 10)):
        logs = values[step].double().log().numpy()
        expected = np.nanpercentile(logs, [25, 50, 75])
        np.testing.assert_allclose(quantiles[:, t].numpy(), expected, rtol=1e-12)
    ids, few_steps, grid = history.trajectories("train_batch", max_ids=2)
    assert ids.tolist() == sorted(history.id.tolist())[:2] and grid.shape == (2, len(few_steps))
