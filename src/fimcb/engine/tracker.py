"""Batch tracking: which tensors of a forward pass belong to samples, and which to the parameters alone.

Forward hooks see module calls, and three patterns escape them: a parameter used outside its
module's ``forward`` (a learned scale in the likelihood, an output bias, ``h @ emb.weight.T``, a raw
position-embedding parameter), a module called once for the whole batch (a position embedding on
``[1, T]``, a conditioning network on a fixed code), and a module output without the batch
dimension (a log-determinant that does not depend on the sample). For models that have them, the
forward runs tracked, every tensor labelled as

- *batched*: its first dimension indexes samples, ``m`` rows each;
- *weight-like*: computed from parameters alone (a free parameter use, or a module call's output
  without the batch), remembering its *sources* (those parameters and module outputs);
- constant: anything else (buffers, position ids, masks).

A torch function that combines batched and weight-like operands is a *boundary*: an op rule
(:mod:`fimcb.engine.rules.ops`) records it so that the batched backward delivers the operand's
per-sample gradient, which the capture then pulls back to the sources.

Two trackers share that logic (:func:`handle`). :class:`BatchTracker`, a ``TorchFunctionMode``, sees
every function and labels batched tensors by data flow: a model's first batch runs under it, which
finds what the model needs. After it, the parameters found in free use are wrapped as
:class:`WeightLike` tensors, a subclass whose ``__torch_function__`` runs only for functions that
touch them (everything else runs at full speed), batched tensors being known by their shape.
"""

from __future__ import annotations

import contextlib
import enum
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from fimcb.engine.rules.ops import OpCall, OpRule, ToBatchRule, op_rule_for

MARK = "_fimcb_mark"


def _getter(name: str) -> Callable[..., Any]:
    """The function ``__torch_function__`` sees when a tensor property is read."""
    return inspect.getattr_static(Tensor, name).__get__


_TRANSPOSES = {torch.Tensor.t, torch.t, _getter("T"), _getter("mT")}
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
    param: int | None = None  # the tensor stands for this parameter (by id): a wrapped free parameter


class TrackerState:
    """What one tracked forward pass knows: the batch size, the trainable parameters and which of them are
    being used inside their own module's call right now (``covered``), the sources of weight-like
    tensors, and the boundaries met. With ``light``, batched tensors are known by their shape (any
    tensor of ``B·m`` rows that is not weight-like) and only weight-like ones carry labels."""

    def __init__(
        self,
        batch: int,
        params: dict[int, str],
        copy_outputs: bool,
        light: bool = False,
        fixed: frozenset[int] = frozenset(),
    ) -> None:
        self.batch = batch
        self.params = params  # id(parameter) -> global name
        self.fixed = fixed  # ids of the model's parameters and buffers: never batched, whatever their shape
        self.copy_outputs = copy_outputs
        self.light = light
        self.epoch = object()
        self._batched = Mark(self.epoch, Kind.BATCHED)
        self.covered: dict[int, int] = {}
        self.sources: list[Tensor] = []
        self.source_keys: list[tuple[str, Any]] = []  # ("param", name) | ("output", (call, output index))
        self._param_source: dict[str, int] = {}
        self.ops: list[tuple[OpCall, OpRule]] = []
        self.versions: list[tuple[Tensor, int]] = []  # captured tensors and their versions when captured

    # ---- labels -----------------------------------------------------------------------------

    def mark(self, t: Tensor) -> Mark | None:
        mark = getattr(t, MARK, None)
        return mark if mark is not None and mark.epoch is self.epoch else None

    def kind(self, t: Tensor) -> Kind:
        mark = getattr(t, MARK, None)
        if mark is not None and mark.epoch is self.epoch:
            if mark.param is not None and self.covered.get(mark.param):
                return Kind.CONSTANT  # a wrapped parameter inside its own module: its rule's business
            return mark.kind
        if id(t) in self.params and not self.covered.get(id(t)) and t.requires_grad:
            return Kind.WEIGHT
        if self.light and t.ndim and t.shape[0] and t.shape[0] % self.batch == 0 and id(t) not in self.fixed:
            return Kind.BATCHED
        return Kind.CONSTANT

    def is_weight(self, t: Tensor) -> bool:
        """Whether ``t`` is weight-like (the fast test, run on every tensor argument)."""
        mark = getattr(t, MARK, None)
        if mark is not None:
            if mark.epoch is not self.epoch or mark.kind is not Kind.WEIGHT:
                return False
            return mark.param is None or not self.covered.get(mark.param)
        return id(t) in self.params and not self.covered.get(id(t)) and t.requires_grad

    def parameter(self, t: Tensor) -> str | None:
        """The name of the parameter ``t`` is (itself, or its wrapper), else ``None``."""
        mark = self.mark(t)
        if mark is None:
            return self.params.get(id(t))
        return None if mark.param is None else self.params[mark.param]

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
        if kind is Kind.BATCHED and self.light:
            return  # light tracking knows batched tensors by their shape
        mark = self._batched if kind is Kind.BATCHED else Mark(self.epoch, kind, sources, transpose_of)
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


