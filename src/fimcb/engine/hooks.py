"""Hooks backend: one batched forward and one backward, then per-sample norms from captured tensors.

Forward hooks record every call of each module that owns trainable parameters; a single
``autograd.grad`` of the summed log-likelihood with respect to those calls' outputs gives the
output gradients (no weight gradients are computed at all). Modules with a rule in
:mod:`fimcb.engine.rules` turn (input, output gradient) into per-sample factors; other modules
get their own parameters' per-sample gradients from ``torch.func`` applied to that module alone.

The first time a model is seen, the per-sample gradients summed over the batch are compared with
autograd's batch gradient. If they disagree, the batch is captured again with each hooked output
copied (a later in-place operation such as ``ReLU(inplace=True)`` would otherwise overwrite the
tensor whose gradient is taken); if they still disagree, a parameter is used outside its
module's ``forward`` (which hooks cannot see) and the model is reported unsupported, so ``auto``
picks another backend.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from fimcb.core.metric import Identity
from fimcb.core.protocol import check_log_likelihood_output
from fimcb.engine.factors import Dense, Factor
from fimcb.engine.rules import RULES, Rule, rule_for
from fimcb.engine.types import NormRequest

log = logging.getLogger("fimcb")

# How each verified model is captured: False = outputs as they are; True = behind a copy, for
# models that modify a layer's output in place afterwards (``ReLU(inplace=True)``).
_VERIFIED: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()
_PLANS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], _Plan]] = weakref.WeakKeyDictionary()


class UnsupportedModelError(RuntimeError):
    """The hooks backend cannot compute this model's per-sample gradients exactly."""


