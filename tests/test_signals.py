"""TrainingSignals: the baselines of a training-dynamics study, checked against norms computed by hand."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fimcb import TrainingSignals
from fimcb.lightning.signals import last_layer


class Regression(L.LightningModule):
    """Two linear layers; records, after the callbacks' hook, the norms TrainingSignals should log."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.frozen = nn.Linear(4, 4).requires_grad_(False)
        self.out = nn.Linear(4, 1)
        self.expected: list[tuple[int, float, float, float]] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return ((self.out(self.frozen(self.body(x))).squeeze(1) - y) ** 2).mean()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        trainable = [p for p in self.parameters() if p.requires_grad]
        flat = torch.cat([p.detach().flatten() for p in trainable])
        grads = torch.cat([p.grad.flatten() for p in trainable])
        head = torch.cat([self.out.weight.detach().flatten(), self.out.bias.detach().flatten()])
        self.expected.append((self.global_step, flat.norm().item(), head.norm().item(), grads.norm().item()))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, weight_decay=0.1)


def test_logged_norms_match_norms_computed_by_hand(tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 3), torch.randn(64))
    model = Regression()
    trainer = L.Trainer(
        max_steps=6,
        log_every_n_steps=1,
        logger=CSVLogger(tmp_path, name="run"),
        callbacks=[TrainingSignals()],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(data, batch_size=16))
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("signals/grad_norm")]
    assert len(rows) == 6 == len(model.expected)
    for row, (step, weights, head, grads) in zip(rows, model.expected, strict=True):
        assert int(row["step"]) == step
        assert float(row["signals/weight_norm"]) == pytest.approx(weights, rel=1e-6)
        assert float(row["signals/weight_norm/out"]) == pytest.approx(head, rel=1e-6)
        assert float(row["signals/grad_norm"]) == pytest.approx(grads, rel=1e-6)
    assert len({row["signals/weight_norm"] for row in rows}) == 6  # the weights move: not a constant


def test_the_output_layer_is_found_or_named() -> None:
    model = Regression()
    assert last_layer(model) == "out"
    assert last_layer(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))) == "2"
    with pytest.raises(ValueError, match="no trainable parameters"):
        last_layer(nn.ReLU())
    signals = TrainingSignals(layer="missing")
    with pytest.raises(ValueError, match="no such module"):
        signals.setup(L.Trainer(logger=False), model, "fit")
