"""Linear layers, with or without sequence dimensions: ``∇W = Σ_t b_t a_tᵀ``, ``∇b = Σ_t b_t``."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from fimcb.engine.factors import Dense, Factor, OuterSum
from fimcb.engine.rules import Rule, register_rule


@register_rule(nn.Linear)
class LinearRule(Rule):
    def factors(
        self, module: nn.Module, inputs: tuple[Any, ...], outputs: list[Tensor], grads: list[Tensor]
    ) -> dict[str, Factor]:
        grad, a = grads[0], inputs[0]
        batch = grad.shape[0]
        positions = grad[0, ..., 0].numel()  # explicit: "-1" is ambiguous for zero input features
        b = grad.reshape(batch, positions, grad.shape[-1])
        out: dict[str, Factor] = {"weight": OuterSum(b, a.reshape(batch, positions, a.shape[-1]))}
        if module.bias is not None:
            out["bias"] = Dense(b.sum(1))
        return out
