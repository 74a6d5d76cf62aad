"""A run folder: every file fimcb writes for one run, read and written in one place.

The callback writes into it, the figures and ``fimcb report`` read it back. It holds

- ``fimcb_run.json``: which run owns the folder (a run id), so that no other run appends to it;
- ``history/part-*.pt``: every tracking event's per-sample rows (:mod:`fimcb.run.history`);
- after an OOD evaluation: ``ood_metrics.json`` (the table), ``ood_scores.pt`` (per-sample scores),
  ``ood_features.pt`` (per-sample layer norms), ``fim_detectors.pt`` (fitted detectors) and, for a fitted
  Fisher approximation, ``fim_metric.pt``;
- after the pictures: ``novel_samples.pt`` and ``figures/*.png``;
- beside them, a CSV logger's ``metrics.csv`` (in the folder, or in the logger folders that
  ``fimcb_run.json`` lists: a named callback's parent folder, a resumed run's new version folder),
  which the training-curve figures read.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fimcb.detectors import Detector, build_detector
from fimcb.evaluation.ood import OODResult, OODTable, load_scores, torch_save
from fimcb.run.history import PART_GLOB, History, HistoryWriter, load_history

RUN_FILE = "fimcb_run.json"
HISTORY, OOD_METRICS, OOD_SCORES, NOVEL_SAMPLES, METRICS_CSV = (
    "history",
    "ood_metrics.json",
    "ood_scores.pt",
    "novel_samples.pt",
    "metrics.csv",
)
OOD_FEATURES, DETECTORS, FISHER_METRIC = "ood_features.pt", "fim_detectors.pt", "fim_metric.pt"
FIGURES = "figures"
#: Artifact names of a run directory, as :attr:`RunArtifacts.missing` lists them.
ARTIFACTS: tuple[str, ...] = (HISTORY, OOD_METRICS, OOD_SCORES, NOVEL_SAMPLES, METRICS_CSV)
MetricsFrame = Any  # a metrics.csv path, a mapping of columns or a pandas DataFrame


class RunDirectoryError(ValueError):
    """A run directory that does not exist or holds none of the artifacts a report is made from."""


class RunFolder:
    """The folder of one run (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def _record(self) -> dict[str, Any]:
        try:
            return dict(json.loads((self.path / RUN_FILE).read_text()))
        except (FileNotFoundError, ValueError):
            return {}

    def owner(self) -> str | None:
        """The id of the run that owns the folder, ``None`` when no run has claimed it."""
        run_id = self._record().get("run_id")
        return None if run_id is None else str(run_id)

    def add_logger_folder(self, folder: str | Path) -> None:
        """Remember where the run's logger writes (a resumed run's CSV logger opens a new version folder),
        so that the training curves join every part of the run."""
        record = self._record()
        folders = record.setdefault("logger_folders", [])
        if str(folder) not in folders:
            folders.append(str(folder))
            (self.path / RUN_FILE).write_text(json.dumps(record, indent=2))

    def logger_folders(self) -> list[Path]:
        """The run's logger folders in order (the folder itself where none is recorded)."""
        listed = [Path(p) for p in self._record().get("logger_folders", [])]
        return listed or [self.path]

    def claim(self, run_id: str, **details: Any) -> bool:
        """Make the folder the run ``run_id``'s (created atomically, so that two runs started at once cannot
        both get it); ``False`` when another run owns it already."""
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path / RUN_FILE, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return self.owner() == run_id
        with os.fdopen(fd, "w") as file:
            json.dump({"run_id": run_id, **details}, file, indent=2)
        return True

    def history_writer(self, flush_rows: int) -> HistoryWriter:
        return HistoryWriter(self.path / HISTORY, flush_rows)

    def write_evaluation(self, result: OODResult, metric_state: Mapping[str, Any] | None = None) -> Path:
        """The OOD evaluation's table, per-sample scores and features, fitted detectors and fitted metric;
        the table's path."""
        path = result.save(self.path / OOD_METRICS)
        torch_save({n: d.state_dict() for n, d in result.detectors.items()}, self.path / DETECTORS)
        result.save_features(self.path / OOD_FEATURES)
        result.save_scores(self.path / OOD_SCORES)
        if metric_state:
            torch_save(dict(metric_state), self.path / FISHER_METRIC)
        return path

    def read_detectors(self) -> dict[str, Detector]:
        """The fitted detectors of the last evaluation (empty when there was none)."""
        path = self.path / DETECTORS
        if not path.is_file():
            return {}
        detectors = {}
        for name, state in torch.load(path, weights_only=False).items():
            detectors[name] = build_detector(name)
            detectors[name].load_state_dict(state)
        return detectors

    def read_metric_state(self) -> dict[str, Any]:
        """The fitted Fisher approximation's state of the last evaluation (empty when there was none)."""
        path = self.path / FISHER_METRIC
        return dict(torch.load(path, weights_only=False)) if path.is_file() else {}

    def write_novel_samples(self, samples: Mapping[str, Any]) -> Path:
        """The most and least novel samples (``fimcb.viz.novel_samples``), loadable with ``weights_only``."""
        return torch_save(dict(samples), self.path / NOVEL_SAMPLES)

    @property
    def figures(self) -> Path:
        return self.path / FIGURES

    def read(self) -> RunArtifacts:
        return load_run(self.path)


@dataclass(frozen=True)
class RunArtifacts:
    """What a run directory holds; ``None`` for each artifact that is missing (named in ``missing``)."""

    directory: Path
    history: History | None
    ood_table: OODTable | None
    ood_scores: dict[str, dict[str, Tensor]] | None
    novel_samples: dict[str, Any] | None
    metrics: dict[str, np.ndarray] | None
    missing: tuple[str, ...]


def load_run(run_dir: str | Path) -> RunArtifacts:
    """Read every artifact ``run_dir`` holds (see :data:`ARTIFACTS`); a clear error when it holds none.
    ``metrics.csv`` is read from the folder and the logger folders its run file lists, joined."""
    directory = Path(run_dir)
    if not directory.is_dir():
        raise RunDirectoryError(f"run directory not found: {directory}")
    history_dir = directory / HISTORY
    csv_paths = [
        p / METRICS_CSV for p in RunFolder(directory).logger_folders() if (p / METRICS_CSV).is_file()
    ]
    if not any(p.parent == directory for p in csv_paths) and (directory / METRICS_CSV).is_file():
        csv_paths.insert(0, directory / METRICS_CSV)
    found: dict[str, Any] = {
        HISTORY: _read(history_dir, load_history) if any(history_dir.glob(PART_GLOB)) else None,
        OOD_METRICS: _read_if(directory / OOD_METRICS, lambda p: json.loads(p.read_text())),
        OOD_SCORES: _read_if(directory / OOD_SCORES, load_scores),
        NOVEL_SAMPLES: _read_if(directory / NOVEL_SAMPLES, lambda p: torch.load(p, weights_only=True)),
        METRICS_CSV: _read(csv_paths[0], lambda _: load_metrics_csvs(csv_paths)) if csv_paths else None,
    }
    missing = tuple(name for name, value in found.items() if value is None)
    if len(missing) == len(ARTIFACTS):
        raise RunDirectoryError(
            f"{directory} holds none of the run artifacts ({', '.join(ARTIFACTS)}): pass the Lightning log "
            "directory of a run trained with FIMNormCallback (e.g. runs/<name>/version_0)"
        )
    return RunArtifacts(
        directory,
        history=found[HISTORY],
        ood_table=found[OOD_METRICS],
        ood_scores=found[OOD_SCORES],
        novel_samples=found[NOVEL_SAMPLES],
        metrics=found[METRICS_CSV],
        missing=missing,
    )


def _read(path: Path, reader: Callable[[Path], Any]) -> Any:
    try:
        return reader(path)
    except Exception as err:  # a corrupt or foreign file: say which one
        raise ValueError(f"cannot read {path}: {err}") from err


def _read_if(path: Path, reader: Callable[[Path], Any]) -> Any:
    return _read(path, reader) if path.is_file() else None


def load_metrics_csvs(paths: list[Path]) -> dict[str, np.ndarray]:
    """Several ``metrics.csv`` of one run (its parts before and after a resume), rows concatenated, every
    column NaN where a part did not log it."""
    parts = [load_metrics_csv(p) for p in paths]
    if len(parts) == 1:
        return parts[0]
    names = list(dict.fromkeys(name for part in parts for name in part))
    lengths = [len(next(iter(part.values()), [])) for part in parts]
    return {
        name: np.concatenate(
            [part.get(name, np.full(n, math.nan)) for part, n in zip(parts, lengths, strict=True)]
        )
        for name in names
    }


def load_metrics_csv(path: str | Path) -> dict[str, np.ndarray]:
    """A Lightning ``metrics.csv`` as float64 columns, NaN where a column was not logged at a row."""
    with open(path, newline="") as file:
        rows = list(csv.reader(file))
    if not rows:
        raise ValueError(f"{path} is empty: expected a header row of metric names")
    header, body = rows[0], rows[1:]
    return {
        name: np.array([float(row[j]) if j < len(row) and row[j] != "" else math.nan for row in body])
        for j, name in enumerate(header)
    }
