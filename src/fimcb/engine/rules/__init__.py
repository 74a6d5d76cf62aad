"""Registry of per-layer rules: how a module's per-sample gradients follow from what one call of it saw.

A rule sees one :class:`Call` of its module: the inputs, the outputs that carry gradient and the
per-sample gradients of the summed log-likelihood with respect to them, and returns a
:class:`~fimcb.engine.factors.Factor` per parameter (by local name, as in
``module.named_parameters(recurse=False)``). The same factors serve every quantity the library
needs from a layer: plain and ghost norms, diagonal metrics, materialised gradients and the
Kronecker statistics of K-FAC (:mod:`fimcb.metrics.kfac`). A module without a rule is not hooked:
its parameters are served where they are used (op rules, the pull-back, op-local ``torch.func``);
one whose rule fails falls back to module-local ``torch.func`` (exact, slower). Rules are looked up
by exact module type, or by the qualified class name for layers of other libraries
(``"transformers.pytorch_utils.Conv1D"``), so that registering them imports nothing; a subclass may
change ``forward``, so it needs its own rule.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch.nn.functional as F
from torch import Tensor, nn

from fimcb.core.registry import register
from fimcb.engine.factors import Factor


@dataclass(frozen=True)
class Call:
    """One call of a module as its rule sees it.

    Attributes:
        module: the module that was called.
        args, kwargs: what it was called with (for a module called once for the whole batch, the
            tensors are expanded to the batch, so that every call a rule sees is a batched one).
        outputs: the outputs that carry gradient, in the order of the flattened output.
        grads: ``d(Σ log-likelihood)/d(output)``, shaped like ``outputs``: row b holds sample b's own
            gradient (samples are independent), zeros for an output the log-likelihood ignores.
    """

    module: Any  # a module of the rule's type, whose own attributes the rule reads
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    outputs: list[Tensor]
    grads: list[Tensor]


class Rule(ABC):
    """Per-sample gradients of one module type's own parameters from a captured call."""

    #: Whether :meth:`factors` reads ``call.outputs``' values. A rule that does not should say so: the
    #: capture then need not hold the layer's outputs (memory), and presents zero-stride stand-ins of
    #: the same shape.
    reads_outputs: ClassVar[bool] = True

    def supports(self, module: Any) -> bool:
        """Whether this configuration of the module (one of the registered types) is covered; otherwise
        the module is treated as one without a rule."""
        return True

    @abstractmethod
    def factors(self, call: Call) -> dict[str, Factor]:
        """Per-sample gradient factors of the module's parameters for one call (rows = samples)."""


ModuleKey = type[nn.Module] | str
RULES: dict[ModuleKey, Rule] = {}
_VERSION = [0]  # bumped by every registration, so that cached plans are rebuilt
R = TypeVar("R", bound=type[Rule])
U = TypeVar("U", bound=type["Unrolled"])
T = TypeVar("T")


def qualified_name(module_type: type) -> str:
    """``package.module.Class``: how rules for other libraries' layers are registered."""
    return f"{module_type.__module__}.{module_type.__qualname__}"


def _registering(
    registry: dict[ModuleKey, Any], what: str, module_types: tuple[ModuleKey, ...], overwrite: bool
) -> Any:
    """The class decorator of ``register_rule`` and ``register_unrolled``: registers an instance of the
    class under every key (refusing a silent overwrite) and invalidates cached plans."""

    def decorate(cls: Any) -> Any:
        register(registry, cls(), *module_types, what=what, overwrite=overwrite)
        _VERSION[0] += 1
        return cls

    return decorate


def _lookup(registry: dict[ModuleKey, Any], module: nn.Module) -> Any:
    """The entry for ``module``'s exact type, or for its qualified class name; ``None`` if neither."""
    return registry.get(type(module)) or registry.get(qualified_name(type(module)))


def register_rule(*module_types: ModuleKey, overwrite: bool = False) -> Callable[[R], R]:
    """Class decorator: use this rule for modules of exactly these types (or qualified class names).

    Refuses to replace a rule registered for the same type unless ``overwrite=True``.
    """
    return _registering(RULES, "a rule for", module_types, overwrite)


class Parts:
    """What an unrolled forward computes its linear maps by: ``y = x Wᵀ + b`` with the module's own
    parameters, by local names. Outside a capture it is just that map. Inside one, the capture gathers
    every call of a map on per-sample rows (each time step's) into one part, served by the linear rule
    as one outer-product factor over the calls, with no batch tracker; a call on anything else (an
    unbatched input) is left to the tracker, like a parameter used in plain torch code."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def linear(self, x: Tensor, weight: str, bias: str | None = None) -> Tensor:
        """``x Wᵀ + b`` for the module's parameters named ``weight`` and ``bias`` (``None``: no bias)."""
        return F.linear(x, getattr(self.module, weight), None if bias is None else getattr(self.module, bias))

    def gathers(self, x: Tensor) -> bool:
        """Whether maps of ``x`` are gathered into parts (its rows are the samples'): only then may a forward
        use :meth:`fused` and :meth:`linear_into`."""
        return True

    def fused(self, run: Callable[[], T], names: Sequence[str | None]) -> T:
        """``run()``: a fused kernel using the module's parameters ``names``, whose gradients come from the
        parts the forward records by :meth:`linear_into` (the tracker leaves them alone)."""
        return run()

    def linear_into(self, x: Tensor, output: Tensor, weight: str, bias: str | None = None) -> None:
        """Record a map ``x Wᵀ + b`` that a fused kernel added into ``output`` (same shape but for the last
        dimension): its output gradient is ``output``'s. Outside a capture, nothing to record."""


class Unrolled(ABC):
    """A module's forward written in torch operations the engine has rules for, used in its place while
    a batch is captured: for a layer whose fused kernel neither a rule nor ``vmap`` can see into (an
    RNN). Its linear maps go through :class:`Parts`, which serves their parameters; any other use of a
    parameter is served by op rules like one in plain torch code. The forward must compute what the
    module's own does (equal up to rounding) for every input."""

    @abstractmethod
    def forward(self, parts: Parts, *args: Any, **kwargs: Any) -> Any:
        """The output of ``parts.module`` for these arguments."""


UNROLLED: dict[ModuleKey, Unrolled] = {}


def register_unrolled(*module_types: ModuleKey, overwrite: bool = False) -> Callable[[U], U]:
    """Class decorator: capture modules of exactly these types through this unrolled forward.

    Refuses to replace one registered for the same type unless ``overwrite=True``.
    """
    return _registering(UNROLLED, "an unrolled forward for", module_types, overwrite)


def unrolled_for(module: nn.Module) -> Unrolled | None:
    """The unrolled forward of ``module``'s type, or ``None``."""
    return _lookup(UNROLLED, module)


def rule_for(module: nn.Module) -> Rule | None:
    """The rule covering ``module``, or ``None``."""
    rule = _lookup(RULES, module)
    return rule if rule is not None and rule.supports(module) else None


def rule_version() -> int:
    """Changes whenever a rule is registered, so that cached plans are rebuilt."""
    return _VERSION[0]


# Importing the rule modules fills the registry (the third-party ones import nothing of their library).
from fimcb.engine.rules import (  # noqa: E402, F401
    attention,
    conv,
    embedding,
    linear,
    norm,
    recurrent,
    thirdparty,
)

__all__ = [
    "RULES",
    "UNROLLED",
    "Call",
    "Parts",
    "Rule",
    "Unrolled",
    "qualified_name",
    "register_rule",
    "register_unrolled",
    "rule_for",
    "unrolled_for",
]
