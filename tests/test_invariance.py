"""Representation invariance of the FIM-norm: which Fisher approximations keep ``s_lᵀ F_l⁻¹ s_l`` unchanged
when a model is reparametrised without changing its function (docs/invariance.md).

With ``θ = φ(θ')`` and Jacobian ``J = ∂θ/∂θ'`` (block-diagonal over parameter tensors for every map here),
per-sample gradients become ``s' = Jᵀ s`` and any Fisher built from them ``F' = Jᵀ F J``, so the exact
norm ``s'ᵀ F'⁻¹ s' = sᵀ F⁻¹ s`` does not move. Each case builds a tiny float64 model in two
parametrisations at matched points (same log-likelihood), fits every metric on the same reference inputs
(more of them than any layer has coordinates, so that the dense empirical Fisher is invertible) and
compares the per-layer squared norms of held-out inputs: the metrics that keep the invariance must agree
to a relative tolerance, the others must move the reparametrised layers' norms by a clear margin.

The reference ``exact`` metric is independent of fimcb: per-sample gradients from one ``autograd.grad``
per sample and an undamped dense Fisher block per parameter tensor, solved by Cholesky.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from fimcb import per_sample_layer_norms
from fimcb.metrics import KFAC, FittedDiagonal, Identity, LayerScalar, LowRank, Metric

N_REFERENCE = 96  # reference inputs of every Fisher; the largest layer has 20 coordinates
N_TEST = 24
SLOPE = 0.2  # leaky ReLU: positive-homogeneous, and no unit is dead on every reference input

# Damping of the fitted metrics: tiny, since any damping δI is isotropic in one parametrisation only.
# low_rank's Woodbury form loses about eps·||s||²/δ to cancellation, so 1e-10 (relative) is about as
# small as it can usefully go; kfac's damping is absolute and split between its factors as √δ.
DAMPING = {"low_rank": 1e-10, "diagonal": 1e-12, "kfac": 1e-24}
# Relative tolerance of each invariant metric (largest errors seen over 48 seeds: exact 2e-11, low_rank
# 6e-5, kfac 5e-8, diagonal 2e-7), and the margin every non-invariant one must exceed (smallest change
# seen: 0.27): both are the largest relative change of a reparametrised layer's norm over the test inputs.
TOLERANCE = {"exact": 1e-8, "low_rank": 1e-3, "kfac": 1e-5, "diagonal": 1e-5, "layer_scalar": 1e-9}
MARGIN = 0.1


class ReparamLinear(nn.Module):
    """A linear layer whose weight is stored as ``θ`` with ``vec(W) = P θ`` for a fixed invertible ``P``
    (row-major ``vec``); built from a weight and bias so that it computes the same map."""

    def __init__(self, weight: Tensor, bias: Tensor, basis: Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.theta = nn.Parameter(torch.linalg.solve(basis, weight.detach().flatten()))
        self.bias = nn.Parameter(bias.detach().clone())
        self.register_buffer("basis", basis)

    def forward(self, x: Tensor) -> Tensor:
        weight = (self.basis @ self.theta).reshape(self.out_features, self.in_features)
        return F.linear(x, weight, self.bias)


class Regressor(nn.Module):
    """``x = (u, v)``, ``v | u ~ N(fc3(fc2(leaky_relu(fc1(u)))), I)``, ``u ~ N(0, I)``: a hidden layer
    between ``fc1`` and ``fc2``, a linear bottleneck between ``fc2`` and ``fc3``."""

    def __init__(self, inputs: int = 3, hidden: int = 4, outputs: int = 4) -> None:
        super().__init__()
        self.inputs = inputs
        self.fc1 = nn.Linear(inputs, hidden)
        self.fc2 = nn.Linear(hidden, outputs)
        self.fc3: nn.Module = nn.Linear(outputs, outputs)
        for layer in (self.fc1, self.fc2, self.fc3):  # well-conditioned Fisher blocks at the start
            nn.init.orthogonal_(layer.weight)

    def log_likelihood(self, x: Tensor) -> Tensor:
        u, v = x[:, : self.inputs], x[:, self.inputs :]
        mean = self.fc3(self.fc2(F.leaky_relu(self.fc1(u), SLOPE)))
        return -0.5 * (v - mean).pow(2).sum(1) - 0.5 * u.pow(2).sum(1)


class ScaleFlow(nn.Module):
    """Elementwise affine flow ``z = (x − μ) ⊙ s`` with a standard normal base, its positive scale ``s``
    stored as ``exp(a)`` (``"exp"``), ``softplus(a)`` (``"softplus"``) or ``s`` itself (``"direct"``)."""

    def __init__(self, log_scale: Tensor, shift: Tensor, kind: str) -> None:
        super().__init__()
        self.kind = kind
        scale = log_scale.exp()
        raw = {"exp": log_scale, "softplus": torch.log(torch.expm1(scale)), "direct": scale}[kind]
        self.raw = nn.Parameter(raw.clone())
        self.shift = nn.Parameter(shift.clone())

    def scale(self) -> Tensor:
        return {"exp": torch.exp, "softplus": F.softplus, "direct": torch.abs}[self.kind](self.raw)

    def log_likelihood(self, x: Tensor) -> Tensor:
        s = self.scale()
        z = (x - self.shift) * s
        return -0.5 * z.pow(2).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi) + s.log().sum()

    def sample(self, n: int) -> Tensor:
        return self.shift + torch.randn(n, self.shift.numel(), dtype=self.shift.dtype) / self.scale()


@dataclass
class Pair:
    """One model in two parametrisations at matched points, the reference and test inputs, and the
    positions (in parameter order, the same in both) of the parameter tensors that were reparametrised."""

    before: nn.Module
    after: nn.Module
    changed: tuple[int, ...]
    reference: Tensor
    test: Tensor


def _log_spread(n: int, spread: float, g: torch.Generator) -> Tensor:
    """``n`` positive factors ``10^(spread·u)``, ``u`` uniform in [-1, 1] with both ends taken."""
    u = torch.cat([torch.tensor([1.0, -1.0]), 2 * torch.rand(n - 2, generator=g) - 1])
    return 10 ** (spread * u[torch.randperm(n, generator=g)]).double()


def _regressor(seed: int) -> tuple[Regressor, Tensor, Tensor, torch.Generator]:
    """A seeded model, its reference and test inputs, and a generator for the reparametrisation."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Regressor().double()
    data = torch.randn(N_REFERENCE + N_TEST, 7, generator=g, dtype=torch.float64)
    return model, data[:N_REFERENCE], data[N_REFERENCE:], g


