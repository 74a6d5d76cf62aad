"""Context managers for running a model the way scoring needs, whatever mode the caller left it in."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module, modules: Iterable[nn.Module] | None = None) -> Iterator[None]:
    """Put every submodule in eval mode and restore each one's own flag afterwards (``modules``: the
    model's, where the caller has them at hand)."""
    training = [m for m in (model.modules() if modules is None else modules) if m.training]
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
