"""The hooks backend: one batched forward and one backward, then per-sample factors of every parameter.

Forward hooks record each call of every module that owns trainable parameters; one ``autograd.grad``
of the summed log-likelihood with respect to those calls' outputs gives the per-sample output
gradients (samples are independent), and no weight gradient is formed at all. Each module call then
becomes factors of its parameters' per-sample gradients (:mod:`fimcb.engine.factors`): by the
module's rule (:mod:`fimcb.engine.rules`), or by module-local ``torch.func`` where the rule fails.
A layer without a rule is not hooked: its parameters are served where they are used, like those of
a recurrent layer, which runs unrolled (:mod:`fimcb.engine.rules.recurrent`).

Models whose parameters are used outside their modules, or whose modules run once for the whole
batch, are run under the batch tracker (:mod:`fimcb.engine.tracker`): its boundaries give the
per-sample gradients of weight-like tensors, and one batched vector-Jacobian product over the
parameter-only part of the graph (``is_grads_batched``) pulls them back to their parameters and to
the outputs of the modules that ran once. Whichever route serves a parameter, the first batch of a
model checks it against autograd: per-sample gradients must add up to the batch gradient, and
match a plain backward of single samples. A parameter that fails, or that no route can serve, is
computed by ``torch.func`` for that parameter alone (then a per-sample loop), and an INFO line says
which and why.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge
from torch.func import functional_call
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from fimcb.core.metric import Identity
from fimcb.core.protocol import check_log_likelihood_output
from fimcb.engine.factors import MATERIALISE_BUDGET, Dense, Factor, Spanned
from fimcb.engine.func import subset_gradients
from fimcb.engine.local import per_sample_vjp
from fimcb.engine.rules import Call, Parts, Rule, Unrolled, rule_for, rule_version, unrolled_for
from fimcb.engine.rules.linear import LinearPartsRule
from fimcb.engine.rules.ops import LocalOpRule, OpCall
from fimcb.engine.tracker import (
    BatchTracker,
    Kind,
    TrackerState,
    as_weight_like,
    light_tracking,
    tensors_in,
)
from fimcb.engine.types import NormRequest

log = logging.getLogger("fimcb")
T = TypeVar("T")


class Route(enum.Enum):
    """How a parameter's per-sample gradients are obtained."""

    RULE = "rule"
    MODULE_LOCAL = "module-local torch.func"
    OP_RULE = "op rule"
    OP_LOCAL = "op-local torch.func"
    PULLBACK = "batched pull-back"
    FUNC = "torch.func fallback"
    LOOP = "loop fallback"


class UnsupportedModelError(RuntimeError):
    """The hooks backend cannot serve this model (``auto`` then uses another backend)."""


class _Replan(Exception):
    """The plan's tracking met something it cannot handle, or failed its check: capture with more."""


class Tracking(enum.Enum):
    """How much of a forward pass the batch tracker watches (:mod:`fimcb.engine.tracker`)."""

    FULL = "full"  # every tensor labelled by data flow: a model's first batch, and where less fails
    LIGHT = "light"  # weight-like tensors only, batched ones by their shape
    NONE = "none"  # module hooks only (module calls on unit batches expanded to the batch)


@dataclass
class _Plan:
    """How a model is captured, decided on its first batch and kept while its parameters stay the same."""

    key: tuple[int, ...]
    owners: list[tuple[nn.Module, dict[str, str], list[int]]]  # module, local -> global name, own ids
    tracking: Tracking = Tracking.FULL  # a model's first batch runs fully tracked: it finds what needs it
    settled: bool = False  # the tracking was chosen after a lighter one failed: no lighter again
    free: set[str] = field(default_factory=set)  # parameters used outside their modules (light tracking)
    fixed: frozenset[int] = frozenset()  # ids of the model's parameters and buffers (light tracking)
    copy_outputs: bool = False  # give the model copies of captured outputs (in-place changes later)
    verified: bool = False
    fallback: dict[str, str] = field(default_factory=dict)  # parameter -> why it is served by torch.func
    routes: dict[str, set[Route]] = field(default_factory=lambda: defaultdict(set))
    rules: dict[nn.Module, Rule] = field(default_factory=dict)  # the owners with a rule: hooked, but
    unrolled: dict[nn.Module, Unrolled] = field(default_factory=dict)  # these run unrolled, unhooked
    stream: bool = True  # whether later batches reduce layers during the backward (:class:`_Stream`)
    asked: frozenset[nn.Module] | None = None  # streamed layers autograd must be asked for (a walk finds)
    unstreamed: set[nn.Module] = field(default_factory=set)  # layers whose reduction failed in the backward
    # Per module, which outputs of each of its calls (in order) the last checked, fully tracked batch
    # found shared by all samples: by data flow, where later batches see shapes (`_Forward._as_checked`).
    sharing: dict[nn.Module, list[tuple[bool, ...]]] = field(default_factory=dict)
    ops: list[tuple[Any, ...]] | None = None  # and the operations it met on parameters (`_op_signature`)

    @staticmethod
    def build(model: nn.Module, params: dict[str, nn.Parameter], key: tuple[int, ...]) -> _Plan:
        global_name = {id(p): name for name, p in params.items()}
        plan = _Plan(key, [])
        owners = []
        for module in model.modules():
            local = {
                n: global_name[id(p)]
                for n, p in module.named_parameters(recurse=False)
                if id(p) in global_name
            }
            if not local:
                continue
            owners.append((module, local, [id(p) for p in module.parameters(recurse=False)]))
            # a module without a rule is not hooked: the tracker finds its parameters where they are used
            unrolled, rule = unrolled_for(module), rule_for(module)
            if unrolled is not None:
                plan.unrolled[module] = unrolled
                plan.rules[module] = _LINEAR_PARTS  # what its forward computes through :class:`Parts`
            elif rule is not None:
                plan.rules[module] = rule
        plan.owners = owners
        return plan


_PLANS: weakref.WeakKeyDictionary[nn.Module, _Plan] = weakref.WeakKeyDictionary()
_LINEAR_PARTS = LinearPartsRule()


def plan_for(model: nn.Module, params: dict[str, nn.Parameter]) -> _Plan:
    """The model's plan, rebuilt when its trainable parameters or the rule registry change."""
    key = (rule_version(), *(id(p) for p in params.values()))
    plan = _PLANS.get(model)
    if plan is None or plan.key != key:
        plan = _Plan.build(model, params, key)
        _PLANS[model] = plan
    return plan


