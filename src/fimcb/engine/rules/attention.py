"""``nn.MultiheadAttention`` (and with it ``nn.Transformer*Layer``) unrolled for the capture.

Its own forward uses the packed input projection and the output projection's weight inside
``F.multi_head_attention_forward``, outside any module call and with the sequence first: hooks see no
layer there, and the tracker's op rules cannot split its rows by sample. Unrolled, the input
projection is one map of each distinct input through :class:`~fimcb.engine.rules.Parts` (a
cross-attention's query projects through the whole packed weight and keeps its third: exact, the other
rows get zero gradient) and the output projection is a call of the ``out_proj`` layer, served by the
linear rule. The attention itself holds no parameters. Separate query, key and value weights
(``kdim``/``vdim``), ``add_bias_kv``, ``add_zero_attn`` and dropout in training mode run the module's
own forward (its parameters take the fallback).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fimcb.engine.rules import Parts, Unrolled, register_unrolled


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (``True``: not attended) as ``-inf`` where set, a float mask as it is."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


def _merged_mask(
    attn_mask: Tensor | None, key_padding_mask: Tensor | None, batch: int, heads: int, dtype: torch.dtype
) -> Tensor | None:
    """The attention and key-padding masks as one additive mask broadcasting to ``[B, heads, L, S]``."""
    mask = _additive(attn_mask, dtype)
    if mask is not None and mask.dim() == 3:  # [B·heads, L, S]
        mask = mask.reshape(batch, heads, *mask.shape[1:])
    padding = _additive(key_padding_mask, dtype)
    if padding is not None:
        padding = padding.reshape(batch, 1, 1, padding.shape[-1])
        mask = padding if mask is None else mask + padding
    return mask


@register_unrolled(nn.MultiheadAttention)
class UnrolledMultiheadAttention(Unrolled):
    def forward(
        self,
        parts: Parts,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> Any:
        mha: nn.MultiheadAttention = parts.module  # type: ignore[assignment]
        if (
            not mha._qkv_same_embed_dim
            or mha.bias_k is not None
            or mha.add_zero_attn
            or (mha.training and mha.dropout > 0)
        ):
            return nn.MultiheadAttention.forward(
                mha,
                query,
                key,
                value,
                key_padding_mask,
                need_weights,
                attn_mask,
                average_attn_weights,
                is_causal,
            )
        if is_causal and attn_mask is None:  # as the module's own forward: the flag is only a hint
            raise RuntimeError("Need attn_mask if specifying the is_causal hint")
        unbatched = query.dim() == 2

        def batch_first(t: Tensor) -> Tensor:
            return t.unsqueeze(0) if unbatched else (t if mha.batch_first else t.transpose(0, 1))

        embed, heads = mha.embed_dim, mha.num_heads
        bias = "in_proj_bias" if mha.in_proj_bias is not None else None
        projected: dict[int, Tensor] = {}

        def project(t: Tensor, third: int) -> Tensor:
            """``t``'s map through the packed weight (once per distinct input), its ``third``-th third."""
            if id(t) not in projected:
                projected[id(t)] = parts.linear(batch_first(t), "in_proj_weight", bias)
            return projected[id(t)][..., third * embed : (third + 1) * embed]

        q, k, v = project(query, 0), project(key, 1), project(value, 2)
        batch, length, source = q.shape[0], q.shape[1], k.shape[1]
        head_dim = embed // heads
        q = q.reshape(batch, length, heads, head_dim).transpose(1, 2)
        k = k.reshape(batch, source, heads, head_dim).transpose(1, 2)
        v = v.reshape(batch, source, heads, head_dim).transpose(1, 2)
        padding = key_padding_mask  # [B, S] whatever the layout, [S] unbatched
        if padding is not None and unbatched:
            padding = padding.unsqueeze(0)
        mask = _merged_mask(attn_mask, padding, batch, heads, q.dtype)
        weights: Tensor | None = None
        if need_weights:
            scores = (q * math.sqrt(1.0 / head_dim)) @ k.transpose(-2, -1)
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            attended = weights @ v
            if average_attn_weights:
                weights = weights.mean(1)
        else:
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = mha.out_proj(attended.transpose(1, 2).reshape(batch, length, embed))
        if unbatched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return (out if mha.batch_first else out.transpose(0, 1)), weights
