"""Registry of per-layer rules: how a module's per-sample gradients follow from its activations.

A rule sees one call of its module: the inputs, the outputs that carry gradient and the
gradients of the summed log-likelihood with respect to them, and returns a
:class:`~fimcb.engine.factors.Factor` per parameter (by local name, as in
``module.named_parameters(recurse=False)``). Rules are looked up by exact module type (a subclass
may change ``forward``); modules without a rule fall back to module-local ``torch.func``. Extend
it with :func:`register_rule`, as :mod:`fimcb.models.glow` does for its own layers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, TypeVar

from torch import Tensor, nn

from fimcb.engine.factors import Factor


class Rule(ABC):
    """Per-sample gradients of one module type's own parameters from captured tensors."""

    def supports(self, module: nn.Module) -> bool:
        """Whether this configuration of the module is covered (otherwise: module-local fallback)."""
        return True

    @abstractmethod
    def factors(
        self, module: nn.Module, inputs: tuple[Any, ...], output: Tensor, grad: Tensor
    ) -> dict[str, Factor]:
        """Per-sample gradient factors of the module's parameters for one call (rows = samples)."""


RULES: dict[type[nn.Module], Rule] = {}
R = TypeVar("R", bound=type[Rule])


def register_rule(*module_types: type[nn.Module]) -> Callable[[R], R]:
    """Class decorator: use this rule for modules of exactly these types."""

    def decorate(rule: R) -> R:
        for module_type in module_types:
            RULES[module_type] = rule()
        return rule

    return decorate


def rule_for(module: nn.Module) -> Rule | None:
    """The rule covering ``module``, or ``None``."""
    rule = RULES.get(type(module))
    return rule if rule is not None and rule.supports(module) else None


# Importing the rule modules fills the registry.
from fimcb.engine.rules import conv, embedding, linear, norm  # noqa: E402, F401

__all__ = ["RULES", "Rule", "register_rule", "rule_for"]
