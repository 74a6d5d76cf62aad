"""Double backpropagation: which parts of an input carry its novelty (docs/method.md §7).

The novelty feature of a sample is its squared FIM-norm ``q(x) = Σ_l s_lᵀ F_l⁻¹ s_l`` with
``s_l = ∇_{θ_l} log p_θ(x)``. Its gradient with respect to the input, ``∇_x q(x)``, says which input
coordinates (pixels) the score reacts to: differentiate the parameter gradient a second time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from fimcb.core.checks import check_int
from fimcb.core.metric import Metric, resolve_metric
from fimcb.core.protocol import (
    LogLikelihoodFn,
    ModelProtocolError,
    check_log_likelihood_output,
    resolve_log_likelihood,
)
from fimcb.engine.api import scoring
from fimcb.engine.func import default_chunk_size, group_gradients
from fimcb.engine.rules.norm import SamplesInteractError
from fimcb.engine.types import NormRequest

log = logging.getLogger("fimcb")

SaliencyEngine = Literal["auto", "func", "loop"]


def input_saliency(
    model: nn.Module,
    x: Tensor,
    *,
    metric: Metric | str | None = None,
    log_likelihood: LogLikelihoodFn | None = None,
    chunk_size: int | None = None,
    engine: SaliencyEngine = "auto",
) -> Tensor:
    """``∇_{x_n} q(x_n)`` for every sample of ``x``, with ``q`` the squared FIM-norm of the sample's
    log-likelihood gradient over the model's trainable parameters, summed over parameter tensors.

    Args:
        model: any ``nn.Module`` with ``log_likelihood(x) -> [B]`` (or pass ``log_likelihood``).
        x: a floating batch ``[N, ...]`` (e.g. images); it is moved to the model's device.
        metric: the Fisher approximation (default: identity); one that needs fitting must be fitted first.
        log_likelihood: overrides ``model.log_likelihood``; must compute through ``model``.
        chunk_size: samples per vectorised call (default: sized from the parameter count).
        engine: ``"func"`` (``torch.func``: gradient of the summed norms of per-sample gradients
            taken under ``vmap``), ``"loop"`` (one double ``autograd.grad`` per sample) or ``"auto"``
            (``func``, falling back to the loop for models whose forward does not vmap).

    Returns:
        ``[N, ...]``, shaped like ``x``, on the model's device, detached. Computed in eval mode (restored
        afterwards) with the model's deterministic log-likelihood; ``.grad`` fields are never written.
    """
    if engine not in get_args(SaliencyEngine):
        raise ValueError(f"engine must be one of {get_args(SaliencyEngine)}, got {engine!r}")
    _check_input(x)
    if chunk_size is not None:
        check_int("chunk_size", chunk_size)
    resolved = resolve_metric(metric)
    if not resolved.fitted:
        raise RuntimeError(
            f"the {resolved.name} metric is not fitted: call metric.fit(model, data) before input_saliency"
        )
    with scoring(model) as params:
        request = NormRequest(model, resolve_log_likelihood(model, log_likelihood), params, resolved)
        chunk = chunk_size or default_chunk_size(params)
        device = next(iter(params.values())).device
        xs = (x.clone() if x.is_inference() else x).detach().to(device)
        saliency = _run(engine, request, xs, chunk).detach()
    if not saliency.any():
        log.warning(
            "fimcb: the input saliency of %s is zero everywhere: its log-likelihood does not depend "
            "differentiably on x (does it round or quantise the input? pass it through straight-through, "
            "x + (q - x).detach(), as fimcb's PixelCNN does)",
            type(model).__name__,
        )
    return saliency


def saliency_map(saliency: Tensor) -> Tensor:
    """Heat map ``[N, H, W]`` of an image batch's saliency ``[N, C, H, W]``: ``|∇_x q|`` summed over channels
    (a pixel's total sensitivity, whatever the sign of each channel's)."""
    if not isinstance(saliency, Tensor) or saliency.ndim != 4:
        shape = list(saliency.shape) if isinstance(saliency, Tensor) else type(saliency).__name__
        raise ValueError(f"saliency_map needs the saliency of an image batch [N, C, H, W], got {shape}")
    return saliency.abs().sum(dim=1)


def _check_input(x: Tensor) -> None:
    """Clear errors for inputs that cannot be differentiated or scored."""
    if not isinstance(x, Tensor) or x.ndim < 1:
        raise ValueError(f"x must be a batched tensor [N, ...], got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise TypeError(
            f"input saliency differentiates with respect to the input, but x has dtype {x.dtype}: it needs "
            "a floating input such as an image (integer inputs such as tokens have no gradient)"
        )
    if x.shape[0] == 0:
        raise ValueError("x is an empty batch: nothing to explain")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or infinite values; saliency needs finite inputs")


def _func_saliency(request: NormRequest, xs: Tensor) -> Tensor:
    """``torch.func``: each sample's gradients come from its own ``vmap`` slice, so the gradient of the
    norms summed over samples with respect to ``x_n`` is that of ``q(x_n)`` alone."""

    def total_norm(xc: Tensor) -> Tensor:
        grads, _ = group_gradients(request, xc.unsqueeze(1))
        return torch.stack([request.metric.squared_norms(n, g).sum() for n, g in grads.items()]).sum()

    return torch.func.grad(total_norm)(xs)


def _loop_saliency(request: NormRequest, xs: Tensor) -> Tensor:
    """One sample at a time: ``autograd.grad`` with ``create_graph`` for ``s``, then again for ``∇_x q``."""
    names, tensors = list(request.params), list(request.params.values())
    rows = []
    for xn in xs:
        xn = xn.unsqueeze(0).detach().requires_grad_(True)
        ll = check_log_likelihood_output(request.log_likelihood(xn), 1).sum()
        grads = torch.autograd.grad(ll, tensors, create_graph=True, allow_unused=True)
        norms = [
            request.metric.squared_norms(n, g.unsqueeze(0))
            for n, g in zip(names, grads, strict=True)
            if g is not None
        ]
        q = torch.cat(norms).sum() if norms else xn.new_zeros(())
        (row,) = torch.autograd.grad(q, xn, allow_unused=True) if q.requires_grad else (None,)
        rows.append(torch.zeros_like(xn) if row is None else row)  # q does not depend on x: zero saliency
    return torch.cat(rows)


Backend = Callable[[NormRequest, Tensor], Tensor]
_BACKENDS: dict[str, Backend] = {"func": _func_saliency, "loop": _loop_saliency}


def _run(engine: SaliencyEngine, request: NormRequest, xs: Tensor, chunk: int) -> Tensor:
    """Saliency of ``xs`` chunk by chunk; ``auto`` tries ``func`` on the first chunk and keeps the loop
    for the rest when the model's forward cannot be vmapped (as ``per_sample_layer_norms`` does)."""
    chunks = xs.split(chunk)
    backend = _BACKENDS["func" if engine == "auto" else engine]
    try:
        first = backend(request, chunks[0])
    except (ModelProtocolError, SamplesInteractError):
        raise
    except (RuntimeError, NotImplementedError, ValueError, TypeError) as err:
        if engine != "auto":
            raise
        log.warning(
            "fimcb: input saliency cannot vmap %s (%s); using the per-sample loop",
            type(request.model).__name__,
            str(err).splitlines()[0][:300],
        )
        backend = _loop_saliency
        first = backend(request, chunks[0])
    return torch.cat([first, *(backend(request, c) for c in chunks[1:])])
