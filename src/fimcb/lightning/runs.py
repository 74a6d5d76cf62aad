"""Where a training run's folder is, whatever its logger, and the same on every rank.

- A logger with version folders (``CSVLogger``, ``TensorBoardLogger``, or any with a ``log_dir``): its
  version folder, as Lightning uses it.
- ``WandbLogger`` (and any logger without a ``log_dir``): ``<save_dir>/<project or name>/<run id>``.
- No logger: the next free ``version_N`` under ``<default_root_dir>/fimcb``, taken atomically.

A fresh run claims its folder (:meth:`fimcb.run.folder.RunFolder.claim`); a folder that another run owns
(a logger with a fixed version, reused) is not appended to: this run writes into a subfolder named by
its id, with a warning. A run resumed from a checkpoint finds its folder in the checkpoint.

Also what else the callback reads off the trainer: its datamodule, whether it is a smoke test
(``fast_dev_run``), and the loaders of the end-of-training evaluation.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn

from fimcb.run.folder import RunFolder


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def logger_folder(trainer: L.Trainer, new_version: bool = True) -> Path:
    """The folder of the trainer's first logger's run (see the module docstring); without a logger, a new
    version folder, or with ``new_version=False`` the trainer's ``default_root_dir``. Rank zero only."""
    for logger in trainer.loggers:
        log_dir = getattr(logger, "log_dir", None)
        if log_dir:
            return Path(log_dir)
    for logger in trainer.loggers:
        save_dir = getattr(logger, "save_dir", None) or trainer.default_root_dir
        group = logger.name or "lightning_logs"
        return Path(save_dir) / str(group) / str(logger.version)
    if not new_version:
        return Path(trainer.default_root_dir)
    return _next_version(Path(trainer.default_root_dir) / "fimcb")


def _next_version(root: Path) -> Path:
    """A new ``version_N`` folder under ``root``, created atomically (two runs never get the same one)."""
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name.split("_")[1]) for p in root.glob("version_*") if p.name.split("_")[1].isdigit()]
    version = max(taken, default=-1) + 1
    while True:
        try:
            os.mkdir(root / f"version_{version}")
            return root / f"version_{version}"
        except FileExistsError:
            version += 1


def resolve_run_folder(
    trainer: L.Trainer, run_id: str | None, restored: str | None, subfolder: str | None
) -> tuple[RunFolder, str]:
    """The run's folder and id, decided on rank zero and broadcast: the restored one of a resumed run, else
    a claimed one (see the module docstring)."""
    decided: Any = None
    if trainer.is_global_zero:
        decided = _decide(trainer, run_id or new_run_id(), restored, subfolder)
    path, run_id = trainer.strategy.broadcast(decided, src=0)
    return RunFolder(path), run_id


def _decide(trainer: L.Trainer, run_id: str, restored: str | None, subfolder: str | None) -> tuple[str, str]:
    if restored is not None:
        folder = RunFolder(restored)
        if folder.claim(run_id):
            folder.add_logger_folder(logger_folder(trainer, new_version=False))
            return str(folder.path), run_id
        rank_zero_warn(f"FIMNormCallback: the checkpoint's run folder {restored} belongs to another run now")
    base = logger_folder(trainer)
    folder = RunFolder(base / subfolder if subfolder else base)
    if not folder.claim(run_id):
        other = RunFolder(folder.path / f"fimcb-{run_id}")
        rank_zero_warn(
            f"FIMNormCallback: {folder.path} holds another run's outputs (a logger with a fixed version, "
            f"reused?); this run writes into {other.path} so that neither is mixed into the other"
        )
        other.claim(run_id)
        folder = other
    folder.add_logger_folder(base)
    return str(folder.path), run_id


def is_smoke_test(trainer: L.Trainer) -> bool:
    """Whether this is a ``fast_dev_run`` (an attribute Lightning sets at run time, not in ``Trainer``'s
    annotations): a smoke test that writes no files."""
    return bool(getattr(trainer, "fast_dev_run", False))


def datamodule_of(trainer: L.Trainer) -> Any:
    """The datamodule passed to ``fit`` (``None`` without one; set at run time, like ``fast_dev_run``)."""
    return getattr(trainer, "datamodule", None)


def evaluation_loaders(
    trainer: L.Trainer, fit: Any, test: Any, ood: Mapping[str, Any] | None
) -> tuple[Any, Any, Mapping[str, Any]] | None:
    """Held-out in-distribution (fit), test and OOD loaders: those given, else the trainer's validation
    loader and the datamodule's; ``None`` with a warning when some are missing."""
    datamodule = datamodule_of(trainer)
    if ood is None and hasattr(datamodule, "ood_dataloaders"):
        ood = datamodule.ood_dataloaders()
    if fit is None:
        fit = trainer.val_dataloaders
    if datamodule is not None:
        if test is None and hasattr(datamodule, "test_dataloader"):
            datamodule.setup("test")
            test = datamodule.test_dataloader()
        if fit is None and hasattr(datamodule, "val_dataloader"):
            fit = datamodule.val_dataloader()
    missing = [  # a loader of an IterableDataset has no length: only None and empty lists are missing
        name
        for name, value in (("validation (fit)", fit), ("test", test), ("OOD", ood))
        if value is None or (isinstance(value, Mapping | Sequence) and not value)
    ]
    if missing:
        rank_zero_warn(
            f"FIMNormCallback: skipping the OOD evaluation, no {', '.join(missing)} data. Pass "
            "fit_loader=, test_loader= and ood_loaders= to the callback, or use a datamodule with "
            "val_dataloader, test_dataloader and ood_dataloaders()."
        )
        return None
    fit = fit[0] if isinstance(fit, Sequence) else fit
    return fit, test, ood or {}
