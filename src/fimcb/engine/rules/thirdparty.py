"""Rules for layers of the field's libraries, registered by qualified class name so that fimcb imports
none of them: Hugging Face transformers (GPT-2's ``Conv1D``, Llama-style RMS norms) and zuko (the
masked linear layers of MAF and NSF, the linear layers of its coupling flows' hyper-networks).
diffusers' ``UNet2DModel`` is built from torch layers (Conv2d, Linear, GroupNorm; its attention holds
no parameters of its own) and needs no rule here."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fimcb.engine.factors import BiasSum, Dense, Factor, Masked, OuterSum
from fimcb.engine.rules import Call, Rule, register_rule
from fimcb.engine.rules.linear import LinearRule, linear_factors


@register_rule("transformers.pytorch_utils.Conv1D")
class HFConv1DRule(Rule):
    """``y = x W + b`` with ``W`` ``[in, out]`` (GPT-2's transposed linear layer): ``∇W = Σ_t a_t g_tᵀ``."""

    reads_outputs = False

    def factors(self, call: Call) -> dict[str, Factor]:
        x, grad = call.args[0], call.grads[0]
        batch = grad.shape[0]
        g = grad.reshape(batch, -1, grad.shape[-1])
        out: dict[str, Factor] = {
            "weight": OuterSum(x.reshape(batch, g.shape[1], x.shape[-1]), g, input_side="u")
        }
        if getattr(call.module, "bias", None) is not None:
            out["bias"] = BiasSum(g)
        return out


@register_rule("zuko.nn.Linear")
class ZukoLinearRule(LinearRule):
    """zuko's own linear layer (the hyper-networks of its coupling flows): ``nn.Linear``'s map unless it
    holds a stack of operators (a 3-d weight), which is left to the op rules."""

    def supports(self, module: Any) -> bool:
        return module.weight.ndim == 2


@register_rule("zuko.nn.MaskedLinear")
class MaskedLinearRule(Rule):
    """``y = x (W ⊙ M)ᵀ + b``: the linear layer's factors, the weight's masked by the adjacency ``M``."""

    reads_outputs = False

    def factors(self, call: Call) -> dict[str, Factor]:
        module = call.module
        out = linear_factors(
            call.args[0], call.grads[0], "weight", "bias" if module.bias is not None else None
        )
        out["weight"] = Masked(out["weight"], module.mask)
        return out


def _rms_factors(module: Any, x: Tensor, grad: Tensor, eps: float, dtype: torch.dtype) -> dict[str, Factor]:
    """``y = w ⊙ x / rms(x)`` over the last dimensions, the statistics computed in ``dtype`` as the layer
    does: ``∇w = Σ x̂ ⊙ g`` over the other positions."""
    weight = module.weight
    dims = tuple(range(x.ndim - weight.ndim, x.ndim))
    xf = x.to(dtype)
    x_hat = xf * torch.rsqrt(xf.pow(2).mean(dims, keepdim=True) + eps)
    reduce = tuple(range(1, x.ndim - weight.ndim))
    product = x_hat.to(x.dtype) * grad
    return {"weight": Dense(product.sum(reduce) if reduce else product)}


@register_rule(nn.RMSNorm)
class RMSNormRule(Rule):
    reads_outputs = False

    def supports(self, module: Any) -> bool:
        return module.weight is not None

    def factors(self, call: Call) -> dict[str, Factor]:
        module, x = call.module, call.args[0]
        eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
        return _rms_factors(module, x, call.grads[0], eps, x.dtype)


@register_rule("transformers.models.llama.modeling_llama.LlamaRMSNorm")
class LlamaRMSNormRule(Rule):
    reads_outputs = False

    def factors(self, call: Call) -> dict[str, Factor]:
        module = call.module  # statistics in float32 whatever the input's dtype, as the layer computes them
        return _rms_factors(module, call.args[0], call.grads[0], module.variance_epsilon, torch.float32)
