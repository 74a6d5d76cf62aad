"""Rebuild a finished ``train.py fit`` run (model with its last weights, datamodule, callback) from its
run directory, so that benchmarks can score the same model again in other ways."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from lightning import LightningDataModule, LightningModule

from fimcb import FIMNormCallback
from fimcb.cli import FIMCLI


@dataclass
class FinishedRun:
    model: LightningModule
    datamodule: LightningDataModule
    callback: FIMNormCallback


def load_run(run_dir: Path, overrides: list[str] = ()) -> FinishedRun:
    """The run's model (weights of its last checkpoint, eval mode), datamodule (set up for fit and test)
    and FIMNormCallback, from ``run_dir/config.yaml`` plus ``overrides`` (train.py options)."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    # Only the sections a bare CLI takes: fit's own arguments (ckpt_path, ...) are not accepted.
    config = {k: v for k, v in config.items() if k in ("seed_everything", "trainer", "model", "data")}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as file:
        yaml.safe_dump(config, file)
        file.flush()
        cli = FIMCLI(run=False, args=["--config", file.name, *overrides])
    checkpoints = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    if not checkpoints:
        raise FileNotFoundError(f"{run_dir} has no checkpoints/*.ckpt to load weights from")
    state = torch.load(checkpoints[-1], map_location="cpu", weights_only=False)["state_dict"]
    cli.model.load_state_dict(state)
    cli.model.eval()
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, FIMNormCallback))
    cli.datamodule.setup("fit")
    cli.datamodule.setup("test")
    return FinishedRun(cli.model, cli.datamodule, callback)