def handle(
    state: TrackerState,
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    wrap: Callable[[Any], Any] | None = None,
) -> Any:
    """Run ``func`` and label (``wrap``: also re-wrap) its outputs; record it where it is a boundary."""
    weights = batched = False
    for arg in (*args, *kwargs.values()) if kwargs else args:
        for t in (arg,) if isinstance(arg, Tensor) else arg if isinstance(arg, list | tuple) else ():
            if isinstance(t, Tensor):
                if state.light:
                    weights = weights or state.is_weight(t)
                else:
                    kind = state.kind(t)
                    weights |= kind is Kind.WEIGHT
                    batched |= kind is Kind.BATCHED
    if not weights:
        out = func(*args, **kwargs)
        if batched:
            state.label(out, Kind.BATCHED)
        return out
    leaves, spec = _flat(args, kwargs)
    batched = batched or any(isinstance(t, Tensor) and state.kind(t) is Kind.BATCHED for t in leaves)
    if not batched and func in _TO_BATCH:
        out = func(*args, **kwargs)
        source = leaves[0]
        if (
            isinstance(out, Tensor)
            and out.ndim >= 1
            and out.shape[0] == state.batch
            and (source.ndim < out.ndim or source.shape[0] == 1)
        ):  # a weight-like tensor expanded to the batch: its rows become the samples' own
            state.ops.append(
                (OpCall(func, leaves, spec, {0: source}, {}, state.batch, targets=[out]), ToBatchRule())
            )
            state.label(out, Kind.BATCHED)
            return out
        return _weight_like(state, func, leaves, out, wrap)
    if batched:
        per_sample = {
            i: r for i, t in enumerate(leaves) if isinstance(t, Tensor) and (r := _batched_rows(state, t))
        }
    else:  # a constant of exactly B rows meeting a weight-like tensor (a zeros(B) accumulator)
        per_sample = {
            i: 1 for i, t in enumerate(leaves) if isinstance(t, Tensor) and state.rows(t) is not None
        }
    if not per_sample:
        return _weight_like(state, func, leaves, func(*args, **kwargs), wrap)
    weight_operands = {i: t for i, t in enumerate(leaves) if isinstance(t, Tensor) and state.is_weight(t)}
    op = OpCall(func, leaves, spec, weight_operands, per_sample, state.batch)
    rule = op_rule_for(op)
    out = rule.run(op)
    if state.copy_outputs and op.targets and any(t is out for t in op.targets):
        out = out.clone()  # later in-place changes go to the copy, not to the captured output
    state.ops.append((op, rule))
    state.versions.extend((t, t._version) for t in op.targets)
    state.label(out, Kind.BATCHED)
    return out


def _weight_like(
    state: TrackerState,
    func: Callable[..., Any],
    leaves: list[Any],
    out: Any,
    wrap: Callable[[Any], Any] | None,
) -> Any:
    """The output of a function of weight-like operands (and constants), labelled with their sources."""
    weight_leaves = [t for t in leaves if isinstance(t, Tensor) and state.is_weight(t)]
    sources = frozenset().union(*(state.sources_of(t) for t in weight_leaves))
    transpose_of = None
    if func in _TRANSPOSES and len(weight_leaves) == 1 and weight_leaves[0].ndim == 2:
        transpose_of = state.parameter(weight_leaves[0])
    if wrap is not None:
        out = wrap(out)
    state.label(out, Kind.WEIGHT, sources, transpose_of)
    return out


