"""Shared fixtures: where the real datasets live, and a quiet, deterministic torch."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _data_root() -> Path:
    return Path(os.environ.get("FIMCB_DATA_ROOT", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_root() -> Path:
    """Folder with MNIST/FashionMNIST (torchvision layout) and cifar10.npz.

    Tests that need it skip without it, unless ``FIMCB_REQUIRE_DATA=1`` (set by CI) makes that a failure.
    """
    root = _data_root()
    if not (root / "FashionMNIST" / "raw").is_dir():
        message = f"real datasets not found under {root}; set FIMCB_DATA_ROOT"
        if os.environ.get("FIMCB_REQUIRE_DATA") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return root


@pytest.fixture(autouse=True)
def _seed_and_threads() -> Iterator[None]:
    torch.manual_seed(0)
    torch.set_num_threads(1)  # small models: one thread is fastest and immune to core contention
    yield
    torch.set_flush_denormal(False)  # the CLI's main turns it on for the process; hypothesis needs subnormals
