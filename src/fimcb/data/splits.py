"""Deterministic index splits: train/val carved from a training split, capped subsets of a test split.

Every function draws from its own seeded ``torch.Generator`` (never the global RNG), so the same
arguments always give the same indices, whatever else seeded or consumed random numbers.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _permutation(n: int, seed: int) -> Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def num_val(n: int, val_size: int | float) -> int:
    """Number of validation samples out of ``n``: ``val_size`` itself if an int, else a rounded fraction."""
    if isinstance(val_size, bool) or not isinstance(val_size, int | float):
        raise TypeError(f"val_size must be an int (count) or a float (fraction), got {val_size!r}")
    if isinstance(val_size, float):
        if not 0.0 <= val_size < 1.0:
            raise ValueError(f"val_size as a fraction must be in [0, 1), got {val_size}")
        return round(val_size * n)
    if not 0 <= val_size < n:
        raise ValueError(
            f"val_size as a count must be in [0, {n}) for a training split of {n}, got {val_size}"
        )
    return val_size


def train_val_indices(
    n: int, val_size: int | float, train_size: int | None = None, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Disjoint train and val indices into a training split of ``n`` samples.

    One seeded permutation: its first ``num_val(n, val_size)`` entries are the validation set and
    the rest, capped to ``train_size``, the training set. Each set is returned in ascending order.
    """
    if train_size is not None and train_size < 1:
        raise ValueError(f"train_size must be a positive int or None, got {train_size}")
    n_val = num_val(n, val_size)
    perm = _permutation(n, seed)
    train = perm[n_val:] if train_size is None else perm[n_val : n_val + train_size]
    return train.sort().values, perm[:n_val].sort().values


def subset_indices(n: int, size: int | None, seed: int = 0) -> Tensor:
    """Ascending indices of a deterministic subset of ``size`` out of ``n`` samples (all if ``size`` is None).

    Subsets with the same seed are nested: a smaller one is contained in a larger one.
    """
    if size is not None and size < 1:
        raise ValueError(f"subset size must be a positive int or None, got {size}")
    if size is None or size >= n:
        return torch.arange(n)
    return _permutation(n, seed)[:size].sort().values
