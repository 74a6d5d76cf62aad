"""Linear layers, with or without sequence dimensions: ``∇W = Σ_t b_t a_tᵀ``, ``∇b = Σ_t b_t``."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from fimcb.engine.factors import BiasSum, Factor, OuterSum
from fimcb.engine.rules import Call, Rule, register_rule


def linear_factors(inputs: Tensor, grad: Tensor, weight: str | None, bias: str | None) -> dict[str, Factor]:
    """Factors of ``y = x Wᵀ + b`` from the input ``x`` ``[B, ..., in]`` and ``dy`` ``[B, ..., out]`` (the
    names under which to return the weight's and the bias's, ``None`` for one the caller does not want)."""
    batch = grad.shape[0]
    positions = grad[0, ..., 0].numel()  # explicit: "-1" is ambiguous for zero input features
    b = grad.reshape(batch, positions, grad.shape[-1])
    out: dict[str, Factor] = {}
    if weight is not None:
        out[weight] = OuterSum(b, inputs.reshape(batch, positions, inputs.shape[-1]))
    if bias is not None:
        out[bias] = BiasSum(b)
    return out


@register_rule(nn.Linear, NonDynamicallyQuantizableLinear)  # the latter: attention's output projection
class LinearRule(Rule):
    reads_outputs = False

    def factors(self, call: Call) -> dict[str, Factor]:
        module = call.module
        return linear_factors(
            call.args[0], call.grads[0], "weight", "bias" if module.bias is not None else None
        )


class LinearPartsRule(Rule):
    """The rule of an unrolled forward's linear maps (:class:`~fimcb.engine.rules.Parts`): one map's calls
    gathered into one, its inputs concatenated over the calls' positions (``call.args[0]``
    ``[B, positions, in]``), one output per call, the names in ``call.kwargs``. Not registered for a
    module type: the capture gives it the calls it gathers."""

    reads_outputs = False

    def factors(self, call: Call) -> dict[str, Factor]:
        batch = call.grads[0].shape[0]
        grad = torch.cat([g.reshape(batch, -1, g.shape[-1]) for g in call.grads], 1)
        return linear_factors(call.args[0], grad, call.kwargs["weight"], call.kwargs["bias"])