@dataclass
class _ModuleCall:
    """One recorded module call: what it was called with, the outputs that carry gradient (with their rows
    per sample, ``None`` for an output without the batch) and, after the backward, their gradients."""

    module: nn.Module
    local: dict[str, str]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    positions: list[int]  # of the outputs among the module's flattened output
    outputs: list[Tensor]
    rows: list[int | None]
    sources: list[int | None]  # pull-back source of each shared output
    input_rows: Callable[[Any], int | None]  # rows per sample of an input (``None``: shared)
    expanded: bool = False  # called on unit-batch inputs, its outputs expanded to the batch
    grads: list[Tensor | None] = field(default_factory=list)
    # Where the outputs' gradients enter the graph (:func:`_edge`). On the untracked path, where the rule
    # never reads the outputs and the edges are safe, large outputs are not held: ``outputs`` holds
    # zero-stride stand-ins with their shapes instead.
    edges: list[GradientEdge] = field(default_factory=list)
    streamed: bool = False  # its output's gradient arrives by a hook during the backward (:class:`_Stream`)
    reduced: bool = False  # and its parameters were reduced there (else they are served after it)

    def targets(self) -> list[GradientEdge]:
        """What to ask autograd for, for the gradients of the batched outputs."""
        return [e for e, r in zip(self.edges, self.rows, strict=True) if r is not None]

    def release(self) -> None:
        """Drop what the call captured, so that its tensors can go once the backward has used them."""
        self.args, self.kwargs, self.outputs, self.edges, self.grads = (), {}, [], [], []

    @property
    def batched(self) -> bool:
        return all(r is not None for r in self.rows)

    @property
    def shared(self) -> bool:
        return all(r is None for r in self.rows)


class _GatheredParts(Parts):
    """The linear maps of an unrolled forward during a capture: every call on per-sample rows (``B`` of
    them), and every fused kernel, runs with its parameters covered (the tracker leaves them to the
    parts), and the calls of each map are recorded, once the forward is done, as one call of the linear
    parts rule."""

    def __init__(self, module: nn.Module, forward: _Forward) -> None:
        super().__init__(module)
        self.forward = forward
        self.local = next(local for m, local, _ in forward.plan.owners if m is module)
        # the parameters' own ids: under light tracking the module holds wrappers of them
        ids = {name: key for key, name in forward.state.params.items()}
        self.ids = {n: ids[g] for n, g in self.local.items()}
        self.calls: dict[tuple[str, str | None], tuple[list[Tensor], list[Tensor]]] = {}

    def gathers(self, x: Tensor) -> bool:
        """Rows of the samples: ``B`` of them, and not weight-like where the tracker knows (an unbatched
        input of a batch of one)."""
        return (
            x.ndim >= 2
            and x.shape[0] == self.forward.batch
            and (not self.forward.tracked or self.forward.state.kind(x) is not Kind.WEIGHT)
        )

    def linear(self, x: Tensor, weight: str, bias: str | None = None) -> Tensor:
        if not self.gathers(x):  # not per sample: the tracker serves it
            return super().linear(x, weight, bias)
        y = self.fused(lambda: super(_GatheredParts, self).linear(x, weight, bias), (weight, bias))
        self.linear_into(x, y, weight, bias)
        return y

    def fused(self, run: Callable[[], T], names: Sequence[str | None]) -> T:
        covered = self.forward.state.covered
        keys = [self.ids[n] for n in names if n is not None and n in self.ids]
        for key in keys:
            covered[key] = covered.get(key, 0) + 1
        try:
            return run()
        finally:
            for key in keys:
                covered[key] -= 1

    def linear_into(self, x: Tensor, output: Tensor, weight: str, bias: str | None = None) -> None:
        inputs, outputs = self.calls.setdefault((weight, bias), ([], []))
        inputs.append(x)
        outputs.append(output)

    def record(self) -> None:
        """One recorded call per map, its inputs concatenated over the calls' positions."""
        batch = self.forward.batch
        for (weight, bias), (inputs, outputs) in self.calls.items():
            local = {n: self.local[n] for n in (weight, bias) if n is not None and n in self.local}
            if not local:  # frozen
                continue
            with torch.no_grad():
                stacked = torch.cat([x.detach().reshape(batch, -1, x.shape[-1]) for x in inputs], 1)
            self.forward._record(self.module, local, (stacked,), {"weight": weight, "bias": bias}, outputs)
        self.calls.clear()


@dataclass
class Capture:
    """Per-sample factors of every trainable parameter of one batch (rows = samples).

    Attributes:
        factors: one factor per parameter, by global name, except those in ``norms``.
        log_likelihood: ``[B]`` per-sample log-likelihoods.
        norms: the parameters already reduced during the backward pass, by the capture's ``reduce``.
    """

    factors: dict[str, Factor]
    log_likelihood: Tensor
    norms: dict[str, Tensor] = field(default_factory=dict)


#: What a capture may reduce a parameter's complete factor to as soon as it is known (its norms), by name.
Reduce = Callable[[str, Factor], Tensor]


