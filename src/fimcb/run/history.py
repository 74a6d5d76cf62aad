"""Per-sample FIM-norm histories: every tracking event's rows appended to a run directory in shards.

A row is one sample at one event: its split, global step, epoch, stable sample id, log-likelihood,
total squared FIM-norm and per-layer squared norms. :class:`HistoryWriter` keeps at most
``flush_rows`` rows in memory and writes each batch of rows as a new ``part-NNNNNN.pt`` file (plain
tensors and lists, ``torch.load(weights_only=True)``), never overwriting an earlier part, so a
resumed run appends after what its first life wrote. :func:`load_history` reads every part in order
and keeps, for each (split, step, sample id), the row written last: events replayed after a resume
replace their first recording instead of duplicating it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fimcb.core.norms import LayerNorms, log_norms

PART_GLOB = "part-*.pt"


class HistoryWriter:
    """Append per-sample rows to ``directory`` with bounded memory (see the module docstring)."""

    def __init__(self, directory: str | Path, flush_rows: int = 50_000) -> None:
        if flush_rows < 1:
            raise ValueError(f"flush_rows must be positive, got {flush_rows}")
        self.directory = Path(directory)
        self.flush_rows = flush_rows
        self._rows: list[dict[str, Any]] = []
        self._buffered = 0

    def append(
        self, split: str, step: int, epoch: int, norms: LayerNorms, ids: Sequence[int] | Tensor
    ) -> None:
        """Buffer one event's rows (one per row of ``norms``, ``ids`` their stable sample ids)."""
        ids = torch.as_tensor(ids, dtype=torch.int64).cpu()
        if len(ids) != len(norms):
            raise ValueError(f"{len(ids)} ids for {len(norms)} rows")
        norms = norms.cpu()
        self._rows.append(
            {
                "split": split,
                "step": int(step),
                "epoch": int(epoch),
                "id": ids,
                "log_likelihood": norms.log_likelihood,
                "layers": norms.values,
                "names": list(norms.names),
            }
        )
        self._buffered += len(ids)
        if self._buffered >= self.flush_rows:
            self.flush()

    def flush(self) -> Path | None:
        """Write the buffered rows as the next part file (nothing to do when the buffer is empty)."""
        if not self._rows:
            return None
        self.directory.mkdir(parents=True, exist_ok=True)
        taken = [int(p.stem.split("-")[1]) for p in self.directory.glob(PART_GLOB)]
        path = self.directory / f"part-{max(taken, default=-1) + 1:06d}.pt"
        torch.save(self._rows, path)
        self._rows, self._buffered = [], 0
        return path


