"""Op rules: per-sample gradients of *weight-like* operands (parameters, or tensors computed from
parameters alone) where a torch function combines them with batched data outside any module.

They serve parameters used outside their module's forward (a learned scale in the likelihood, an
output bias, ``h @ emb.weight.T``, a raw position-embedding parameter) and the outputs of modules
called once for the whole batch. A rule either rearranges the call so that the backward delivers
the operand's gradient per sample (broadcasting ops: the operand is expanded along the batch
dimension, a view that changes no value) or turns the output's per-sample gradient into a factor
(``linear``, ``matmul``, ``embedding``). Every other function gets op-local ``torch.func``
(:mod:`fimcb.engine.local`). Register more with :func:`register_op_rule`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from fimcb.core.registry import register
from fimcb.engine.factors import Dense, Factor, OuterSum
from fimcb.engine.local import per_sample_vjp
from fimcb.engine.rules.embedding import embedding_factor
from fimcb.engine.rules.linear import linear_factors


@dataclass
class OpCall:
    """One torch function where batched data met weight-like operands.

    Attributes:
        func: the function; ``leaves``/``spec`` its flattened ``(args, kwargs)``.
        weights: the weight-like operands, by position in ``leaves``.
        batched: rows per sample of each batched operand, by position in ``leaves``.
        batch: the number of samples B.
        targets: tensors whose per-sample gradients the batched backward must deliver (set by the rule).
    """

    func: Callable[..., Any]
    leaves: list[Any]
    spec: TreeSpec
    weights: dict[int, Tensor]
    batched: dict[int, int]
    batch: int
    targets: list[Tensor] = field(default_factory=list)
    state: Any = None

    def call(self, leaves: list[Any] | None = None) -> Any:
        args, kwargs = tree_unflatten(self.leaves if leaves is None else leaves, self.spec)
        return self.func(*args, **kwargs)

    def argument(self, index: int, name: str) -> Any:
        """The ``index``-th positional argument or the keyword ``name`` (``None`` when absent)."""
        args, kwargs = tree_unflatten(self.leaves, self.spec)
        return args[index] if len(args) > index else kwargs.get(name)

    def position(self, tensor: Any) -> int | None:
        """Where ``tensor`` sits among the leaves (by identity)."""
        return (
            next((i for i, leaf in enumerate(self.leaves) if leaf is tensor), None)
            if tensor is not None
            else None
        )

    def is_batched(self, tensor: Any) -> bool:
        position = self.position(tensor)
        return position is not None and position in self.batched


class OpRule(ABC):
    """Per-sample gradients of one torch function's weight-like operands."""

    def applies(self, op: OpCall) -> bool:
        """Whether this call is covered (otherwise op-local ``torch.func``)."""
        return True

    def run(self, op: OpCall) -> Any:
        """Call the function and set ``op.targets``; by default its output is the one target."""
        out = op.call()
        op.targets = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor) and t.requires_grad]
        return out

    @abstractmethod
    def factors(self, op: OpCall, grads: list[Tensor]) -> dict[int, Factor]:
        """Per-sample factors of the weight-like operands (by position), given the targets' gradients."""


OP_RULES: dict[Callable[..., Any], OpRule] = {}
R = TypeVar("R", bound=type[OpRule])


def register_op_rule(*funcs: Callable[..., Any], overwrite: bool = False) -> Callable[[R], R]:
    """Class decorator: use this rule for calls of these torch functions (as ``TorchFunctionMode`` sees
    them: ``torch.add``, ``torch.Tensor.add``, ``F.linear``...); refuses to replace one unless
    ``overwrite``."""

    def decorate(rule: R) -> R:
        register(OP_RULES, rule(), *funcs, what="an op rule for", overwrite=overwrite)
        return rule

    return decorate


def _functions(names: list[str], *namespaces: Any) -> list[Callable[..., Any]]:
    return [getattr(ns, name) for name in names for ns in namespaces if hasattr(ns, name)]