class _Forward:
    """Hooks (and the tracker) for one forward pass."""

    def __init__(self, plan: _Plan, params: dict[str, nn.Parameter], batch: int, x: Tensor) -> None:
        self.plan = plan
        self.batch = batch
        self.tracked = tracked = plan.tracking is not Tracking.NONE
        light = plan.tracking is Tracking.LIGHT
        self.state = TrackerState(
            batch,
            {id(p): n for n, p in params.items()},
            plan.copy_outputs,
            light,
            plan.fixed if light else frozenset(),
        )
        self.calls: list[_ModuleCall] = []
        self._zeros: dict[tuple[torch.dtype, torch.device], Tensor] = {}
        self.recording = plan.tracking is Tracking.FULL and not plan.verified  # what the plan checks against
        self.sharing: dict[nn.Module, list[tuple[bool, ...]]] = {}
        # what a call needs of this pass, without a reference back to it (no cycle keeps tensors alive)
        self.input_rows = functools.partial(_input_rows, self.state, batch, tracked)
        if tracked:
            self.state.label(x, Kind.BATCHED)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Hooks on every owner of parameters that has a rule. A module with an unrolled forward runs it
        instead of its own, its linear maps recorded as parts (:class:`_GatheredParts`). A module without
        a rule is not hooked: its parameters are found by the tracker like any used in plain torch code,
        and served by op rules (op-local ``torch.func`` for an operation without one)."""
        handles = []
        unrolled = []
        try:
            for module, forward in self.plan.unrolled.items():
                if "forward" not in vars(module):  # a forward the user set on the instance is what runs
                    module.forward = functools.partial(self._unrolled, module, forward)
                    unrolled.append(module)
            for module, local, own in self.plan.owners:
                if module not in self.plan.rules or module in self.plan.unrolled:
                    continue
                if self.tracked:
                    handles.append(module.register_forward_pre_hook(self._make_enter(own)))
                handles.append(module.register_forward_hook(self._make_hook(local, own), with_kwargs=True))
            with self._tracker():
                yield
        finally:
            for handle in handles:
                handle.remove()
            for module in unrolled:
                del module.forward

    def _tracker(self) -> contextlib.AbstractContextManager[Any]:
        tracking = self.plan.tracking
        if tracking is Tracking.FULL:
            return BatchTracker(self.state)
        if tracking is Tracking.LIGHT:
            free = {
                module: [n for n, g in local.items() if g in self.plan.free]
                for module, local, _ in self.plan.owners
            }
            return light_tracking(self.state, {m: names for m, names in free.items() if names})
        return contextlib.nullcontext()

    def _unrolled(self, module: nn.Module, forward: Unrolled, *args: Any, **kwargs: Any) -> Any:
        parts = _GatheredParts(module, self)
        output = forward.forward(parts, *args, **kwargs)
        parts.record()
        return output

    def _make_enter(self, own: list[int]) -> Any:
        covered = self.state.covered

        def enter(module: nn.Module, args: Any) -> None:  # the module's own parameters are its rule's now
            for key in own:
                covered[key] = covered.get(key, 0) + 1

        return enter

    def _make_hook(self, local: dict[str, str], own: list[int]) -> Any:
        covered = self.state.covered

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
            if self.tracked:
                for key in own:
                    covered[key] -= 1
            return self._record(module, local, args, kwargs, output)

        return hook

    def _record(
        self,
        module: nn.Module,
        local: dict[str, str],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: Any,
    ) -> Any:
        outputs = [t for t in tensors_in(output) if t.requires_grad]
        if not outputs:
            return None
        state, batch = self.state, self.batch
        # Gradients are asked for at the outputs' edges (:func:`_edge`), which later in-place changes of the
        # outputs do not cut off; the outputs are kept, and protected from such changes, only where the
        # rule reads their values or an edge is not safe.
        reads = self.plan.rules[module].reads_outputs
        expanded = False
        if not self.tracked and all(t.ndim and t.shape[0] == batch for t in outputs):  # the common case
            self._as_checked(module, [1] * len(outputs), [False] * len(outputs))
            positions = _positions(output, outputs)
            edges, safe = zip(*(_edge(t) for t in outputs), strict=True)
            protect = reads or not all(safe)
            if protect:
                state.versions.extend((t, t._version) for t in outputs)
            else:  # large ones not held: they go when the model is done with them, as in a plain forward
                outputs = [self._stand_in(t) if t.nbytes >= STREAM_MIN_BYTES else t for t in outputs]
            self.calls.append(
                _ModuleCall(
                    module,
                    local,
                    args,
                    kwargs,
                    positions,
                    outputs,
                    [1] * len(outputs),
                    [None] * len(outputs),
                    self.input_rows,
                    edges=list(edges),
                )
            )
            return self._copies(output, outputs) if protect and self.plan.copy_outputs else None
        if self.tracked:
            from_data = any(state.kind(t) is Kind.BATCHED for t in tensors_in((args, kwargs)))
            rows = self._as_checked(
                module, [self._output_rows(t, from_data) for t in outputs], [False] * len(outputs)
            )
        else:
            expand = [t.ndim >= 1 and t.shape[0] == 1 != batch for t in outputs]
            if not all(e or (t.ndim and t.shape[0] == batch) for t, e in zip(outputs, expand, strict=True)):
                raise _Replan(f"{type(module).__name__} returned an output without the batch dimension")
            self._as_checked(module, [1] * len(outputs), expand)
            expanded = any(expand)
            if expanded:  # called once for the batch: continue with its output repeated for every sample
                output, outputs = _expand_outputs(output, outputs, batch)
            rows = [1] * len(outputs)
        index = len(self.calls)
        edges, safe = zip(*(_edge(t) for t in outputs), strict=True)
        protect = reads or not all(safe)
        sources: list[int | None] = []
        shared: dict[int, Tensor] = {}
        for j, (t, r) in enumerate(zip(outputs, rows, strict=True)):
            if r is None:  # shared by all samples: a weight-like tensor whose gradient comes by pull-back
                source = state.new_source(t, ("output", (index, j)))
                inherited = state.sources_of(t) if state.kind(t) is Kind.WEIGHT else frozenset()
                if state.light:  # its uses must come back to the light tracker
                    shared[id(t)] = as_weight_like(t)
                state.label(shared.get(id(t), t), Kind.WEIGHT, inherited | {source})
                sources.append(source)
            else:
                state.label(t, Kind.BATCHED)
                sources.append(None)
                if protect:
                    state.versions.append((t, t._version))
        self.calls.append(
            _ModuleCall(
                module,
                local,
                args,
                kwargs,
                _positions(output, outputs),
                outputs,
                rows,
                sources,
                self.input_rows,
                expanded,
                edges=list(edges),
            )
        )
        if shared:
            flat, spec = tree_flatten(output)
            output = tree_unflatten([shared.get(id(t), t) for t in flat], spec)
        if not (self.plan.copy_outputs and (protect or None in rows)):
            return output if expanded or shared else None
        return self._copies(output, outputs)

    def _as_checked(
        self, module: nn.Module, rows: list[int | None], expanded: list[bool]
    ) -> list[int | None]:
        """A call's output rows as the checked, fully tracked batch found them by data flow. Later batches
        judge by shapes, which take a module called on constants (positions ``arange(T)``) for a batched
        call when ``T`` is a multiple of the batch size: such an output is shared where the tracker can
        serve it, else the batch is captured with more tracking; a call unlike the checked ones, too."""
        shared = tuple(r is None or e for r, e in zip(rows, expanded, strict=True))
        calls = self.sharing.setdefault(module, [])
        calls.append(shared)
        if self.recording or self.batch == 1:  # one sample: what is shared is its own
            return rows
        known = self.plan.sharing.get(module, [])
        checked = known[len(calls) - 1] if len(calls) <= len(known) else None
        if checked == shared:
            return rows
        name = type(module).__name__
        if checked is None or len(checked) != len(shared):
            raise _Replan(f"{name} was called otherwise than on the checked batch")
        if not self.tracked or any(s and not c for s, c in zip(shared, checked, strict=True)):
            raise _Replan(f"{name}'s outputs are not shared by the samples as on the checked batch")
        return [None if c else r for r, c in zip(rows, checked, strict=True)]

    def _stand_in(self, t: Tensor) -> Tensor:
        """A zero-stride tensor shaped like ``t``, of its dtype and device, holding no memory of ``t``'s."""
        key = (t.dtype, t.device)
        zero = self._zeros.get(key)
        if zero is None:
            zero = self._zeros[key] = t.new_zeros(())
        return zero.expand(t.shape)

    def _copies(self, output: Any, outputs: list[Tensor]) -> Any:
        """The output with the captured tensors copied (labelled like them), for the rest of the model."""
        flat, spec = tree_flatten(output)
        for i, t in enumerate(flat):
            if any(t is o for o in outputs):
                mark = self.state.mark(t)
                flat[i] = t.clone()
                if mark is not None:
                    self.state.label(flat[i], mark.kind, mark.sources)
        return tree_unflatten(flat, spec)

    def _output_rows(self, t: Tensor, from_data: bool) -> int | None:
        """Rows per sample of a module output: a call on batched data gives ``B·m`` rows; a call on
        constants only gives per-sample rows when it has exactly ``B`` (the shape convention)."""
        if t.ndim == 0 or t.shape[0] == 0:
            return None
        if from_data:
            return t.shape[0] // self.batch if t.shape[0] % self.batch == 0 else None
        return 1 if t.shape[0] == self.batch else None


