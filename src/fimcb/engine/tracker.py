"""Batch tracking: which tensors of a forward pass belong to samples, and which to the parameters alone.

Forward hooks see module calls, and three patterns escape them: a parameter used outside its
module's ``forward`` (a learned scale in the likelihood, an output bias, ``h @ emb.weight.T``, a raw
position-embedding parameter), a module called once for the whole batch (a position embedding on
``[1, T]``, a conditioning network on a fixed code), and a module output without the batch
dimension (a log-determinant that does not depend on the sample). For models that have them, the
forward runs under :class:`BatchTracker`, a ``TorchFunctionMode`` that labels every tensor it sees:

- *batched*: its first dimension indexes samples, ``m`` rows each (derived from the input, or a
  module output of batch shape);
- *weight-like*: computed from parameters alone (a free parameter use, or a module call's output
  without the batch), remembering its *sources* (those parameters and module outputs);
- constant: anything else (buffers, position ids, masks).

A torch function that combines batched and weight-like operands is a *boundary*: an op rule
(:mod:`fimcb.engine.rules.ops`) records it so that the batched backward delivers the operand's
per-sample gradient, which the capture then pulls back to the sources.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from fimcb.engine.rules.ops import OpCall, OpRule, ToBatchRule, op_rule_for

MARK = "_fimcb_mark"
_TRANSPOSES = {torch.Tensor.t, torch.t, torch.Tensor.T.__get__, torch.Tensor.mT.__get__}
_TO_BATCH = {torch.Tensor.expand, torch.Tensor.expand_as, torch.broadcast_to, torch.Tensor.broadcast_to}


class Kind(enum.Enum):
    CONSTANT = 0
    BATCHED = 1
    WEIGHT = 2


@dataclass(frozen=True)
class Mark:
    """What the tracker knows of a tensor during one forward pass (``epoch``)."""

    epoch: object
    kind: Kind
    sources: frozenset[int] = frozenset()
    transpose_of: str | None = None  # the tensor is this 2-d parameter transposed


class TrackerState:
    """What one tracked forward pass knows: the batch size, the trainable parameters and which of them are
    being used inside their own module's call right now (``covered``), the sources of weight-like
    tensors, and the boundaries met."""

    def __init__(self, batch: int, params: dict[int, str], copy_outputs: bool) -> None:
        self.batch = batch
        self.params = params  # id(parameter) -> global name
        self.copy_outputs = copy_outputs
        self.epoch = object()
        self.covered: dict[int, int] = {}
        self.sources: list[Tensor] = []
        self.source_keys: list[
            tuple[str, Any]
        ] = []  # ("param", name) | ("output", (call index, output index))
        self._param_source: dict[str, int] = {}
        self.ops: list[tuple[OpCall, OpRule]] = []
        self.versions: list[tuple[Tensor, int]] = []  # captured tensors and their versions when captured

    # ---- labels -----------------------------------------------------------------------------

    def mark(self, t: Tensor) -> Mark | None:
        mark = getattr(t, MARK, None)
        return mark if mark is not None and mark.epoch is self.epoch else None

    def kind(self, t: Tensor) -> Kind:
        mark = self.mark(t)
        if mark is not None:
            return mark.kind
        name = self.params.get(id(t))
        if name is not None and not self.covered.get(id(t)) and t.requires_grad:
            return Kind.WEIGHT
        return Kind.CONSTANT

    def sources_of(self, t: Tensor) -> frozenset[int]:
        mark = self.mark(t)
        if mark is not None:
            return mark.sources
        return frozenset({self.param_source(self.params[id(t)], t)})

    def param_source(self, name: str, param: Tensor) -> int:
        if name not in self._param_source:
            self._param_source[name] = self.new_source(param, ("param", name))
        return self._param_source[name]

    def new_source(self, tensor: Tensor, key: tuple[str, Any]) -> int:
        self.sources.append(tensor)
        self.source_keys.append(key)
        return len(self.sources) - 1

    def label(
        self, out: Any, kind: Kind, sources: frozenset[int] = frozenset(), transpose_of: str | None = None
    ) -> None:
        mark = Mark(self.epoch, kind, sources, transpose_of)
        for t in tensors_in(out):
            if kind is not Kind.WEIGHT or t.requires_grad:
                setattr(t, MARK, mark)

    def rows(self, t: Tensor) -> int | None:
        """Rows per sample of a tensor taken as batched: marked so (``B·m`` rows), or a constant or batched
        tensor of exactly ``B`` rows (the shape convention of module calls); ``None`` otherwise."""
        kind = self.kind(t)
        if kind is Kind.BATCHED and t.ndim >= 1 and t.shape[0] > 0 and t.shape[0] % self.batch == 0:
            return t.shape[0] // self.batch
        if kind is not Kind.WEIGHT and t.ndim >= 1 and t.shape[0] == self.batch:
            return 1
        return None


def tensors_in(obj: Any) -> list[Tensor]:
    """The tensors in a function's output or arguments (fast for a tensor and flat sequences)."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, list | tuple) and all(not isinstance(o, list | tuple | dict) for o in obj):
        return [o for o in obj if isinstance(o, Tensor)]
    return [t for t in tree_flatten(obj)[0] if isinstance(t, Tensor)]