def hidden_rescaling(seed: int, spread: float) -> Pair:
    """(a) ``W1 → D W1``, ``b1 → D b1``, ``W2 → W2 D⁻¹`` around a positive-homogeneous activation."""
    model, reference, test, g = _regressor(seed)
    after = _copy(model)
    d = _log_spread(model.fc1.out_features, spread, g)
    with torch.no_grad():
        after.fc1.weight.mul_(d[:, None])
        after.fc1.bias.mul_(d)
        after.fc2.weight.div_(d[None, :])
    return Pair(model, after, (0, 1, 2), reference, test)


def bottleneck_mixing(seed: int, spread: float) -> Pair:
    """A linear layer's outputs mixed by an invertible ``M`` that the next layer undoes:
    ``W2 → M W2``, ``b2 → M b2``, ``W3 → W3 M⁻¹`` (an affine map of ``fc3``'s inputs)."""
    model, reference, test, g = _regressor(seed)
    after = _copy(model)
    k = model.fc2.out_features
    q, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
    m = q * _log_spread(k, spread, g)
    with torch.no_grad():
        after.fc2.weight.copy_(m @ model.fc2.weight)
        after.fc2.bias.copy_(m @ model.fc2.bias)
        after.fc3.weight.copy_(model.fc3.weight @ torch.linalg.inv(m))
    return Pair(model, after, (2, 3, 4), reference, test)


def _stored_weight(seed: int, basis: Callable[[int, torch.Generator], Tensor]) -> Pair:
    """(b) ``fc3``'s weight stored as ``θ = P⁻¹ vec(W)``, against the same layer with ``P = I``."""
    model, reference, test, g = _regressor(seed)
    weight, bias = model.fc3.weight, model.fc3.bias
    d = weight.numel()
    before, after = _copy(model), _copy(model)
    before.fc3 = ReparamLinear(weight, bias, torch.eye(d, dtype=torch.float64))
    after.fc3 = ReparamLinear(weight, bias, basis(d, g))
    return Pair(before, after, (4,), reference, test)


def uniform_rescaling(seed: int, spread: float) -> Pair:
    """``P = c I``: every coordinate of the layer rescaled by one factor."""
    return _stored_weight(seed, lambda d, g: 10**spread * torch.eye(d, dtype=torch.float64))


def per_parameter_rescaling(seed: int, spread: float) -> Pair:
    """``P = diag(c)``: each coordinate rescaled by its own factor."""
    return _stored_weight(seed, lambda d, g: torch.diag(_log_spread(d, spread, g)))


def generic_linear_map(seed: int, spread: float) -> Pair:
    """``P`` a dense invertible matrix (orthogonal times log-spread column scales)."""

    def basis(d: int, g: torch.Generator) -> Tensor:
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        return q * _log_spread(d, spread, g)

    return _stored_weight(seed, basis)


