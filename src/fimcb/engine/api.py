"""``per_sample_layer_norms``: one entry point in front of interchangeable gradient backends."""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
import weakref
from collections.abc import Iterator
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from fimcb.core.checks import check_int
from fimcb.core.metric import Metric, resolve_metric
from fimcb.core.modes import eval_mode, grad_enabled
from fimcb.core.norms import LayerNorms
from fimcb.core.protocol import LogLikelihoodFn, ModelProtocolError, resolve_log_likelihood
from fimcb.engine.capture import Capture, capture
from fimcb.engine.factors import Factor
from fimcb.engine.func import default_chunk_size, func_layer_norms
from fimcb.engine.loop import loop_layer_norms
from fimcb.engine.rules.norm import SamplesInteractError, check_samples_independent
from fimcb.engine.types import Backend, NormRequest

log = logging.getLogger("fimcb")

Engine = Literal["auto", "hooks", "func", "loop"]


def hooks_layer_norms(request: NormRequest, groups: Tensor) -> tuple[Tensor, Tensor]:
    """Same contract as :func:`fimcb.engine.func.func_layer_norms`, by one batched capture."""
    n_groups, k = groups.shape[:2]

    def reduce(name: str, factor: Factor) -> Tensor:
        grouped = factor.groups(k) if k > 1 else factor
        return grouped.squared_norms(name, request.metric, request.params[name].shape).detach()

    captured = capture(request, groups.flatten(0, 1), reduce)
    norms = [
        captured.norms[name] if name in captured.norms else reduce(name, captured.factors[name])
        for name in request.params
    ]
    return torch.stack(norms, dim=1), captured.log_likelihood.reshape(n_groups, k).sum(1)


#: The backends by name; ``auto`` times the first two on a model's first batch and keeps the faster,
#: and uses the loop only when neither can run the model.
BACKENDS: dict[str, Backend] = {
    "hooks": hooks_layer_norms,
    "func": func_layer_norms,
    "loop": loop_layer_norms,
}
AUTO_ORDER: tuple[str, ...] = ("hooks", "func", "loop")
#: Calls before a backend is timed: the hooks backend checks its first batch against autograd, then the
#: lighter capture it settled on; timed before that, it would lose to ``func`` on models where it wins.
WARM_UPS: dict[str, int] = {"hooks": 2}

