"""A few Adam steps on an image model, measured by held-out bits/dim: the models' shared training check."""

from __future__ import annotations

import torch
from torch import Tensor

from fimcb.models.base import ImageLikelihoodModel


def held_out_bpd(model: ImageLikelihoodModel, held_out: Tensor) -> Tensor:
    """Mean bits/dim of ``held_out`` in eval mode."""
    with torch.no_grad():
        return model.eval().bits_per_dim(model.log_likelihood(held_out)).mean()


def train_steps(
    model: ImageLikelihoodModel, train: Tensor, steps: int, lr: float, generator: torch.Generator
) -> None:
    """``steps`` Adam steps on the NLL of batches of 64 drawn from ``train`` with ``generator``."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        batch = train[torch.randint(0, len(train), (64,), generator=generator)]
        loss = -model.log_likelihood(batch).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