def _flow_pair(seed: int, spread: float, kind: str) -> Pair:
    """(c) the flow's scale stored as ``exp(a)`` against another parametrisation at the same ``s``."""
    g = torch.Generator().manual_seed(seed)
    log_scale = math.log(10) * spread * torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64)
    shift = torch.randn(4, generator=g, dtype=torch.float64)
    before, after = ScaleFlow(log_scale, shift, "exp"), ScaleFlow(log_scale, shift, kind)
    data = shift + torch.randn(N_REFERENCE + N_TEST, 4, generator=g, dtype=torch.float64) / log_scale.exp()
    return Pair(before, after, (0,), data[:N_REFERENCE], data[N_REFERENCE:])


def flow_scale_softplus(seed: int, spread: float) -> Pair:
    """``s = exp(a)`` against ``s = softplus(b)``."""
    return _flow_pair(seed, spread, "softplus")


def flow_scale_direct(seed: int, spread: float) -> Pair:
    """``s = exp(a)`` (a log-scale) against ``s`` stored directly."""
    return _flow_pair(seed, spread, "direct")


def _copy(model: Regressor) -> Regressor:
    copy = Regressor().double()
    copy.load_state_dict(model.state_dict())
    return copy


REPARAMETRISATIONS: dict[str, Callable[[int, float], Pair]] = {
    f.__name__: f
    for f in (
        hidden_rescaling,
        bottleneck_mixing,
        uniform_rescaling,
        per_parameter_rescaling,
        generic_linear_map,
        flow_scale_softplus,
        flow_scale_direct,
    )
}

#: Which metric keeps which invariance (the table of docs/invariance.md). ``kfac`` treats a layer without
#: an outer-product rule (``ReparamLinear``, the flow's scale) as the layer-scalar metric does.
INVARIANT: dict[str, frozenset[str]] = {
    "hidden_rescaling": frozenset({"exact", "low_rank", "diagonal", "kfac"}),
    "bottleneck_mixing": frozenset({"exact", "low_rank", "kfac"}),
    "uniform_rescaling": frozenset({"exact", "low_rank", "diagonal", "kfac", "layer_scalar"}),
    "per_parameter_rescaling": frozenset({"exact", "low_rank", "diagonal"}),
    "generic_linear_map": frozenset({"exact", "low_rank"}),
    "flow_scale_softplus": frozenset({"exact", "low_rank", "diagonal"}),
    "flow_scale_direct": frozenset({"exact", "low_rank", "diagonal"}),
}
METRICS = ("exact", "low_rank", "kfac", "diagonal", "layer_scalar", "identity")


def _fimcb_metric(name: str) -> Metric:
    """fimcb's metric ``name`` with (nearly) no damping and as many references as there are."""
    return {
        "identity": Identity,
        "layer_scalar": lambda: LayerScalar(n_samples=N_REFERENCE),
        "diagonal": lambda: FittedDiagonal(damping=DAMPING["diagonal"], n_samples=N_REFERENCE),
        "kfac": lambda: KFAC(damping=DAMPING["kfac"], n_samples=N_REFERENCE),
        "low_rank": lambda: LowRank(n_reference=N_REFERENCE, damping=DAMPING["low_rank"]),
    }[name]()