def capture(request: NormRequest, x: Tensor, reduce: Reduce | None = None) -> Capture:
    """Per-sample factors of every trainable parameter for the batch ``x`` (the hooks backend).

    A model's first batch runs under the batch tracker and is verified against autograd; models that
    turn out to need neither the tracker nor copies of their layers' outputs run without them after.
    With ``reduce``, those later batches reduce the parameters of the layers :class:`_Stream` selects
    (called once, large enough) to what ``reduce`` makes of them while the backward pass runs: the
    caller gets those in :attr:`Capture.norms` instead of factors, and the memory stays near that of
    a plain backward.
    """
    model, params = request.model, request.params
    plan = plan_for(model, params)
    for _ in range(6):
        verifying = not plan.verified
        try:
            result, needs_tracker = _capture(request, plan, x, verifying, reduce)
        except _Replan as why:
            lighter = plan.tracking is Tracking.NONE
            plan.tracking = Tracking.LIGHT if lighter else Tracking.FULL
            plan.settled, plan.verified = not lighter, False
            log.info(
                "fimcb: %s; %s is captured with %s tracking", why, type(model).__name__, plan.tracking.value
            )
            continue
        except _InPlace:  # a later in-place operation changed a captured output: capture behind copies
            plan.copy_outputs, plan.verified = True, False
            continue
        except _Regraph:
            continue
        if verifying:
            plan.verified = True
            if (
                plan.tracking is Tracking.FULL and not plan.settled
            ):  # discovered: next, the lightest that serves
                log.info("fimcb hooks engine on %s: %s", type(model).__name__, describe(plan))
                outside = {Route.OP_RULE, Route.OP_LOCAL, Route.PULLBACK}
                plan.free = {n for n, routes in plan.routes.items() if routes & outside and n in params}
                plan.fixed = frozenset(id(t) for t in (*model.parameters(), *model.buffers()))
                plan.tracking = Tracking.LIGHT if needs_tracker else Tracking.NONE
                plan.verified = False
        return result
    raise UnsupportedModelError(f"cannot settle how to capture {type(model).__name__}")


def _input_rows(state: TrackerState, batch: int, tracked: bool, t: Any) -> int | None:
    """Rows per sample of a module input (``None`` for one shared by all samples)."""
    if not isinstance(t, Tensor):
        return None
    if tracked:
        return state.rows(t)
    return 1 if t.ndim and t.shape[0] == batch else None


def _edge(t: Tensor) -> tuple[GradientEdge, bool]:
    """Where the gradient of a module output enters the graph, and whether a later in-place change of the
    output leaves it there. A view's own node is cut off the graph by such a change (autograd reroutes the
    gradient to its base), so a view that reshapes the whole of a tensor made in the graph (``nn.Linear``
    on ``[B, T, d]`` returns one) is asked for at its base, the gradient reshaped; other views are not
    safe."""
    base = t._base
    if base is None:
        return get_gradient_edge(t), True
    if base.grad_fn is not None and base.numel() == t.numel() and base.is_contiguous() and t.is_contiguous():
        return get_gradient_edge(base), True
    return get_gradient_edge(t), False


def _positions(output: Any, outputs: list[Tensor]) -> list[int]:
    """Where each of ``outputs`` is among the leaves of the module's ``output``."""
    if isinstance(output, Tensor):
        return [0]
    flat = tree_flatten(output)[0]
    return [next(i for i, t in enumerate(flat) if t is o) for o in outputs]


def _expand_outputs(output: Any, outputs: list[Tensor], batch: int) -> tuple[Any, list[Tensor]]:
    """The module's output with every unit-batch tensor that carries gradient expanded to the batch."""
    flat, spec = tree_flatten(output)
    expanded = []
    for i, t in enumerate(flat):
        if isinstance(t, Tensor) and any(t is o for o in outputs):
            if t.ndim >= 1 and t.shape[0] == 1:
                flat[i] = t.expand(batch, *t.shape[1:])
            expanded.append(flat[i])
    return tree_unflatten(flat, spec), expanded


class _InPlace(Exception):
    """A captured output was modified in place later in the forward pass."""


#: A layer whose captured inputs and output gradient hold less than this is reduced after the backward,
#: and an output smaller than this is held (a stand-in costs more than it frees): reducing during the
#: backward costs a hook and an interruption per layer, worth it only for what it frees.
STREAM_MIN_BYTES = 1 << 20


def _held_bytes(call: _ModuleCall) -> int:
    """What a call's capture holds until its layer is reduced: its tensor inputs and output gradients."""
    inputs = tensors_in(call.args) + (tensors_in(list(call.kwargs.values())) if call.kwargs else [])
    return sum(t.nbytes for t in (*call.outputs, *inputs))


class _Regraph(Exception):
    """A streamed layer's gradient neither arrived nor was asked for: the graph differs from the one the
    plan's walk saw. Capture again, walking the graph."""


