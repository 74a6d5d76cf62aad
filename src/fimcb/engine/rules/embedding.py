"""Embeddings: the gradient of row r sums the output gradients of the positions that looked up r."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from fimcb.engine.factors import Factor, IndexSum
from fimcb.engine.rules import Rule, register_rule


@register_rule(nn.Embedding)
class EmbeddingRule(Rule):
    def supports(self, module: nn.Module) -> bool:
        return module.max_norm is None and not module.scale_grad_by_freq

    def factors(
        self, module: nn.Module, inputs: tuple[Any, ...], outputs: list[Tensor], grads: list[Tensor]
    ) -> dict[str, Factor]:
        grad = grads[0]
        batch = grad.shape[0]
        index = inputs[0].reshape(batch, -1)
        v = grad.reshape(batch, -1, grad.shape[-1])
        if module.padding_idx is not None:  # PyTorch gives the padding row no gradient
            v = v * (index != module.padding_idx).unsqueeze(-1).to(v.dtype)
        return {"weight": IndexSum(index, v, module.num_embeddings)}