@dataclass
class _Call:
    """One call of a hooked module: its inputs, the outputs that carry gradient, and their gradients."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    outputs: list[Tensor]
    positions: list[int]  # where each of ``outputs`` sits among the flattened outputs
    grads: list[Tensor | None] = field(default_factory=list)


@dataclass
class _Plan:
    """Which modules to hook and how each parameter (by global name) is owned."""

    owners: list[tuple[nn.Module, dict[str, str], Rule | None]]  # module, local -> global name, rule

    @staticmethod
    def of(model: nn.Module, params: dict[str, nn.Parameter]) -> _Plan:
        """The plan for ``model``, cached until its set of trainable parameters changes."""
        key = (len(RULES), *(id(p) for p in params.values()))  # a newly registered rule re-plans
        cached = _PLANS.get(model)
        if cached is None or cached[0] != key:
            cached = key, _Plan.build(model, params)
            _PLANS[model] = cached
        return cached[1]

    @staticmethod
    def build(model: nn.Module, params: dict[str, nn.Parameter]) -> _Plan:
        global_name = {id(p): name for name, p in params.items()}
        owners = []
        for module in model.modules():
            local = {
                n: global_name[id(p)]
                for n, p in module.named_parameters(recurse=False)
                if id(p) in global_name
            }
            if local:
                owners.append((module, local, rule_for(module)))
        return _Plan(owners)

    def describe(self) -> str:
        routes: dict[str, list[str]] = defaultdict(list)
        for module, local, rule in self.owners:
            kind = type(module).__name__
            routes["rule" if rule else "module-local torch.func"].append(f"{kind}({len(local)})")
        return "; ".join(f"{route}: {', '.join(sorted(set(kinds)))}" for route, kinds in routes.items())


@contextlib.contextmanager
def _capture(
    owners: list[tuple[nn.Module, dict[str, str], Rule | None]], copy_outputs: bool
) -> Iterator[dict[nn.Module, list[_Call]]]:
    """Record every call of the hooked modules; with ``copy_outputs`` the rest of the model gets a
    copy of each output, so in-place changes downstream leave the captured tensors intact."""
    calls: dict[nn.Module, list[_Call]] = defaultdict(list)

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        if isinstance(output, Tensor) and not copy_outputs:  # the common case, without pytree overhead
            if output.requires_grad:
                calls[module].append(_Call(args, kwargs, [output], [0]))
            return None
        flat, spec = tree_flatten(output)
        positions = [i for i, t in enumerate(flat) if isinstance(t, Tensor) and t.requires_grad]
        calls[module].append(_Call(args, kwargs, [flat[i] for i in positions], positions))
        if not copy_outputs:
            return None
        return tree_unflatten([t.clone() if i in positions else t for i, t in enumerate(flat)], spec)

    handles = [module.register_forward_hook(hook, with_kwargs=True) for module, _, _ in owners]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def hooks_layer_norms(request: NormRequest, groups: Tensor) -> tuple[Tensor, Tensor]:
    """Same contract as :func:`fimcb.engine.func.func_layer_norms`."""
    model, params = request.model, request.params
    plan = _Plan.of(model, params)
    n_groups, k = groups.shape[:2]
    x = groups.flatten(0, 1)
    if model in _VERIFIED:
        factors, ll = _capture_factors(request, plan, x, _VERIFIED[model], verify=False)
    else:  # first batch of this model: check against autograd, with copies if in-place ops spoil it
        try:
            factors, ll = _capture_factors(request, plan, x, False, verify=True)
        except _SumMismatch:
            factors, ll = _capture_factors(request, plan, x, True, verify=True)
    norms = []
    for name, p in params.items():
        factor = factors[name].groups(k) if k > 1 else factors[name]
        norms.append(factor.squared_norms(name, request.metric, p.shape))
    return torch.stack(norms, dim=1).detach(), ll.detach().reshape(n_groups, k).sum(1)


def _capture_factors(
    request: NormRequest, plan: _Plan, x: Tensor, copy_outputs: bool, verify: bool
) -> tuple[dict[str, Factor], Tensor]:
    """One forward with hooks and one backward to the captured outputs; per-sample factors."""
    with _capture(plan.owners, copy_outputs) as calls:
        ll = check_log_likelihood_output(request.log_likelihood(x), x.shape[0])
    outputs = [t for module_calls in calls.values() for c in module_calls for t in c.outputs]
    targets = outputs + (list(request.params.values()) if verify else [])
    grads = torch.autograd.grad(ll.sum(), targets, allow_unused=True)
    position = 0
    for module_calls in calls.values():
        for c in module_calls:
            c.grads = list(grads[position : position + len(c.outputs)])
            position += len(c.outputs)
    factors = _factors(plan, calls, x.shape[0])
    if verify:
        _verify(factors, request.params, grads[len(outputs) :], copy_outputs)
        _VERIFIED[request.model] = copy_outputs
        log.info("fimcb hooks engine on %s: %s", type(request.model).__name__, plan.describe())
    return factors, ll


def _factors(plan: _Plan, calls: dict[nn.Module, list[_Call]], batch: int) -> dict[str, Factor]:
    """Per-sample factors of every parameter (by global name), combined over all its uses."""
    parts: dict[str, list[Factor]] = defaultdict(list)
    for module, local, rule in plan.owners:
        for c in calls.get(module, []):
            if any(t.ndim == 0 or t.shape[0] != batch for t in c.outputs):
                raise UnsupportedModelError(
                    f"{type(module).__name__} was called on something other than the whole batch of {batch}"
                )
            if rule is not None:
                grads = [
                    torch.zeros_like(o) if g is None else g.detach()
                    for o, g in zip(c.outputs, c.grads, strict=True)
                ]
                found = rule.factors(module, c.args, c.outputs, grads)
            else:
                found = _module_local(module, local, c, batch)
            for name, factor in found.items():
                parts[local[name]].append(factor)
    missing = [name for _, local, _ in plan.owners for name in local.values() if name not in parts]
    if missing:
        raise UnsupportedModelError(f"parameters never used inside their module's forward: {missing}")
    return {name: Factor.combine(fs) for name, fs in parts.items()}


def _module_local(module: nn.Module, local: dict[str, str], call: _Call, batch: int) -> dict[str, Factor]:
    """Per-sample gradients of a module's own parameters by ``torch.func`` on that module alone."""
    own = {n: p.detach() for n, p in module.named_parameters(recurse=False) if n in local}
    grads = [
        torch.zeros_like(o) if g is None else g.detach()
        for o, g in zip(call.outputs, call.grads, strict=True)
    ]
    if any(t.shape[:1] != (batch,) for t in call.outputs):
        raise UnsupportedModelError(f"{type(module).__name__} returns a tensor without the batch dimension")
    args = tuple(a.detach() if isinstance(a, Tensor) else a for a in call.args)
    batched = tuple(0 if isinstance(a, Tensor) and a.shape[:1] == (batch,) else None for a in args)

    def contribution(
        p: dict[str, Tensor], sample_args: tuple[Any, ...], sample_grads: list[Tensor]
    ) -> Tensor:
        one = tuple(a.unsqueeze(0) if d == 0 else a for a, d in zip(sample_args, batched, strict=True))
        flat = tree_flatten(functional_call(module, p, one, call.kwargs))[0]
        return sum(
            (flat[i] * g.unsqueeze(0)).sum() for i, g in zip(call.positions, sample_grads, strict=True)
        )

    per_sample = vmap(grad(contribution), in_dims=(None, batched, 0))(own, args, grads)
    return {n: Dense(g) for n, g in per_sample.items()}


class _SumMismatch(UnsupportedModelError):
    """Per-sample gradients do not add up to autograd's batch gradient."""


def _verify(factors: dict[str, Factor], params: dict[str, nn.Parameter], grads: tuple, copied: bool) -> None:
    """Check that per-sample gradients add up to autograd's batch gradient.

    The tolerance scales with the per-sample gradients too: where they cancel (a batch gradient near
    zero), float rounding of their sum is of the order of their own size, not of the sum's; and a
    parameter whose gradient is zero in exact arithmetic (a bias cancelled by a normalisation) may
    carry rounding noise of the order of the whole model's gradients."""
    identity = Identity()
    per_sample = {n: factors[n].squared_norms(n, identity, p.shape).sum().sqrt() for n, p in params.items()}
    floor = 1e-6 * torch.stack(list(per_sample.values())).norm()
    wrong = []
    for (name, p), g in zip(params.items(), grads, strict=True):
        expected = torch.zeros_like(p) if g is None else g
        total = factors[name].total().reshape(expected.shape)
        if (total - expected).norm() > 1e-3 * expected.norm() + 1e-4 * per_sample[name] + floor:
            wrong.append(name)
    if wrong:
        raise _SumMismatch(
            f"per-sample gradients of {wrong[:5]}{'...' if len(wrong) > 5 else ''} do not add up to the "
            "batch gradient: these parameters are used outside their module's forward (hooks cannot see that)"
            + ("" if copied else ", or their module's output is modified in place")
        )