@dataclass(frozen=True)
class History:
    """A run's per-sample rows, one per (split, step, sample id), in the order they were recorded.

    Attributes:
        split: ``[N]`` split name of each row.
        step, epoch, id: ``[N]`` int64 global step, epoch and stable sample id.
        log_likelihood: ``[N]`` log-likelihood (summed over a group when k > 1).
        layers: ``[N, L]`` squared per-layer norms, columns ``names``.
    """

    split: tuple[str, ...]
    step: Tensor
    epoch: Tensor
    id: Tensor
    log_likelihood: Tensor
    layers: Tensor
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.step)

    @property
    def total(self) -> Tensor:
        """``[N]`` total squared FIM-norm (sum over layers)."""
        return self.layers.sum(dim=1)

    @property
    def log_total(self) -> Tensor:
        """``[N]`` float64 log total squared FIM-norm (zero norms floored as in the detectors)."""
        return log_norms(self.total)

    def log_total_quantiles(self, split: str, levels: Sequence[float]) -> tuple[Tensor, Tensor]:
        """``(steps [T], quantiles [len(levels), T])`` of the log total norm over one split's samples at each
        step (non-finite rows left out): rows sorted by step once, no sample × step grid."""
        rows = self.select(split)
        logs = rows.log_total
        finite = torch.isfinite(logs)
        steps, counts = torch.unique(rows.step[finite], return_counts=True)
        by_step = logs[finite][torch.argsort(rows.step[finite], stable=True)].split(counts.tolist())
        q = torch.tensor(list(levels), dtype=torch.float64)
        quantiles = [torch.quantile(values, q) for values in by_step]
        return steps, torch.stack(quantiles, dim=1) if quantiles else torch.empty(
            len(q), 0, dtype=torch.float64
        )

    def lowest_ids(self, max_ids: int) -> History:
        """The rows of the ``max_ids`` lowest sample ids (their whole trajectories), for a look at a few
        samples of a split that holds many (training batches)."""
        return self._rows(torch.isin(self.id, torch.unique(self.id)[:max_ids]))

    def select(self, split: str) -> History:
        """The rows of one split."""
        keep = torch.tensor([s == split for s in self.split], dtype=torch.bool)
        return self._rows(keep)

    def _rows(self, index: Tensor) -> History:
        positions = torch.arange(len(self))[index].tolist()
        return replace(
            self,
            split=tuple(self.split[i] for i in positions),
            step=self.step[index],
            epoch=self.epoch[index],
            id=self.id[index],
            log_likelihood=self.log_likelihood[index],
            layers=self.layers[index],
        )

    def trajectories(self, split: str, max_ids: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(ids [S], steps [T], log total norm [S, T])`` of one split, for its ``max_ids`` lowest sample
        ids if given (a split of training batches holds most of a dataset); NaN where a sample was not
        scored."""
        rows = self.select(split)
        if max_ids is not None:
            rows = rows.lowest_ids(max_ids)
        ids, id_index = torch.unique(rows.id, return_inverse=True)
        steps, step_index = torch.unique(rows.step, return_inverse=True)
        grid = torch.full((len(ids), len(steps)), float("nan"), dtype=torch.float64)
        grid[id_index, step_index] = rows.log_total
        return ids, steps, grid

    def to_dataframe(self) -> Any:
        """A pandas DataFrame: one row per sample and event, a column per layer (``layer/<name>``)."""
        try:
            import pandas as pd
        except ImportError as err:  # an optional dependency: the tensors above need none
            raise ImportError("History.to_dataframe needs pandas: pip install pandas") from err
        frame = pd.DataFrame(
            {
                "split": list(self.split),
                "step": self.step.numpy(),
                "epoch": self.epoch.numpy(),
                "id": self.id.numpy(),
                "log_likelihood": self.log_likelihood.double().numpy(),
                "total": self.total.double().numpy(),
            }
        )
        layers = pd.DataFrame(self.layers.double().numpy(), columns=[f"layer/{n}" for n in self.names])
        return pd.concat([frame, layers], axis=1)


def load_history(directory: str | Path) -> History:
    """Every row written to ``directory`` by :class:`HistoryWriter`, the last recording of each
    (split, step, sample id) only, in recording order."""
    parts = sorted(Path(directory).glob(PART_GLOB))
    if not parts:
        raise FileNotFoundError(f"no history parts ({PART_GLOB}) in {directory}")
    events = [event for part in parts for event in torch.load(part, weights_only=True)]
    names = tuple(events[0]["names"])
    if any(tuple(e["names"]) != names for e in events):
        raise ValueError(f"history parts in {directory} record different layers: not one run")
    split = tuple(e["split"] for e in events for _ in range(len(e["id"])))
    step = torch.cat([torch.full((len(e["id"]),), e["step"], dtype=torch.int64) for e in events])
    history = History(
        split=split,
        step=step,
        epoch=torch.cat([torch.full((len(e["id"]),), e["epoch"], dtype=torch.int64) for e in events]),
        id=torch.cat([e["id"] for e in events]),
        log_likelihood=torch.cat([e["log_likelihood"] for e in events]),
        layers=torch.cat([e["layers"] for e in events]),
        names=names,
    )
    last: dict[tuple[str, int, int], int] = {}
    for row, key in enumerate(zip(history.split, history.step.tolist(), history.id.tolist(), strict=True)):
        last[key] = row  # a later recording of the same event replaces the earlier one
    keep = torch.zeros(len(history), dtype=torch.bool)
    keep[list(last.values())] = True
    return history._rows(keep)


TRAJECTORY_COLUMNS: tuple[str, ...] = ("split", "id", "step", "epoch", "log_norm", "log_likelihood")
WANDB_TABLE_ROWS = 10_000  # wandb.Table.MAX_ROWS: longer tables are cut when logged


def trajectory_rows(
    history: History, max_rows: int = WANDB_TABLE_ROWS
) -> tuple[tuple[str, ...], list[list[Any]]]:
    """``history`` as a long table (``TRAJECTORY_COLUMNS``) for dashboards: a row per sample and event
    with its log total norm, at most ``max_rows`` rows (a W&B table keeps 10 000). Each split gets an
    equal share, filled with the whole trajectories of its lowest sample ids."""
    splits = list(dict.fromkeys(history.split))
    table: list[list[Any]] = []
    for split in splits:
        rows = history.select(split)
        n_ids = max(1, max_rows // (len(splits) * len(torch.unique(rows.step))))
        rows = rows.lowest_ids(n_ids)
        columns = (rows.id, rows.step, rows.epoch, rows.log_total, rows.log_likelihood.double())
        table += [[split, *values] for values in zip(*(c.tolist() for c in columns), strict=True)]
    return TRAJECTORY_COLUMNS, table