class _Stream:
    """The calls of a capture whose parameters are reduced while the backward pass runs.

    A layer called once, with a rule and one batched output, that holds enough (``STREAM_MIN_BYTES``)
    gets a hook on the node its output's gradient enters: when that node runs, the rule's factors are
    reduced at once and the call lets go of its inputs, so that neither outlives the layer's backward
    (as in a plain backward) instead of every layer's inputs and output gradients being held to the
    end. Autograd only runs the nodes on the way to what it is asked for, so the outputs whose nodes
    would not run are asked for as well and reduced after it (:meth:`ask`). A rule that fails leaves
    its call to the usual route."""

    def __init__(self, forward: _Forward, reduce: Reduce) -> None:
        self.reduce, self.plan = reduce, forward.plan
        self.norms: dict[str, Tensor] = {}
        calls_of: dict[nn.Module, int] = defaultdict(int)
        uses: dict[str, int] = defaultdict(int)
        for call in forward.calls:
            calls_of[call.module] += 1
            for name in call.local.values():
                uses[name] += 1
        self.pending: dict[nn.Module, _ModuleCall] = {}
        for call in forward.calls:
            if (
                call.rows == [1]
                and calls_of[call.module] == 1
                and not call.expanded
                and call.module not in self.plan.unstreamed
                and all(uses[n] == 1 and n not in self.plan.fallback for n in call.local.values())
                and _held_bytes(call) >= STREAM_MIN_BYTES
            ):
                call.streamed = True
                self.pending[call.module] = call
        self.handles = [
            call.edges[0].node.register_prehook(
                functools.partial(self._arrived, call.module, call.edges[0].output_nr)
            )
            for call in self.pending.values()
        ]
        self.asked: list[_ModuleCall] = []
        self.walked = False

    def ask(self, total: Tensor, wanted: list[Tensor | GradientEdge]) -> list[GradientEdge]:
        """The edges to ask autograd for besides ``wanted``: those of the streamed outputs whose nodes would
        not run. A node runs only when a node it feeds is asked for, or runs; one depth-first walk of the
        graph finds them on a model's first streamed batch (the nodes off the graph too: asking costs
        nothing there), and the plan keeps the layers for the next batches (:meth:`finish` checks them)."""
        if self.plan.asked is None:
            self.plan.asked, self.walked = self._walk(total, wanted), True
        self.asked = [call for module, call in self.pending.items() if module in self.plan.asked]
        return [call.edges[0] for call in self.asked]

    def _walk(self, total: Tensor, wanted: list[Tensor | GradientEdge]) -> frozenset[nn.Module]:
        at: dict[Node, list[nn.Module]] = defaultdict(list)
        for module, call in self.pending.items():
            at[call.edges[0].node].append(module)
        asked = {w.grad_fn if isinstance(w, Tensor) else w.node for w in wanted}
        runs: dict[Node, bool] = {}
        stack: list[tuple[Node, bool]] = [(total.grad_fn, False)] if total.grad_fn is not None else []
        while stack:
            node, done = stack.pop()
            if not done:
                if node in runs:
                    continue
                runs[node] = False
                stack.append((node, True))
                stack.extend((n, False) for n, _ in node.next_functions if n is not None and n not in runs)
                continue
            runs[node] = any(n is not None and (n in asked or runs[n]) for n, _ in node.next_functions)
            if not runs[node] and node in at:
                asked.add(node)
        return frozenset(m for node, modules in at.items() if not runs.get(node, False) for m in modules)

    def _arrived(self, module: nn.Module, index: int, grads: tuple[Tensor | None, ...]) -> None:
        call = self.pending.pop(module, None)
        if call is not None:  # the node runs: no gradient for this output means zero
            self._reduce(call, grads[index])

    def _reduce(self, call: _ModuleCall, found: Tensor | None) -> None:
        like = call.outputs[0]
        grad = torch.zeros_like(like) if found is None else found.detach().reshape(like.shape)
        call.grads = [grad]
        try:
            factors = _by_rule(self.plan.rules[call.module], call, [grad], grad.shape[0])
            norms = {call.local[n]: self.reduce(call.local[n], f) for n, f in factors.items()}
        except Exception:  # served after the backward, by the rule again or module-local torch.func
            self.plan.unstreamed.add(call.module)  # and from now on without trying here first
            return
        self.norms.update(norms)
        for name in norms:
            self.plan.routes[name].add(Route.RULE)
        call.reduced = True
        call.release()

    def remove(self) -> None:
        """Take the hooks off the graph's nodes."""
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def finish(self, grads: Sequence[Tensor | None]) -> None:
        """Reduce the asked-for calls by the gradients autograd returned (``None``: off the graph, zero).
        A call whose node did not run although the plan did not ask for it means the graph changed:
        :class:`_Regraph`. After a fresh walk of this very graph that cannot happen; should it, the model
        stops streaming rather than loop."""
        for call, grad in zip(self.asked, grads, strict=True):
            if self.pending.pop(call.module, None) is not None:
                self._reduce(call, grad)
        if self.pending:
            self.plan.asked = None
            if self.walked:
                self.plan.stream = False
            raise _Regraph


def _capture(
    request: NormRequest, plan: _Plan, x: Tensor, verify: bool, reduce: Reduce | None
) -> tuple[Capture, bool]:
    """One capture; also whether this model needs the batch tracker (for the next batches).

    Without the tracker, a module called once for the whole batch with a unit leading dimension (a
    position embedding on ``[1, T]``) has its output expanded to the batch (a view, same values), so that
    its gradient arrives per sample; anything else that needs the tracker, or a failed check, raises
    :class:`_Replan`."""
    params = request.params
    batch = x.shape[0]
    forward = _Forward(plan, params, batch, x)
    with forward.running():
        ll = check_log_likelihood_output(request.log_likelihood(x), batch)
    state = forward.state
    if any(t._version != v for t, v in state.versions):
        raise _InPlace
    state.versions.clear()  # checked: the captured outputs may go as soon as the backward has used them
    signature = [_op_signature(op) for op, _ in state.ops]
    if (
        forward.tracked
        and not forward.recording
        and batch > 1
        and plan.ops is not None
        and signature != plan.ops
    ):
        raise _Replan("operations on parameters met per-sample operands unlike on the checked batch")
    total = ll.sum()
    stream = (
        _Stream(forward, reduce)
        if reduce is not None and not verify and plan.tracking is Tracking.NONE and plan.stream
        else None
    )
    targets = [t for c in forward.calls if not c.streamed for t in c.targets()]
    op_targets = [t for op, _ in state.ops for t in op.targets]
    wanted: list[Tensor | GradientEdge] = [*targets, *op_targets]
    extra = stream.ask(total, wanted) if stream is not None else []
    wanted += params.values() if verify else []
    try:
        found_grads = (  # nothing to capture when every parameter has fallen back
            list(
                torch.autograd.grad(
                    total,
                    [*wanted, *extra],  # type: ignore[arg-type]  # tensors and edges mixed: autograd takes both
                    allow_unused=True,
                    retain_graph=verify and bool(state.sources),
                )
            )
            if wanted or extra
            else []
        )
    finally:  # the hooks hold the calls' inputs for as long as the graph lives
        if stream is not None:
            stream.remove()
    if stream is not None:
        stream.finish(found_grads[len(wanted) :])
        del found_grads[len(wanted) :]
    received = [None if g is None else g.detach() for g in found_grads]  # None: no gradient reached it
    tensors = [*op_targets, *(params.values() if verify else [])]  # zeros where no gradient reached
    grads = [
        torch.zeros_like(t) if g is None else g
        for t, g in zip(tensors, received[len(targets) :], strict=True)
    ]
    position = 0
    for c in forward.calls:
        if c.streamed:
            continue
        c.grads = []
        for t, r in zip(c.outputs, c.rows, strict=True):
            g = received[position] if r is not None else None
            c.grads.append(None if g is None else g.reshape(t.shape))  # an edge at a view's base
            position += r is not None
    found: dict[str, list[Factor]] = defaultdict(list)
    failed: dict[str, str] = {}
    pullback = _op_factors(forward, grads[: len(op_targets)], found, failed)
    if pullback:
        with torch._C.DisableTorchFunctionSubclass():  # the light tracker's operands as plain tensors
            _pull_back(forward, pullback, found, failed)
    _module_factors(forward, found, failed)
    norms = stream.norms if stream is not None else {}
    served = [n for n in params if n not in plan.fallback and n not in failed and n not in norms]
    if plan.tracking is Tracking.NONE and any(n not in found for n in served):
        raise _Replan(
            f"parameters {[n for n in served if n not in found][:5]} were not used inside their module"
        )
    factors = {n: Factor.combine(found[n]) if found[n] else _zeros(params[n], batch) for n in served}
    if verify:
        failed.update(_verify(request, factors, grads[len(op_targets) :], x, ll))
    if forward.recording:
        plan.sharing, plan.ops = forward.sharing, signature
    if failed and plan.tracking is not Tracking.FULL:
        raise _Replan(
            f"without the tracker, {', '.join(f'{n} ({why})' for n, why in list(failed.items())[:3])}"
        )
    for name, why in failed.items():
        plan.fallback.setdefault(name, why)
        factors.pop(name, None)
    if plan.fallback:
        fallback = {n: params[n] for n in plan.fallback}
        for name, (g, route) in subset_gradients(request, fallback, x).items():
            factors[name] = Dense(g)
            plan.routes[name] = {Route.FUNC if route == "func" else Route.LOOP}
    needs_tracker = any(_needs_tracker(state, op) for op, _ in state.ops) or any(
        (r is not None and r != 1) or (r is None and not _unit_leading(t))
        for c in forward.calls
        if not c.streamed
        for t, r in zip(c.outputs, c.rows, strict=True)
    )
    return Capture({n: factors[n] for n in params if n not in norms}, ll.detach(), norms), needs_tracker


