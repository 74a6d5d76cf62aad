"""Loop backend: one ``autograd.grad`` call per group. Slow, but works for any differentiable model."""

from __future__ import annotations

import torch
from torch import Tensor

from fimcb.core.protocol import check_log_likelihood_output
from fimcb.engine.types import NormRequest


def loop_layer_norms(request: NormRequest, groups: Tensor) -> tuple[Tensor, Tensor]:
    """Same contract as :func:`fimcb.engine.func.func_layer_norms`, one group at a time."""
    names, tensors = list(request.params), list(request.params.values())
    rows, lls = [], []
    for xg in groups:
        total = check_log_likelihood_output(request.log_likelihood(xg), xg.shape[0]).sum()
        found = torch.autograd.grad(total, tensors, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(tensors, found, strict=True)]
        norms = [request.metric.squared_norms(n, g.unsqueeze(0)) for n, g in zip(names, grads, strict=True)]
        rows.append(torch.stack(norms, dim=1))
        lls.append(total.detach().reshape(1))
    return torch.cat(rows), torch.cat(lls)
