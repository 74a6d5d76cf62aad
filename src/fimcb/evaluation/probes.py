"""Fixed probes: the same samples of a dataset at every tracking event, and again after a resume.

A probe is ``n`` dataset positions drawn once from a private generator (training's random streams are
untouched), collated once with the loader's own ``collate_fn``; its indices are all the state a
checkpoint needs to rebuild it. :func:`score_groups` scores a probe by groups of ``k`` samples, split
across ``torch.distributed`` ranks and gathered back when asked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torch.utils.data.dataloader import default_collate

from fimcb.core.distributed import score_sharded
from fimcb.core.norms import LayerNorms
from fimcb.core.protocol import unpack_batch
from fimcb.engine import Engine, per_sample_layer_norms


class Probes:
    """Fixed probes by split name; ``indices`` is the state to keep in a checkpoint."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.indices: dict[str, list[int]] = {}
        self._inputs: dict[tuple[str, int], tuple[Tensor, Tensor]] = {}

    def state_dict(self) -> dict[str, list[int]]:
        return {split: list(indices) for split, indices in self.indices.items()}

    def load_state_dict(self, state: dict[str, list[int]]) -> None:
        """Another run's probes: collated anew on their next use."""
        self.indices = {split: list(indices) for split, indices in state.items()}
        self._inputs.clear()

    def inputs(self, split: str, loaders: Any, n: int) -> tuple[Tensor, Tensor]:
        """The probe of ``split``: up to ``n`` inputs of the loader's dataset (the first loader of a list)
        and their sample ids (the batch's, else dataset positions)."""
        loader = loaders[0] if isinstance(loaders, Sequence) else loaders
        if not isinstance(loader, DataLoader):
            raise TypeError(f"the {split} probe needs a DataLoader, got {type(loader).__name__}")
        dataset: Any = loader.dataset
        key = (split, id(dataset))
        if key in self._inputs:
            return self._inputs[key]
        size = len(dataset)
        if split not in self.indices:
            generator = torch.Generator().manual_seed(self.seed)
            self.indices[split] = torch.randperm(size, generator=generator)[:n].tolist()
        indices = [i for i in self.indices[split] if i < size]
        if not indices:
            raise ValueError(f"the {split} dataset is empty: nothing to probe")
        collate = loader.collate_fn or default_collate
        x, ids = unpack_batch(collate([dataset[i] for i in indices]))
        self._inputs[key] = (x, torch.as_tensor(indices) if ids is None else ids.cpu())
        return self._inputs[key]


def score_groups(
    model: nn.Module,
    x: Tensor,
    ids: Tensor,
    group_size: int = 1,
    engine: Engine = "auto",
    chunk_size: int | None = None,
    sharded: bool = True,
) -> tuple[LayerNorms, Tensor]:
    """Layer norms of ``x`` by groups of ``group_size`` (a remainder dropped) and each group's id, its
    first sample's. ``sharded``: inside a process group every rank scores a share and all get every row;
    otherwise this rank scores all of ``x`` with no collective call."""
    k = group_size

    def score(units: list[int]) -> LayerNorms:
        positions = torch.as_tensor([u * k + i for u in units for i in range(k)], device=x.device)
        return per_sample_layer_norms(
            model, x[positions], group_size=k, engine=engine, chunk_size=chunk_size
        ).cpu()

    units = len(x) // k
    norms = score_sharded(units, score) if sharded else score(list(range(units)))
    return norms, ids[: len(norms) * k : k]