def _detached(t: Any) -> Any:
    """``t`` without its graph: a tensor detached, a container of tensors rebuilt from detached ones."""
    if isinstance(t, Tensor):
        return t.detach()
    if isinstance(t, list | tuple | dict):
        return tree_map(lambda leaf: leaf.detach() if isinstance(leaf, Tensor) else leaf, t)
    return t


def _op_signature(op: OpCall) -> tuple[Any, ...]:
    """What the tracker made of an operation: the function, its weight-like operands and the rows per sample
    of its per-sample ones. Shapes alone (light tracking, and constants of exactly ``B`` rows) can take a
    constant of ``k·B`` rows for a per-sample operand, which only this comparison with the checked batch,
    tracked by data flow, reveals."""
    return op.func, tuple(sorted(op.weights)), tuple(sorted(op.batched.items()))


def _unit_leading(t: Tensor) -> bool:
    return t.ndim >= 1 and t.shape[0] == 1


def _needs_tracker(state: TrackerState, op: OpCall) -> bool:
    """Whether a boundary involves more than outputs of unit-batch module calls (which the untracked capture
    expands): a parameter used outside its module, or a shared output of another shape."""
    for w in op.weights.values():
        mark = state.mark(w)
        if mark is None or any(state.source_keys[i][0] == "param" for i in mark.sources):
            return True
        if any(not _unit_leading(state.sources[i]) for i in mark.sources):
            return True
    return False


def _zeros(p: Tensor, batch: int) -> Dense:
    """The factor of a parameter the log-likelihood does not use: zero for every sample."""
    return Dense(torch.zeros(batch, *p.shape, dtype=p.dtype, device=p.device))


def _op_factors(
    forward: _Forward, grads: list[Tensor], found: dict[str, list[Factor]], failed: dict[str, str]
) -> list[tuple[Tensor, Factor]]:
    """Factors of the weight-like operands of every boundary: a parameter's go to it directly (transposed
    for ``W.T``), the others are returned for the pull-back."""
    state, plan = forward.state, forward.plan
    pullback: list[tuple[Tensor, Factor]] = []
    start = 0
    for op, rule in state.ops:
        op_grads = grads[start : start + len(op.targets)]
        start += len(op.targets)
        try:
            op.leaves = [_detached(t) for t in op.leaves]  # the rules read values; the graph stays behind
            with torch.no_grad() if not isinstance(rule, LocalOpRule) else contextlib.nullcontext():
                factors = rule.factors(op, op_grads)
        except Exception as err:  # op-local torch.func cannot split this function by sample
            for w in op.weights.values():
                for name in _parameters_behind(forward, w):
                    failed.setdefault(name, f"{_op_name(op.func)} outside modules: {_first_line(err)}")
            continue
        route = Route.OP_LOCAL if isinstance(rule, LocalOpRule) else Route.OP_RULE
        for position, factor in factors.items():
            w = op.weights[position]
            owner = state.parameter(w)
            mark = state.mark(w)
            if owner is not None:
                found[owner].append(factor)
                plan.routes[owner].add(route)
            elif mark is not None and mark.transpose_of is not None:
                found[mark.transpose_of].append(factor.transposed())
                plan.routes[mark.transpose_of].add(route)
            else:
                pullback.append((w, factor))
    return pullback


def _pull_back(
    forward: _Forward,
    items: list[tuple[Tensor, Factor]],
    found: dict[str, list[Factor]],
    failed: dict[str, str],
) -> None:
    """Per-sample gradients of the sources (parameters, shared module outputs) of weight-like operands, by
    batched vector-Jacobian products over the parameter-only part of the graph: of every sample's
    cotangents, or, where the operands have fewer coordinates than the batch has samples (a scalar
    log-determinant, a learned scale), of a basis of their coordinates, then combined per sample."""
    state, batch = forward.state, forward.batch
    # Operands with the same sources share one pull-back; others get their own, so that a backward pass
    # never runs through another operand's graph (a log-determinant's, say) with zero cotangents.
    groups: dict[tuple[frozenset[int], bool], list[tuple[Tensor, Factor]]] = defaultdict(list)
    for w, f in items:  # scalars and vectors smaller than the batch: by a basis of their coordinates
        groups[state.sources_of(w), w.numel() <= batch].append((w, f))
    grads: dict[int, list[Factor]] = {i: [] for i in sorted(set().union(*(s for s, _ in groups)))}
    for (sources, by_basis), group in _merge_small(groups, state.sources).items():
        order = sorted(sources)
        pull = _pull_back_by_basis if by_basis else _pull_back_per_sample
        try:
            pulled = pull(group, [state.sources[i] for i in order], batch)
        except Exception as err:  # those sources' parameters fall back, the others are served
            for i in order:
                for name in _parameters_of_source(forward, i):
                    failed.setdefault(name, f"the pull-back to it failed: {_first_line(err)}")
            continue
        for i, factor in zip(order, pulled, strict=True):
            if factor is not None:
                grads[i].append(factor)
    for i, parts in grads.items():
        t = state.sources[i]
        kind, key = state.source_keys[i]
        if kind == "param":
            found[key].extend(parts)
            forward.plan.routes[key].add(Route.PULLBACK)
        else:  # a module output's per-sample gradients, for its rule or module-local torch.func
            dense = [f.dense(slice(None)).reshape(batch, *t.shape) for f in parts]
            forward.calls[key[0]].grads[key[1]] = (
                sum(dense) if dense else torch.zeros(batch, *t.shape, dtype=t.dtype)
            )


