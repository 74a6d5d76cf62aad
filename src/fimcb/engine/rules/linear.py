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
        grad = grads[0]
        batch = grad.shape[0]
        b = grad.reshape(batch, -1, grad.shape[-1])
        out: dict[str, Factor] = {"weight": OuterSum(b, inputs[0].reshape(batch, -1, inputs[0].shape[-1]))}
        if module.bias is not None:
            out["bias"] = Dense(b.sum(1))
        return out
