"""Context managers for running a model the way scoring needs, whatever mode the caller left it in."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode and restore each one's own flag afterwards."""
    training = [m for m in model.modules() if m.training]  # only these need switching back
    if training:
        model.eval()  # through train(False), so that modules overriding train() see it
    try:
        yield
    finally:
        for module in training:
            module.training = True


@contextlib.contextmanager
def grad_enabled() -> Iterator[None]:
    """Enable autograd even inside ``torch.no_grad``/``inference_mode`` (validation and test loops)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield
