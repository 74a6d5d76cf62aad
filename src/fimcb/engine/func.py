"""``torch.func`` backend: ``vmap(grad)`` over groups of samples, in chunks that bound memory."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from fimcb.core.protocol import LogLikelihoodFn, check_log_likelihood_output
from fimcb.engine.types import NormRequest


class _Bound(nn.Module):
    """Makes ``log_likelihood`` the forward of a module that owns ``model``, for ``functional_call``."""

    def __init__(self, model: nn.Module, log_likelihood: LogLikelihoodFn) -> None:
        super().__init__()
        self.model = model
        self._log_likelihood = log_likelihood

    def forward(self, x: Tensor) -> Tensor:
        return self._log_likelihood(x)


def group_gradients(request: NormRequest, groups: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """Per-group gradients ``{name: [G, *shape]}`` and summed log-likelihoods ``[G]`` for ``groups``
    ``[G, k, ...]``, taken with respect to detached copies of the parameters, so the model's own
    ``.grad`` fields are never touched."""
    bound = _Bound(request.model, request.log_likelihood)
    detached = {f"model.{name}": p.detach() for name, p in request.params.items()}

    def group_log_likelihood(p: dict[str, Tensor], xg: Tensor) -> tuple[Tensor, Tensor]:
        ll = check_log_likelihood_output(functional_call(bound, p, (xg,)), xg.shape[0])
        total = ll.sum()
        return total, total

    grads, ll = vmap(grad(group_log_likelihood, has_aux=True), in_dims=(None, 0))(detached, groups)
    return {n: grads[f"model.{n}"] for n in request.params}, ll.detach()


def func_layer_norms(request: NormRequest, groups: Tensor) -> tuple[Tensor, Tensor]:
    """Per-group squared norms ``[G, L]`` and summed log-likelihoods ``[G]`` of ``groups`` ``[G, k, ...]``."""
    grads, ll = group_gradients(request, groups)
    norms = [request.metric.squared_norms(n, grads[n]) for n in request.params]
    return torch.stack(norms, dim=1), ll
