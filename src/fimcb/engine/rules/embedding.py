"""Embeddings: the gradient of row r sums the output gradients of the positions that looked up r."""

from __future__ import annotations

from torch import Tensor, nn

from fimcb.engine.factors import IndexSum
from fimcb.engine.rules import Call, Rule, register_rule


def embedding_factor(index: Tensor, grad: Tensor, num_rows: int, padding_idx: int | None) -> IndexSum:
    """The factor of an embedding table ``[num_rows, d]`` looked up at ``index`` ``[B, ...]`` with output
    gradient ``grad`` ``[B, ..., d]``; PyTorch gives the padding row no gradient."""
    batch = grad.shape[0]
    index = index.reshape(batch, -1)
    v = grad.reshape(batch, -1, grad.shape[-1])
    if padding_idx is not None:
        v = v * (index != padding_idx).unsqueeze(-1).to(v.dtype)
    return IndexSum(index, v, num_rows)


@register_rule(nn.Embedding)
class EmbeddingRule(Rule):
    reads_outputs = False

    def supports(self, module: nn.Module) -> bool:
        return module.max_norm is None and not module.scale_grad_by_freq

    def factors(self, call: Call) -> dict[str, IndexSum]:  # type: ignore[override]
        module = call.module
        return {
            "weight": embedding_factor(call.args[0], call.grads[0], module.num_embeddings, module.padding_idx)
        }