class BatchTracker(TorchFunctionMode):
    """Labels tensors and records boundaries while the model runs (see the module docstring)."""

    def __init__(self, state: TrackerState) -> None:
        super().__init__()
        self.state = state

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        state = self.state
        weights = batched = False
        for arg in (*args, *kwargs.values()):
            for t in arg if isinstance(arg, list | tuple) else (arg,):
                if isinstance(t, Tensor):
                    kind = state.kind(t)
                    weights |= kind is Kind.WEIGHT
                    batched |= kind is Kind.BATCHED
        if not weights:
            out = func(*args, **kwargs)
            if batched:
                state.label(out, Kind.BATCHED)
            return out
        leaves, spec = tree_flatten((args, kwargs))
        if not batched and func in _TO_BATCH:
            out = func(*args, **kwargs)
            source = leaves[0]
            if (
                isinstance(out, Tensor)
                and out.ndim >= 1
                and out.shape[0] == state.batch
                and (source.ndim < out.ndim or source.shape[0] == 1)
            ):  # a weight-like tensor expanded to the batch: its rows become the samples' own
                op = OpCall(func, leaves, spec, {0: source}, {}, state.batch, targets=[out])
                state.ops.append((op, ToBatchRule()))
                state.label(out, Kind.BATCHED)
            else:
                self._weight_like(func, leaves, out)
            return out
        per_sample = {
            i: 1 for i, t in enumerate(leaves) if isinstance(t, Tensor) and state.rows(t) is not None
        }
        if batched:
            per_sample = {
                i: r for i, t in enumerate(leaves) if isinstance(t, Tensor) and (r := _batched_rows(state, t))
            }
        if not per_sample:
            out = func(*args, **kwargs)
            self._weight_like(func, leaves, out)
            return out
        op = OpCall(
            func,
            leaves,
            spec,
            {i: t for i, t in enumerate(leaves) if isinstance(t, Tensor) and state.kind(t) is Kind.WEIGHT},
            per_sample,
            state.batch,
        )
        rule = op_rule_for(op)
        out = rule.run(op)
        if state.copy_outputs and op.targets and any(t is out for t in op.targets):
            out = out.clone()  # later in-place changes go to the copy, not to the captured output
        state.ops.append((op, rule))
        state.versions.extend((t, t._version) for t in op.targets)
        state.label(out, Kind.BATCHED)
        return out

    def _weight_like(self, func: Callable[..., Any], leaves: list[Any], out: Any) -> None:
        """Label the output of a function of weight-like operands (and constants) with their sources."""
        state = self.state
        weight_leaves = [t for t in leaves if isinstance(t, Tensor) and state.kind(t) is Kind.WEIGHT]
        sources = frozenset().union(*(state.sources_of(t) for t in weight_leaves))
        transpose_of = None
        if func in _TRANSPOSES and len(weight_leaves) == 1 and weight_leaves[0].ndim == 2:
            transpose_of = state.params.get(id(weight_leaves[0]))
        state.label(out, Kind.WEIGHT, sources, transpose_of)


def _batched_rows(state: TrackerState, t: Tensor) -> int | None:
    return state.rows(t) if state.kind(t) is Kind.BATCHED else None
