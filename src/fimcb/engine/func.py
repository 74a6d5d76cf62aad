"""``torch.func`` backend: ``vmap(grad)`` over groups of samples, in chunks that bound memory.

Also the fallback of the hooks backend for the parameters no route of it can serve
(:func:`subset_gradients`): the same, for those parameters alone, then a per-sample loop where
``vmap`` cannot run the model.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from fimcb.core.protocol import LogLikelihoodFn, check_log_likelihood_output
from fimcb.engine.local import VMAP_ERRORS
from fimcb.engine.types import NormRequest

log = logging.getLogger("fimcb")

# Memory per chunk of groups that per-sample gradients may take (grads + workspace).
DEFAULT_MEMORY_BUDGET = 1 << 30
MAX_CHUNK = 128


def default_chunk_size(params: dict[str, nn.Parameter]) -> int:
    """Groups per vmap call such that per-group gradients stay within ``DEFAULT_MEMORY_BUDGET``."""
    n_floats = sum(p.numel() for p in params.values())
    per_group = 4 * n_floats * next(iter(params.values())).element_size()
    return max(1, min(MAX_CHUNK, DEFAULT_MEMORY_BUDGET // max(1, per_group)))


class _Bound(nn.Module):
    """Makes ``log_likelihood`` the forward of a module that owns ``model``, for ``functional_call``."""

    def __init__(self, model: nn.Module, log_likelihood: LogLikelihoodFn) -> None:
        super().__init__()
        self.model = model
        self._log_likelihood = log_likelihood

    def forward(self, x: Tensor) -> Tensor:
        return self._log_likelihood(x)


def group_gradients(
    request: NormRequest, groups: Tensor, names: list[str] | None = None
) -> tuple[dict[str, Tensor], Tensor]:
    """Per-group gradients ``{name: [G, *shape]}`` and summed log-likelihoods ``[G]`` for ``groups``
    ``[G, k, ...]``, with respect to the parameters ``names`` (default: all of the request's), taken on
    detached copies of the parameters, so the model's own ``.grad`` fields are never touched."""
    bound = _Bound(request.model, request.log_likelihood)
    names = list(request.params) if names is None else names
    fixed = {f"model.{n}": p.detach() for n, p in request.params.items() if n not in names}
    wanted = {f"model.{n}": request.params[n].detach() for n in names}

    def group_log_likelihood(p: dict[str, Tensor], xg: Tensor) -> tuple[Tensor, Tensor]:
        ll = check_log_likelihood_output(functional_call(bound, {**fixed, **p}, (xg,)), xg.shape[0])
        total = ll.sum()
        return total, total

    grads, ll = vmap(grad(group_log_likelihood, has_aux=True), in_dims=(None, 0))(wanted, groups)
    return {n: grads[f"model.{n}"] for n in names}, ll.detach()


def func_layer_norms(request: NormRequest, groups: Tensor) -> tuple[Tensor, Tensor]:
    """Per-group squared norms ``[G, L]`` and summed log-likelihoods ``[G]`` of ``groups`` ``[G, k, ...]``."""
    grads, ll = group_gradients(request, groups)
    norms = [request.metric.squared_norms(n, grads[n]) for n in request.params]
    return torch.stack(norms, dim=1), ll


def subset_gradients(
    request: NormRequest, subset: dict[str, nn.Parameter], x: Tensor
) -> dict[str, tuple[Tensor, str]]:
    """Per-sample gradients ``[B, *shape]`` of the parameters ``subset`` and the route that gave them
    (``"func"``, else ``"loop"`` where ``vmap`` cannot run the model)."""
    names = list(subset)
    chunk = default_chunk_size(subset)
    try:
        parts = [
            group_gradients(request, x[s : s + chunk].unsqueeze(1), names)[0] for s in range(0, len(x), chunk)
        ]
        return {n: (torch.cat([p[n] for p in parts]).detach(), "func") for n in names}
    except VMAP_ERRORS as err:
        log.info(
            "fimcb: torch.func cannot run %s (%s); a per-sample loop serves %s",
            type(request.model).__name__,
            str(err).splitlines()[0][:200],
            names,
        )
    rows = []
    for i in range(len(x)):
        ll = check_log_likelihood_output(request.log_likelihood(x[i : i + 1]), 1).sum()
        grads = torch.autograd.grad(ll, [subset[n] for n in names], allow_unused=True)
        rows.append(
            [torch.zeros_like(subset[n]) if g is None else g for n, g in zip(names, grads, strict=True)]
        )
    return {n: (torch.stack([r[j] for r in rows]).detach(), "loop") for j, n in enumerate(names)}