def _naive_gradients(model: nn.Module, x: Tensor) -> list[Tensor]:
    """Per parameter tensor, ``[N, d]`` per-sample gradients from one ``autograd.grad`` per sample."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = [torch.autograd.grad(model.log_likelihood(xi[None]).sum(), params) for xi in x]
    return [torch.stack([r[i].flatten() for r in rows]) for i in range(len(params))]


def exact_norms(model: nn.Module, reference: Tensor, x: Tensor) -> Tensor:
    """``[N, L]`` ``s_lᵀ F_l⁻¹ s_l`` with the undamped dense empirical Fisher ``F_l = (1/R) Σ_r s_r s_rᵀ``
    of the reference inputs, per parameter tensor, by Cholesky."""
    columns = []
    for refs, s in zip(_naive_gradients(model, reference), _naive_gradients(model, x), strict=True):
        factor = torch.linalg.cholesky(refs.T @ refs / len(refs))
        columns.append(torch.cholesky_solve(s.T, factor).T.mul(s).sum(1))
    return torch.stack(columns, dim=1)


def layer_norms(metric: str, model: nn.Module, pair: Pair) -> tuple[Tensor, Tensor]:
    """``[N, L]`` squared norms of the test inputs under ``metric`` fitted on the reference inputs, and
    the log-likelihoods."""
    ll = model.log_likelihood(pair.test).detach()
    if metric == "exact":
        return exact_norms(model, pair.reference, pair.test), ll
    fitted = _fimcb_metric(metric).fit(model, [pair.reference])
    return per_sample_layer_norms(model, pair.test, metric=fitted, engine="func").values, ll


def relative_change(before: Tensor, after: Tensor) -> float:
    """Largest ``|after − before| / before`` over all entries."""
    return float(((after - before).abs() / before).max())


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("reparametrisation", list(REPARAMETRISATIONS))
@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**16), spread=st.floats(0.5, 1.0))
def test_norm_is_invariant_exactly_where_expected(
    reparametrisation: str, metric: str, seed: int, spread: float
) -> None:
    """Same function, reparametrised by factors spanning ``10^±spread``: the metric's norms of the
    reparametrised layers agree (invariant metrics) or move by more than ``MARGIN`` (the others);
    untouched layers agree under every metric."""
    pair = REPARAMETRISATIONS[reparametrisation](seed, spread)
    before, ll_before = layer_norms(metric, pair.before, pair)
    after, ll_after = layer_norms(metric, pair.after, pair)
    torch.testing.assert_close(ll_after, ll_before, rtol=1e-12, atol=1e-12)
    changed = list(pair.changed)
    kept = [i for i in range(before.shape[1]) if i not in pair.changed]
    # untouched layers see the same gradients up to rounding, which a tiny damping amplifies
    torch.testing.assert_close(after[:, kept], before[:, kept], rtol=TOLERANCE.get(metric, 1e-9), atol=0)
    if metric in INVARIANT[reparametrisation]:
        torch.testing.assert_close(after[:, changed], before[:, changed], rtol=TOLERANCE[metric], atol=0)
    else:
        assert relative_change(before[:, changed], after[:, changed]) > MARGIN


def test_damping_is_what_breaks_low_rank_invariance() -> None:
    """Under hidden units rescaled over 1e-2..1e2, ``low_rank``'s invariance error falls with its damping δ:
    ``δI`` is isotropic in one parametrisation only, and the relative δ follows the largest-scaled
    coordinates. The default δ = 1e-3 loses the invariance outright; 1e-10 nearly keeps it."""
    pair = hidden_rescaling(seed=0, spread=2.0)
    changed = list(pair.changed)
    errors = []
    for damping in (1e-3, 1e-7, 1e-10):
        norms = [
            per_sample_layer_norms(
                m,
                pair.test,
                metric=LowRank(n_reference=N_REFERENCE, damping=damping).fit(m, [pair.reference]),
            ).values[:, changed]
            for m in (pair.before, pair.after)
        ]
        errors.append(relative_change(*norms))
    assert errors == sorted(errors, reverse=True)
    assert errors[0] > 0.5
    assert errors[-1] < MARGIN


@pytest.mark.parametrize("kind", ["softplus", "direct"])
def test_true_fisher_low_rank_is_invariant_to_flow_scale(kind: str) -> None:
    """With ``fisher="true"`` both parametrisations draw the same samples (same function, same seed), so
    the fitted Fisher transforms as ``JᵀFJ`` and the scale's norm does not move; identity's does."""
    pair = _flow_pair(seed=1, spread=1.0, kind=kind)
    norms = {}
    for name, metric in (
        ("low_rank", lambda: LowRank(fisher="true", n_reference=N_REFERENCE, damping=1e-10, seed=4)),
        ("identity", Identity),
    ):
        norms[name] = [
            per_sample_layer_norms(m, pair.test, metric=metric().fit(m)).values[:, 0]
            for m in (pair.before, pair.after)
        ]
    torch.testing.assert_close(*norms["low_rank"], rtol=TOLERANCE["low_rank"], atol=0)
    assert relative_change(*norms["identity"]) > MARGIN


def test_kfac_needs_the_linear_layer_structure() -> None:
    """The same weight (``vec(W) = θ``, ``P = I``) in a custom layer has no Kronecker factors: kfac falls
    back to the layer-scalar metric there, so its norm changes although nothing was reparametrised."""
    model, reference, test, _ = _regressor(seed=0)
    custom = _copy(model)
    custom.fc3 = ReparamLinear(model.fc3.weight, model.fc3.bias, torch.eye(16, dtype=torch.float64))
    pair = Pair(model, custom, (4,), reference, test)
    (exact, _), (exact_custom, _) = (layer_norms("exact", m, pair) for m in (model, custom))
    torch.testing.assert_close(exact_custom, exact, rtol=TOLERANCE["exact"], atol=0)
    fitted = [
        KFAC(damping=DAMPING["kfac"], n_samples=N_REFERENCE).fit(m, [reference]) for m in (model, custom)
    ]
    assert "fc3.weight" in fitted[0].kronecker_factored
    assert "fc3.theta" in fitted[1].layer_scalars
    kfac = [
        per_sample_layer_norms(m, test, metric=k).values[:, 4]
        for m, k in zip((model, custom), fitted, strict=True)
    ]
    assert relative_change(*kfac) > MARGIN