_FLAT_SPECS: dict[tuple[int, tuple[str, ...]], Any] = {}


def _flat(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[list[Any], Any]:
    """``tree_flatten((args, kwargs))``, fast for arguments without containers (the spec is cached)."""
    if any(isinstance(a, list | tuple | dict) for a in (*args, *kwargs.values())):
        return tree_flatten((args, kwargs))
    key = (len(args), tuple(kwargs))
    if key not in _FLAT_SPECS:
        _FLAT_SPECS[key] = tree_flatten((args, kwargs))[1]
    return [*args, *kwargs.values()], _FLAT_SPECS[key]


def _batched_rows(state: TrackerState, t: Tensor) -> int | None:
    return state.rows(t) if state.kind(t) is Kind.BATCHED else None


class BatchTracker(TorchFunctionMode):
    """Full tracking: sees every torch function and labels batched tensors by data flow."""

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
        return handle(self.state, func, args, kwargs or {})


_ACTIVE: list[TrackerState] = []  # the state of the light capture running now (at most one)


# Functions of a tensor that return no tensor (its shape, dtype, ...): no label to give, nothing to record.
_DESCRIPTORS = (
    "shape",
    "dtype",
    "device",
    "ndim",
    "requires_grad",
    "is_leaf",
    "grad_fn",
    "layout",
    "_version",
)
_METHODS = (
    "dim", "size", "numel", "stride", "element_size", "is_floating_point", "is_complex", "is_contiguous",
    "__len__", "__repr__", "__format__", "item", "tolist", "data_ptr", "storage_offset", "get_device",
    "__bool__",
)  # fmt: skip
_DESCRIBE = {_getter(name) for name in _DESCRIPTORS} | {getattr(Tensor, n) for n in _METHODS}


class WeightLike(Tensor):
    """A weight-like tensor under light tracking: functions that touch one come here, the others do not."""

    @classmethod
    def __torch_function__(
        cls,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        with torch._C.DisableTorchFunctionSubclass():
            if not _ACTIVE or func in _DESCRIBE:
                return func(*args, **(kwargs or {}))
            return handle(_ACTIVE[-1], func, args, kwargs or {}, wrap=_wrapped)


def _wrapped(out: Any) -> Any:
    """``out`` with its tensors that need grad as :class:`WeightLike`, so that their uses come back here."""
    flat, spec = tree_flatten(out)
    flat = [t.as_subclass(WeightLike) if isinstance(t, Tensor) and t.requires_grad else t for t in flat]
    return tree_unflatten(flat, spec)


@contextlib.contextmanager
def light_tracking(state: TrackerState, free: dict[nn.Module, list[str]]) -> Iterator[None]:
    """Light tracking for one forward pass: the parameters ``free`` (module -> local names) are replaced,
    in their modules, by :class:`WeightLike` views labelled as their sources; restored afterwards."""
    replaced: list[tuple[nn.Module, str, nn.Parameter]] = []
    wrappers: dict[int, Tensor] = {}
    for module, names in free.items():
        for name in names:
            param = module._parameters[name]
            assert param is not None
            if id(param) not in wrappers:
                wrapper = param.as_subclass(WeightLike)
                source = state.param_source(state.params[id(param)], param)
                setattr(wrapper, MARK, Mark(state.epoch, Kind.WEIGHT, frozenset({source}), param=id(param)))
                wrappers[id(param)] = wrapper
            module._parameters[name] = wrappers[id(param)]  # type: ignore[assignment]
            replaced.append((module, name, param))
    _ACTIVE.append(state)
    try:
        yield
    finally:
        _ACTIVE.pop()
        for module, name, param in replaced:
            module._parameters[name] = param


def as_weight_like(t: Tensor) -> Tensor:
    """A view of ``t`` whose uses come back to the light tracker (a shared module output)."""
    return t.as_subclass(WeightLike)
