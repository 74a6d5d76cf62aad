"""Split scoring work across the processes of a ``torch.distributed`` group and gather it back in order.

Scoring works on *units* (single samples, or groups of ``k`` consecutive samples): unit ``u`` goes
to rank ``u % world_size``, and ranks with one unit fewer repeat their first unit, so every rank
scores the same number of rows and makes the same collective calls (no rank waits on another
that has run out of work). :func:`gather_rows` all-gathers the rows with their unit numbers and
puts them back in unit order, dropping the padding repeats: the result is the single-process
result, on every rank. Without an initialised process group everything runs locally.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from fimcb.core.norms import LayerNorms

T = TypeVar("T")


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(x: Tensor) -> Tensor:
    """``x`` summed over all ranks (a new tensor; ``x`` itself when there is no process group)."""
    if rank_and_world()[1] == 1:
        return x
    total = x.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def broadcast_from_zero(obj: Any) -> Any | None:
    """Rank zero's ``obj`` on every rank (pickled; for small states), ``None`` without a process group."""
    if rank_and_world()[1] == 1:
        return None
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def shard_units(n_units: int, rank: int, world_size: int) -> list[int]:
    """The units of ``range(n_units)`` that ``rank`` scores: every ``world_size``-th one from ``rank``,
    padded by wrapping around so that all ranks get ``ceil(n_units / world_size)`` units."""
    if n_units < 1:
        raise ValueError(f"nothing to shard: {n_units} units")
    per_rank = -(-n_units // world_size)
    return [(rank + i * world_size) % n_units for i in range(per_rank)]


def _collective_device() -> torch.device:
    """Where tensors must live for the default group's backend (CUDA for NCCL, else CPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather(x: Tensor) -> Tensor:
    """Concatenate ``x`` (same shape on every rank) from all ranks, in rank order, on the CPU."""
    device = _collective_device()
    local = x.to(device).contiguous()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return torch.cat([p.cpu() for p in parts])


def gather_rows(local: LayerNorms, units: list[int], n_units: int) -> LayerNorms:
    """All ranks' rows in unit order, identical on every rank; ``local`` holds this rank's rows for
    :func:`shard_units` (row ``i`` is unit ``units[i]``), and the wrap-around padding rows are dropped."""
    rank, world_size = rank_and_world()
    if units != shard_units(n_units, rank, world_size):
        raise ValueError("gather_rows expects the rows of shard_units(n_units, rank, world_size)")
    if len(local) != len(units):
        raise ValueError(f"{len(local)} rows for {len(units)} units")
    values = _all_gather(local.values)
    log_likelihood = _all_gather(local.log_likelihood)
    ids = _all_gather(local.ids) if local.ids is not None else None
    # Gathered row j is slot j % per_rank of rank j // per_rank, i.e. unit rank + slot * world_size
    # where that is < n_units (its owner), else a padding repeat. Reorder the owners by unit.
    per_rank = len(units)
    j = torch.arange(per_rank * world_size)
    unit = (j // per_rank) + (j % per_rank) * world_size
    order = j[unit < n_units][torch.argsort(unit[unit < n_units])]
    return LayerNorms(
        values=values[order],
        names=local.names,
        log_likelihood=log_likelihood[order],
        ids=None if ids is None else ids[order],
    )


class FailedOnAnotherRank(RuntimeError):
    """Work that all ranks do together failed on another rank, so this one stops too (no rank is left
    waiting in a collective call)."""


def agreed(work: Callable[[], T]) -> T:
    """``work()``, with every rank learning whether it failed anywhere: a failure on any rank raises on all
    of them (the local error where it happened, :class:`FailedOnAnotherRank` elsewhere), so that ranks
    never part ways before a collective call. Without a process group it is ``work()``."""
    if rank_and_world()[1] == 1:
        return work()
    error: BaseException | None = None
    try:
        result = work()
    except Exception as err:
        error = err
    failures = torch.tensor([0.0 if error is None else 1.0], device=_collective_device())
    dist.all_reduce(failures, op=dist.ReduceOp.SUM)
    if error is not None:
        raise error
    if failures.item() > 0:
        raise FailedOnAnotherRank(f"{int(failures.item())} other rank(s) failed in the same step")
    return result


def score_sharded(n_units: int, score: Callable[[list[int]], LayerNorms]) -> LayerNorms:
    """``score(units)`` for all of ``range(n_units)``, split across ranks and gathered in unit order.

    ``score`` must return one row per unit it is given, in the given order. Every rank must call
    this with the same ``n_units``; without a process group it is ``score(list(range(n_units)))``.
    A failure on one rank raises on every rank (:func:`agreed`).
    """
    rank, world_size = rank_and_world()
    if world_size == 1:
        return score(list(range(n_units)))
    units = shard_units(n_units, rank, world_size)
    return gather_rows(agreed(lambda: score(units)), units, n_units)