# The backend "auto" settled on for each model it has seen.
_AUTO_CHOICE: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters that require grad, by name; shared parameters appear once, as in ``named_parameters``."""
    return _trainable(model, list(model.named_modules()))


def _trainable(model: nn.Module, modules: list[tuple[str, nn.Module]]) -> dict[str, nn.Parameter]:
    seen: set[int] = set()
    params = {}
    for prefix, module in modules:
        for name, p in module._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            if p.requires_grad:
                params[f"{prefix}.{name}" if prefix else name] = p
    if not params:
        raise ModelProtocolError(
            f"{type(model).__name__} has no parameter that requires grad: nothing to score"
        )
    return params


@contextlib.contextmanager
def scoring(model: nn.Module) -> Iterator[dict[str, nn.Parameter]]:
    """What every per-sample computation runs under: the model's trainable parameters by name, the model in
    eval mode (each module's flag restored afterwards) with autograd on, its BatchNorm layers checked.
    One walk of the module tree serves all of it (it is a per-call cost, large on small models)."""
    modules = list(model.named_modules())
    params = _trainable(model, modules)
    plain = [m for _, m in modules]
    with eval_mode(model, plain), grad_enabled():
        check_samples_independent(model, plain)
        yield params


def per_sample_layer_norms(
    model: nn.Module,
    x: Tensor,
    *,
    metric: Metric | str | None = None,
    log_likelihood: LogLikelihoodFn | None = None,
    group_size: int = 1,
    engine: Engine = "auto",
    chunk_size: int | None = None,
) -> LayerNorms:
    """Squared norms of per-sample log-likelihood gradients, one column per parameter tensor.

    Args:
        model: any ``nn.Module`` with ``log_likelihood(x) -> [B]`` (or pass ``log_likelihood``).
        x: a batch ``[B, ...]``; it is moved to the model's device.
        metric: the Fisher approximation turning gradients into norms (default: identity).
        log_likelihood: overrides ``model.log_likelihood``; must compute through ``model``.
        group_size: k; row g is the gradient of the summed log-likelihood of samples
            ``g*k .. g*k+k-1``. A remainder of ``B % k`` samples is dropped with a warning.
        engine: ``"hooks"`` (one batched backward; per-layer rules, op rules for parameters used outside
            modules, local ``torch.func`` for the rest, see :mod:`fimcb.engine.capture`), ``"func"``
            (``torch.func`` vmap over the whole model), ``"loop"`` (one backward per group) or
            ``"auto"`` (on the first batch of a model, times ``hooks`` and ``func`` and keeps the
            faster; the loop only when neither works).
        chunk_size: groups per call of a backend (default: sized from the parameter count).

    Runs the model in eval mode (restored afterwards), never writes ``.grad`` and works
    inside ``torch.no_grad``/``inference_mode``.
    """
    if engine not in get_args(Engine):
        raise ValueError(f"engine must be one of {get_args(Engine)}, got {engine!r}")
    if not isinstance(x, Tensor) or x.ndim < 1:
        raise ValueError(f"x must be a batched tensor [B, ...], got {type(x).__name__}")
    check_int("group_size", group_size)
    n_groups = x.shape[0] // group_size
    if n_groups == 0:
        raise ValueError(f"a batch of {x.shape[0]} samples holds no group of {group_size}")
    if x.shape[0] % group_size:
        warnings.warn(
            f"dropping the last {x.shape[0] % group_size} samples: batch {x.shape[0]} is not a multiple "
            f"of group_size {group_size}",
            stacklevel=2,
        )
    with scoring(model) as params:
        request = NormRequest(
            model, resolve_log_likelihood(model, log_likelihood), params, resolve_metric(metric)
        )
        chunk = chunk_size or default_chunk_size(params)
        device = next(iter(params.values())).device
        xs = x.clone() if x.is_inference() else x
        groups = xs[: n_groups * group_size].to(device).reshape(n_groups, group_size, *x.shape[1:])
        values, ll = _run(engine, request, groups, chunk)
    return LayerNorms(values=values.detach(), names=tuple(params), log_likelihood=ll.detach())


def capture_factors(model: nn.Module, x: Tensor, *, log_likelihood: LogLikelihoodFn | None = None) -> Capture:
    """Per-sample gradient factors of every trainable parameter for the batch ``x`` (hooks backend):
    what the layer rules capture, for metrics that need more than norms (K-FAC's Kronecker statistics).
    Same conventions as :func:`per_sample_layer_norms`."""
    with scoring(model) as params:
        request = NormRequest(
            model, resolve_log_likelihood(model, log_likelihood), params, resolve_metric(None)
        )
        device = next(iter(params.values())).device
        return capture(request, (x.clone() if x.is_inference() else x).to(device))


def per_sample_gradients(
    model: nn.Module,
    x: Tensor,
    *,
    log_likelihood: LogLikelihoodFn | None = None,
    chunk_size: int | None = None,
) -> Iterator[tuple[dict[str, Tensor], Tensor]]:
    """Materialised per-sample gradients of the log-likelihood, chunk by chunk: yields
    ``({name: [n, *param.shape]}, log_likelihood [n])`` for consecutive chunks of ``x``.

    For fitting Fisher approximations (:mod:`fimcb.metrics`), which need the gradients themselves,
    not only their norms: the hooks backend's factors, materialised. Same conventions as
    :func:`per_sample_layer_norms`; chunks bound the memory of the materialised gradients.
    """
    params = trainable_parameters(model)
    chunk = chunk_size or default_chunk_size(params)
    for start in range(0, x.shape[0], chunk):
        captured = capture_factors(model, x[start : start + chunk], log_likelihood=log_likelihood)
        yield (
            {
                n: f.dense(slice(None)).reshape(-1, *params[n].shape).detach()
                for n, f in captured.factors.items()
            },
            captured.log_likelihood,
        )


def _run(engine: Engine, request: NormRequest, groups: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    model = request.model

    def backend(name: str) -> tuple[Tensor, Tensor]:
        parts = [BACKENDS[name](request, groups[s : s + chunk]) for s in range(0, groups.shape[0], chunk)]
        return torch.cat([v for v, _ in parts]), torch.cat([ll for _, ll in parts])

    if engine != "auto":
        return backend(engine)
    if model in _AUTO_CHOICE:
        return backend(_AUTO_CHOICE[model])
    timed: dict[str, tuple[float, tuple[Tensor, Tensor]]] = {}
    for name in AUTO_ORDER[:-1]:
        try:
            for _ in range(WARM_UPS.get(name, 1)):  # warm-up; the hooks backend checks itself here
                backend(name)
        except (ModelProtocolError, SamplesInteractError):
            raise
        except (RuntimeError, NotImplementedError, ValueError, TypeError) as err:
            log.warning(
                "fimcb: the %s engine cannot handle %s (%s); trying the next one",
                name,
                type(model).__name__,
                str(err).splitlines()[0][:300],
            )
            continue
        start = time.perf_counter()
        result = backend(name)
        timed[name] = (time.perf_counter() - start, result)
    if not timed:
        _AUTO_CHOICE[model] = AUTO_ORDER[-1]
        return backend(AUTO_ORDER[-1])
    choice = min(timed, key=lambda name: timed[name][0])
    _AUTO_CHOICE[model] = choice
    log.info(
        "fimcb: engine 'auto' uses %s for %s (%s)",
        choice,
        type(model).__name__,
        ", ".join(f"{name} {1000 * seconds:.1f} ms" for name, (seconds, _) in timed.items()),
    )
    return timed[choice][1]