#: The most coordinates × source elements (the Jacobian's size) of pull-backs by basis merged into one.
MERGE_JACOBIAN = 1 << 16


def _merge_small(
    groups: dict[tuple[frozenset[int], bool], list[tuple[Tensor, Factor]]], sources: list[Tensor]
) -> dict[tuple[frozenset[int], bool], list[tuple[Tensor, Factor]]]:
    """Pull-backs by basis merged while their Jacobian stays small (a flow's learned scales): one batched
    backward pass instead of one each. Running through another operand's graph then costs a few more
    cotangents, as many as that one has coordinates; a large source (a log-determinant's weight) keeps its
    own pass."""
    merged: dict[tuple[frozenset[int], bool], list[tuple[Tensor, Factor]]] = {}
    open_key: tuple[frozenset[int], bool] | None = None
    for key, group in groups.items():
        if not key[1]:
            merged[key] = group
            continue
        if open_key is not None:
            union = open_key[0] | key[0]
            coordinates = sum(w.numel() for w, _ in (*merged[open_key], *group))
            if coordinates * sum(sources[i].numel() for i in union) <= MERGE_JACOBIAN:
                items = merged.pop(open_key)
                merged.setdefault((union, True), []).extend([*items, *group])  # perhaps a closed one
                open_key = (union, True)
                continue
        merged.setdefault(key, []).extend(group)
        open_key = key
    return merged


def _pull_back_by_basis(
    items: list[tuple[Tensor, Factor]], inputs: list[Tensor], batch: int
) -> list[Factor | None]:
    """The inputs' per-sample gradients from the Jacobian rows of the operands' coordinates, combined with
    each sample's cotangent: as many backward passes as coordinates, not samples."""
    outputs = [w for w, _ in items]
    coordinates = sum(w.numel() for w in outputs)
    basis = torch.eye(coordinates, dtype=outputs[0].dtype, device=outputs[0].device)
    splits = basis.split([w.numel() for w in outputs], dim=1)
    cotangents = [b.reshape(-1, *w.shape) for b, w in zip(splits, outputs, strict=True)]
    jacobian = _batched_vjp(outputs, inputs, cotangents)
    weights = torch.cat([f.dense(slice(None)).reshape(batch, -1) for _, f in items], dim=1)
    return [None if g is None else Spanned(weights.detach(), g.detach()) for g in jacobian]