_BROADCASTING = _functions(
    [
        "add", "sub", "subtract", "rsub", "mul", "multiply", "div", "divide", "true_divide", "pow",
        "maximum", "minimum", "atan2", "where", "addcmul", "addcdiv", "lerp", "hypot", "remainder",
        "fmod", "copysign", "xlogy", "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__",
        "__isub__", "__mul__", "__rmul__", "__imul__", "__truediv__", "__rtruediv__", "__itruediv__",
        "__pow__", "__rpow__", "add_", "sub_", "mul_", "div_",
    ],
    torch,
    torch.Tensor,
)  # fmt: skip
_IN_PLACE = {
    f for f in _BROADCASTING if getattr(f, "__name__", "").endswith("_") and not f.__name__.endswith("__")
}
_IN_PLACE |= {f for f in _BROADCASTING if getattr(f, "__name__", "").startswith("__i")}


@register_op_rule(*_BROADCASTING)
class BroadcastingRule(OpRule):
    """Elementwise functions with broadcasting: each weight-like operand that broadcasts along the
    batch dimension is expanded to it (a view, same values), so that its gradient, summed by the
    function's own backward over everything but the batch, arrives per sample."""

    def applies(self, op: OpCall) -> bool:
        shape = _broadcast_shape(op)
        if shape is None or not shape or shape[0] % op.batch:
            return False
        if op.func in _IN_PLACE and 0 in op.weights:
            return False  # a weight-like tensor modified in place by batched data: not a parameter use
        return all(w.ndim < len(shape) or w.shape[0] == 1 for w in op.weights.values())

    def run(self, op: OpCall) -> Any:
        shape = _broadcast_shape(op)
        assert shape is not None
        op.state = None
        leaves = list(op.leaves)
        for position, w in op.weights.items():
            padded = (1,) * (len(shape) - w.ndim) + tuple(w.shape)
            leaves[position] = w.reshape(padded).expand(shape[0], *padded[1:])
            op.targets.append(leaves[position])
        return op.call(leaves)

    def factors(self, op: OpCall, grads: list[Tensor]) -> dict[int, Factor]:
        out: dict[int, Factor] = {}
        for (position, w), g in zip(op.weights.items(), grads, strict=True):
            per_sample = g.reshape(op.batch, g.shape[0] // op.batch, *g.shape[1:]).sum(1)
            out[position] = Dense(per_sample.reshape(op.batch, *w.shape))
        return out


def _broadcast_shape(op: OpCall) -> tuple[int, ...] | None:
    """The shape the tensor operands broadcast to (``None`` where they do not), computed once per call."""
    if op.state is None:
        shapes = [tuple(leaf.shape) for leaf in op.leaves if isinstance(leaf, Tensor)]
        size = max(map(len, shapes), default=0)
        out: list[int] = []
        for dim in range(-size, 0):
            sizes = {s[dim] for s in shapes if len(s) >= -dim} - {1}
            if len(sizes) > 1:
                op.state = ()
                return None
            out.append(sizes.pop() if sizes else 1)
        op.state = tuple(out)
    return op.state or None


@register_op_rule(torch.Tensor.expand, torch.Tensor.expand_as, torch.broadcast_to, torch.Tensor.broadcast_to)
class ToBatchRule(OpRule):
    """A weight-like tensor expanded to the batch (a learned initial state, a class token):
    ``cls.expand(B, -1, -1)``. The expanded tensor is the target; its rows are the samples' own."""

    def factors(self, op: OpCall, grads: list[Tensor]) -> dict[int, Factor]:
        ((position, w),) = op.weights.items()
        g = grads[0]
        padded = (1,) * (g.ndim - w.ndim) + tuple(w.shape)
        summed = [d for d in range(1, g.ndim) if padded[d] == 1 and g.shape[d] != 1]
        per_sample = g.sum(summed, keepdim=True) if summed else g
        return {position: Dense(per_sample.reshape(op.batch, *w.shape))}


@register_op_rule(F.linear)
class LinearOpRule(OpRule):
    """``F.linear(x, W, b)`` with batched ``x``: the factors of a linear layer."""

    def applies(self, op: OpCall) -> bool:
        return op.is_batched(op.argument(0, "input")) and 0 not in op.weights

    def factors(self, op: OpCall, grads: list[Tensor]) -> dict[int, Factor]:
        x, weight, bias = op.argument(0, "input"), op.argument(1, "weight"), op.argument(2, "bias")
        b = grads[0].reshape(op.batch, -1, grads[0].shape[-1])
        wanted = {op.position(t): t for t in (weight, bias) if op.position(t) in op.weights}
        found = linear_factors(
            x.reshape(op.batch, -1, x.shape[-1]),
            b,
            "weight" if op.position(weight) in wanted else None,
            "bias" if bias is not None and op.position(bias) in wanted else None,
        )
        return {op.position(weight if role == "weight" else bias): f for role, f in found.items()}  # type: ignore[misc]


@register_op_rule(torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm)
class MatmulOpRule(OpRule):
    """``a @ W`` (batched ``a`` of two or more dimensions, ``W`` a weight-like matrix or vector) and
    ``W @ b`` (batched ``b`` of three or more dimensions): outer-product factors over positions."""

    def applies(self, op: OpCall) -> bool:
        a, b = op.leaves[0], op.leaves[1]
        if set(op.weights) == {1}:
            return op.is_batched(a) and a.ndim >= 2 and b.ndim in (1, 2)
        if set(op.weights) == {0}:
            return op.is_batched(b) and b.ndim >= 3 and a.ndim == 2
        return False

    def factors(self, op: OpCall, grads: list[Tensor]) -> dict[int, Factor]:
        a, b, g, batch = op.leaves[0], op.leaves[1], grads[0], op.batch
        if 1 in op.weights:
            rows = a.reshape(batch, -1, a.shape[-1])
            if b.ndim == 1:
                return {1: Dense(torch.einsum("bpd,bp->bd", rows, g.reshape(batch, -1)))}
            return {1: OuterSum(rows, g.reshape(batch, -1, g.shape[-1]), input_side="u")}
        gt = g.transpose(-1, -2).reshape(batch, -1, g.shape[-2])
        return {0: OuterSum(gt, b.transpose(-1, -2).reshape(batch, -1, b.shape[-2]))}


@register_op_rule(F.embedding)
class EmbeddingOpRule(OpRule):
    """``F.embedding(idx, W)`` with batched indices: the factor of an embedding table."""

    def applies(self, op: OpCall) -> bool:
        return (
            op.is_batched(op.argument(0, "input"))
            and set(op.weights) == {op.position(op.argument(1, "weight"))}
            and op.argument(3, "max_norm") is None
            and not op.argument(5, "scale_grad_by_freq")
        )

    def factors(self, op: OpCall, grads: list[Tensor]) -> dict[int, Factor]:
        index, weight = op.argument(0, "input"), op.argument(1, "weight")
        padding = op.argument(2, "padding_idx")
        if padding is not None and padding < 0:
            padding += weight.shape[0]
        grad = grads[0].reshape(op.batch, -1, grads[0].shape[-1])
        return {op.position(weight): embedding_factor(index, grad, weight.shape[0], padding)}  # type: ignore[dict-item]


class LocalOpRule(OpRule):
    """Any other function: op-local ``torch.func``, one sample's rows at a time."""

    def factors(self, op: OpCall, grads: list[Tensor]) -> dict[int, Factor]:
        positions = list(op.weights)
        outputs = [i for i, t in enumerate(tree_flatten(op.state)[0]) if any(t is s for s in op.targets)]

        def piece(weights: dict[str, Tensor], leaves: list[Any]) -> Any:
            filled = list(leaves)
            for position in positions:
                filled[position] = weights[str(position)]
            return op.call(filled)

        batched = [i in op.batched for i in range(len(op.leaves))]
        found = per_sample_vjp(
            piece,
            {str(p): op.weights[p].detach() for p in positions},
            [leaf.detach() if isinstance(leaf, Tensor) else leaf for leaf in op.leaves],
            batched,
            [(position, g, True) for position, g in zip(outputs, grads, strict=True)],
            op.batch,
            key=op.func,
        )
        return {p: Dense(found[str(p)]) for p in positions}

    def run(self, op: OpCall) -> Any:
        out = super().run(op)
        op.state = out
        return out


LOCAL_OP_RULE = LocalOpRule()


def op_rule_for(op: OpCall) -> OpRule:
    """The registered rule for ``op`` if it applies, else op-local ``torch.func``."""
    rule = OP_RULES.get(op.func)
    return rule if rule is not None and rule.applies(op) else LOCAL_OP_RULE


__all__ = ["OP_RULES", "OpCall", "OpRule", "op_rule_for", "register_op_rule"]