def _pull_back_per_sample(
    items: list[tuple[Tensor, Factor]], inputs: list[Tensor], batch: int
) -> list[Factor | None]:
    """The inputs' per-sample gradients by a vector-Jacobian product batched over the samples' cotangents,
    in chunks that bound memory."""
    outputs = [w for w, _ in items]
    size = sum(w.numel() for w in outputs) + sum(t.numel() for t in inputs)
    step = max(1, min(batch, MATERIALISE_BUDGET // max(1, size)))
    parts = [
        _batched_vjp(outputs, inputs, [f.dense(slice(s, s + step)).reshape(-1, *w.shape) for w, f in items])
        for s in range(0, batch, step)
    ]
    rows = [_cat_rows([p[j] for p in parts], t, batch, step) for j, t in enumerate(inputs)]
    return [None if g is None else Dense(g.detach()) for g in rows]


def _batched_vjp(
    outputs: list[Tensor], inputs: list[Tensor], cotangents: list[Tensor]
) -> list[Tensor | None]:
    """``[n, *input.shape]`` vector-Jacobian products for ``n`` stacked cotangents of every output."""
    if cotangents[0].shape[0] == 1:  # one: a plain backward, no vmap
        found = torch.autograd.grad(
            outputs, inputs, [c[0] for c in cotangents], retain_graph=True, allow_unused=True
        )
        return [None if g is None else g.unsqueeze(0) for g in found]
    return list(
        torch.autograd.grad(
            outputs, inputs, cotangents, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
    )


def _cat_rows(parts: list[Tensor | None], like: Tensor, batch: int, step: int) -> Tensor | None:
    """Chunks of per-sample rows concatenated, an absent chunk (no path to ``like``) as zeros."""
    if all(p is None for p in parts):
        return None
    sizes = [min(step, batch - s) for s in range(0, batch, step)]
    return torch.cat(
        [p if p is not None else like.new_zeros(n, *like.shape) for p, n in zip(parts, sizes, strict=True)]
    )


def _module_factors(forward: _Forward, found: dict[str, list[Factor]], failed: dict[str, str]) -> None:
    """Factors of every module call's own parameters: by the module's rule where it has one and the call's
    outputs are all batched or all shared, else (or if the rule fails) module-local ``torch.func``;
    parameters neither can serve are noted in ``failed``."""
    batch, plan = forward.batch, forward.plan
    for call in forward.calls:
        if call.reduced:
            continue
        grads = [  # an output no gradient reached: zeros, per sample for a shared one
            g
            if g is not None
            else torch.zeros_like(t)
            if r is not None
            else torch.zeros(batch, *t.shape, dtype=t.dtype, device=t.device)
            for t, g, r in zip(call.outputs, call.grads, call.rows, strict=True)
        ]
        rule = plan.rules.get(call.module)
        routes: list[tuple[Route, Callable[[Rule | None, _ModuleCall, list[Tensor], int], dict[str, Factor]]]]
        routes = [(Route.RULE, _by_rule)] if rule is not None and (call.shared or call.batched) else []
        if call.module not in plan.unrolled:  # an unrolled module's calls are parts, not calls of it
            routes.append((Route.MODULE_LOCAL, _module_local))
        errors = []
        for route, compute in routes:
            try:
                factors = compute(rule, call, grads, batch)
                break
            except Exception as err:
                errors.append(f"{route.value}: {_first_line(err)}")
        else:
            for name in call.local.values():
                failed.setdefault(name, f"{type(call.module).__name__} ({'; '.join(errors)})")
            continue
        for local, factor in factors.items():
            found[call.local[local]].append(factor)
            plan.routes[call.local[local]].add(route)


def _by_rule(rule: Rule | None, call: _ModuleCall, grads: list[Tensor], batch: int) -> dict[str, Factor]:
    """The rule's factors of a call: a batched one as it is (``m`` rows per sample summed into each
    sample's), one made once for the batch as if made for every sample."""
    assert rule is not None
    if len(set(call.rows)) > 1:
        raise ValueError("outputs with different rows per sample")
    if call.expanded or call.shared:
        presented = _expanded(call, grads, batch)
    else:
        args = tuple(_detached(a) for a in call.args)
        kwargs = {k: _detached(v) for k, v in call.kwargs.items()}
        presented = Call(call.module, args, kwargs, [t.detach() for t in call.outputs], grads)
    with torch.no_grad():  # rules compute from captured tensors: nothing of theirs needs a graph
        factors = {n: f for n, f in rule.factors(presented).items() if n in call.local}  # frozen: not asked
    rows = call.rows[0] or 1
    return {n: f.groups(rows) for n, f in factors.items()} if rows > 1 else factors


def _expanded(call: _ModuleCall, grads: list[Tensor], batch: int) -> Call:
    """A call made once for the whole batch, presented to its rule as a batched one: its tensors repeated for
    every sample (a unit leading dimension replaced, else one added), with the outputs' per-sample gradients.
    Outputs the untracked capture already expanded stay as they are."""
    leaves, spec = tree_flatten((call.args, call.kwargs))
    tensors = [t for t in leaves if isinstance(t, Tensor)] + ([] if call.expanded else call.outputs)
    replace = all(_unit_leading(t) for t in tensors)

    def expand(t: Tensor) -> Tensor:
        if replace:
            return t.expand(batch, *t.shape[1:]) if _unit_leading(t) else t
        return t.unsqueeze(0).expand(batch, *t.shape)

    args, kwargs = tree_unflatten([expand(t) if isinstance(t, Tensor) else t for t in leaves], spec)
    if call.expanded:
        return Call(call.module, tuple(args), kwargs, call.outputs, grads)
    shaped = [
        g.reshape(batch, *t.shape[1:]) if replace else g for t, g in zip(call.outputs, grads, strict=True)
    ]
    return Call(call.module, tuple(args), kwargs, [expand(t) for t in call.outputs], shaped)


def _module_local(_: Rule | None, call: _ModuleCall, grads: list[Tensor], batch: int) -> dict[str, Factor]:
    """Per-sample gradients of a module's own parameters by ``torch.func`` on that module alone."""
    module = call.module
    own = {n: p.detach() for n, p in module.named_parameters(recurse=False) if n in call.local}

    leaves, spec = tree_flatten((call.args, call.kwargs))

    def piece(p: dict[str, Tensor], sample_leaves: list[Any]) -> Any:
        args, kwargs = tree_unflatten(sample_leaves, spec)
        return functional_call(module, p, tuple(args), kwargs)

    batched = [call.input_rows(t) is not None for t in leaves]
    leaves = [t.detach() if isinstance(t, Tensor) else t for t in leaves]
    output_grads = [  # outputs no gradient reached (an unused second output) contribute nothing
        (i, g, r is not None)
        for i, g, r, received in zip(call.positions, grads, call.rows, call.grads, strict=True)
        if received is not None
    ]
    if not output_grads:
        return {n: _zeros(p, batch) for n, p in own.items()}
    found = per_sample_vjp(piece, own, leaves, batched, output_grads, batch, key=type(module))
    return {n: Dense(g) for n, g in found.items()}


def _parameters_behind(forward: _Forward, w: Tensor) -> set[str]:
    state = forward.state
    name = state.parameter(w)
    if name is not None:
        return {name}
    return {n for i in state.sources_of(w) for n in _parameters_of_source(forward, i)}


def _parameters_of_source(forward: _Forward, index: int) -> set[str]:
    kind, key = forward.state.source_keys[index]
    if kind == "param":
        return {key}
    return set(forward.calls[key[0]].local.values())


def _verify(
    request: NormRequest, factors: dict[str, Factor], batch_grads: list[Tensor], x: Tensor, ll: Tensor
) -> dict[str, str]:
    """Parameters whose per-sample gradients fail the self-check against autograd, with the reason: they
    must add up to the batch gradient (a tolerance that scales with the per-sample gradients too, for
    parameters whose batch gradient cancels), and match a plain backward of the first and last sample."""
    identity = Identity()
    failed = {}
    norms = {n: f.squared_norms(n, identity, request.params[n].shape) for n, f in factors.items()}
    scale = torch.stack([v.sum() for v in norms.values()]).sum().sqrt() if norms else torch.zeros(())
    for (name, p), g in zip(request.params.items(), batch_grads, strict=True):
        if name not in factors:
            continue
        total = factors[name].total().reshape(p.shape)
        if (total - g).norm() > 1e-3 * g.norm() + 1e-4 * norms[name].sum().sqrt() + 1e-6 * scale:
            failed[name] = "per-sample gradients do not add up to the batch gradient"
    if x.shape[0] < 2:
        return failed
    for i in (0, x.shape[0] - 1):
        try:
            single = check_log_likelihood_output(request.log_likelihood(x[i : i + 1]), 1)
        except Exception as err:  # the model does not run on one sample: the sum check has to do
            log.info(
                "fimcb: %s does not run on a single sample (%s)",
                type(request.model).__name__,
                _first_line(err),
            )
            return failed
        alone, batched = float(single.detach()[0]), float(ll.detach()[i])
        if abs(alone - batched) > 1e-4 * abs(batched) + 1e-5:
            log.warning(
                "fimcb: %s's log-likelihood of sample %d differs alone (%.6g) and in a batch (%.6g): it is "
                "not deterministic in eval mode, or samples interact; per-sample gradients are ill-defined",
                type(request.model).__name__,
                i,
                alone,
                batched,
            )
            return failed
        names = [n for n in factors if n not in failed]
        if not names:
            return failed
        grads = torch.autograd.grad(single.sum(), [request.params[n] for n in names], allow_unused=True)
        row = {
            n: 0.0 if g is None else float(g.detach().pow(2).sum()) for n, g in zip(names, grads, strict=True)
        }
        largest = max(row.values(), default=0.0)
        tol = 1e-9 if ll.dtype == torch.float64 else 1e-3
        for n in names:
            got, want = float(norms[n][i].detach()), row[n]
            if abs(got - want) > tol * abs(want) + tol * 1e-2 * largest:
                failed[n] = (
                    f"per-sample gradients differ from a backward of one sample ({got:.4g} vs {want:.4g})"
                )
    return failed


def describe_routes(model: nn.Module) -> str:
    """How the hooks backend serves ``model``'s parameters (the INFO line of its first batch), or an empty
    string before it has captured the model."""
    plan = _PLANS.get(model)
    return describe(plan) if plan is not None else ""


def describe(plan: _Plan) -> str:
    """The route of each layer type (``rule: Linear(2); ...``), the parameters served outside their modules
    (``op rule: lm_bias``) and those left to a fallback, with the reason."""
    layer = {g: f"{type(m).__name__}({len(local)})" for m, local, _ in plan.owners for g in local.values()}
    by_route: dict[Route, set[str]] = defaultdict(set)
    for name, used in plan.routes.items():
        for route in used:
            if route not in (Route.FUNC, Route.LOOP):
                by_route[route].add(layer[name] if route in (Route.RULE, Route.MODULE_LOCAL) else name)
    parts = [f"{route.value}: {', '.join(sorted(by_route[route]))}" for route in Route if route in by_route]
    parts += [
        f"{next(iter(plan.routes.get(n, {Route.FUNC}))).value} for {n} ({why})"
        for n, why in plan.fallback.items()
    ]
    return "; ".join(parts)


def _op_name(func: Any) -> str:
    return getattr(func, "__name__", None) or str(func)


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0][:200]
