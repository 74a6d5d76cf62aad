"""Fitted metrics (layer-scalar, diagonal, low-rank) against dense float64 references on tiny models.

The reference takes per-sample gradients with one ``autograd.grad`` per sample, forms each layer's
Fisher block as an explicit matrix and inverts it with ``torch.linalg``; the metrics must give the
same ``s_lᵀ F_l⁻¹ s_l`` through every engine.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from toy_models import LinearFlow, MLPEnergy

import fimcb.metrics.base
from fimcb import per_sample_layer_norms
from fimcb.metrics.diagonal import FittedDiagonal, FittedMetric, LayerScalar
from fimcb.metrics.fitting import fisher_inputs
from fimcb.metrics.low_rank import ONLINE_MAX_DIM, CountSketch, LowRank, _SequentialInverse, _woodbury

ENGINES = ["loop", "func", "hooks"]


class SampledFlow(LinearFlow):
    """``LinearFlow`` with exact sampling, for the true Fisher."""

    def sample(self, n: int) -> Tensor:
        z = torch.randn(n, self.linear.in_features, dtype=self.log_scale.dtype)
        y = z * (-self.log_scale).exp() - self.linear.bias
        return torch.linalg.solve(self.linear.weight, y.T).T


class WithUnused(MLPEnergy):
    """An MLP energy with a parameter the likelihood ignores: its gradient is always zero."""

    def __init__(self) -> None:
        super().__init__(3, [4], "tanh", bias=True)
        self.unused = nn.Parameter(torch.ones(2))

    def log_likelihood(self, x: Tensor) -> Tensor:
        return super().log_likelihood(x) + 0 * self.unused.sum()


def _mlp(dim: int = 3, widths: tuple[int, ...] = (4,)) -> MLPEnergy:
    torch.manual_seed(3)
    return MLPEnergy(dim, list(widths), "tanh", bias=True).double()


def _naive_grads(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """``{name: [N, d]}`` float64 per-sample gradients, one ``autograd.grad`` per sample."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    rows: dict[str, list[Tensor]] = {n: [] for n in params}
    for xi in x:
        grads = torch.autograd.grad(model.log_likelihood(xi[None]).sum(), list(params.values()))
        for n, g in zip(params, grads, strict=True):
            rows[n].append(g.flatten().double())
    return {n: torch.stack(r) for n, r in rows.items()}


def _quadratic(fisher: Tensor, s: Tensor) -> Tensor:
    """``s_nᵀ F⁻¹ s_n`` for each row of ``s``, with an explicit float64 inverse."""
    return ((s @ torch.linalg.inv(fisher)) * s).sum(1)


def _scores(model: nn.Module, x: Tensor, metric, engine: str) -> Tensor:
    return per_sample_layer_norms(model, x, metric=metric, engine=engine).values


def _data(dim: int = 3) -> tuple[list[Tensor], Tensor, Tensor]:
    """Fit batches (12 samples, of which ``n_samples=10`` are used), those 10, and test inputs."""
    g = torch.Generator().manual_seed(5)
    fit = torch.randn(12, dim, generator=g, dtype=torch.float64)
    test = torch.randn(7, dim, generator=g, dtype=torch.float64)
    return [fit[:4], fit[4:]], fit[:10], test


def _dense_low_rank(refs: Tensor, delta: float) -> Tensor:
    n, d = refs.shape
    return delta * torch.eye(d, dtype=torch.float64) + refs.T @ refs / n


def _sketch_matrix(sketch: CountSketch) -> Tensor:
    d = sketch.bucket.numel()
    p = torch.zeros(sketch.dim, d, dtype=torch.float64)
    p[sketch.bucket.long(), torch.arange(d)] = sketch.sign.double()
    return p


@pytest.mark.parametrize("engine", ENGINES)
def test_layer_scalar_matches_dense(engine: str) -> None:
    model = _mlp()
    batches, fit_x, test_x = _data()
    metric = LayerScalar(n_samples=10).fit(model, batches)
    refs, tests = _naive_grads(model, fit_x), _naive_grads(model, test_x)
    expected = []
    for n, s in tests.items():
        lam = refs[n].square().sum(1).mean() / s.shape[1]
        expected.append(_quadratic(lam * torch.eye(s.shape[1], dtype=torch.float64), s))
        assert metric.inverse_diagonal(n) == pytest.approx(1 / float(lam))
    torch.testing.assert_close(_scores(model, test_x, metric, engine), torch.stack(expected, 1))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("relative", [True, False])
def test_fitted_diagonal_matches_dense(engine: str, relative: bool) -> None:
    model = _mlp()
    batches, fit_x, test_x = _data()
    metric = FittedDiagonal(damping=0.05, relative_damping=relative, n_samples=10).fit(model, batches)
    refs, tests = _naive_grads(model, fit_x), _naive_grads(model, test_x)
    expected = []
    for n, s in tests.items():
        diag = refs[n].square().mean(0)
        delta = 0.05 * diag.mean() if relative else 0.05
        expected.append(_quadratic(torch.diag(diag + delta), s))
        torch.testing.assert_close(metric.inverse_diagonal(n).flatten(), 1 / (diag + delta))
    torch.testing.assert_close(_scores(model, test_x, metric, engine), torch.stack(expected, 1))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(("relative", "online"), [(True, False), (False, False), (True, True)])
def test_low_rank_matches_dense(engine: str, relative: bool, online: bool) -> None:
    model = _mlp()
    batches, fit_x, test_x = _data()
    metric = LowRank(n_reference=10, damping=0.05, relative_damping=relative, online=online)
    metric.fit(model, batches)
    refs, tests = _naive_grads(model, fit_x), _naive_grads(model, test_x)
    expected = []
    for n, s in tests.items():
        delta = 0.05 * float(refs[n].square().sum(1).mean()) / s.shape[1] if relative else 0.05
        expected.append(_quadratic(_dense_low_rank(refs[n], delta), s))
    torch.testing.assert_close(_scores(model, test_x, metric, engine), torch.stack(expected, 1))


@pytest.mark.parametrize("online", [False, True])
def test_sketched_low_rank_matches_dense_projection(online: bool) -> None:
    """Layers larger than r are scored as ``(Ps)ᵀ(δI + (1/N) Σ Ps_i s_iᵀPᵀ)⁻¹(Ps)`` with P the explicit
    count-sketch matrix; smaller layers are untouched."""
    model = _mlp(3, (8,))  # layers of 24, 8, 8 and 1 coordinates
    batches, fit_x, test_x = _data()
    metric = LowRank(n_reference=10, damping=0.05, projection_dim=6, online=online).fit(model, batches)
    refs, tests = _naive_grads(model, fit_x), _naive_grads(model, test_x)
    expected = []
    for n, s in tests.items():
        sketch = metric.layers[n].sketch
        delta = 0.05 * float(refs[n].square().sum(1).mean()) / s.shape[1]
        assert (sketch is not None) == (s.shape[1] > 6)
        p = torch.eye(s.shape[1], dtype=torch.float64) if sketch is None else _sketch_matrix(sketch)
        expected.append(_quadratic(_dense_low_rank(refs[n] @ p.T, delta), s @ p.T))
    torch.testing.assert_close(_scores(model, test_x, metric, "func"), torch.stack(expected, 1))


@pytest.mark.parametrize("cls", [LayerScalar, FittedDiagonal, LowRank])
def test_true_fisher_uses_model_samples(cls: type[FittedMetric]) -> None:
    torch.manual_seed(0)
    model = SampledFlow(3).double()
    options = {"n_reference": 9} if cls is LowRank else {"n_samples": 9}
    rng = torch.get_rng_state()
    metric = cls(fisher="true", batch_size=4, seed=7, **options).fit(model)
    assert torch.equal(torch.get_rng_state(), rng)  # the global random stream is untouched
    samples = torch.cat(list(fisher_inputs(model, None, "true", 9, batch_size=4, seed=7)))
    assert samples.shape == (9, 3)
    reference = cls(fisher="empirical", **options).fit(model, [samples])
    x = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(_scores(model, x, metric, "loop"), _scores(model, x, reference, "loop"))
    with pytest.raises(ValueError, match="needs data"):
        cls(**options).fit(model)


def test_online_sherman_morrison_equals_batch_woodbury_float32() -> None:
    torch.manual_seed(0)
    model = MLPEnergy(4, [16], "tanh", bias=True)  # float32 gradients: both forms work in float64
    data = [torch.randn(20, 4), torch.randn(20, 4)]
    x = torch.randn(16, 4)
    for projection in (None, 12):
        batch = LowRank(n_reference=30, projection_dim=projection).fit(model, data)
        online = LowRank(n_reference=30, projection_dim=projection, online=True).fit(model, data)
        expected = _scores(model, x, batch, "func")
        assert expected.dtype == torch.float32
        torch.testing.assert_close(_scores(model, x, online, "hooks"), expected, rtol=1e-5, atol=0)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 12),
    m=st.integers(1, 10),
    log_delta=st.floats(-4, 2),
    log_scale=st.floats(-3, 3),
    seed=st.integers(0, 2**16),
)
def test_woodbury_and_sherman_morrison_equal_explicit_inverse(
    n: int, m: int, log_delta: float, log_scale: float, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    refs = 10**log_scale * torch.randn(n, m, generator=g, dtype=torch.float64)
    scored = torch.cat([refs[:2], 10**log_scale * torch.randn(5, m, generator=g, dtype=torch.float64)])
    delta = 10**log_delta * 10 ** (2 * log_scale)
    expected = _quadratic(_dense_low_rank(refs, delta), scored)
    inverse = _SequentialInverse(n, delta, m, torch.device("cpu"))
    inverse.update(refs)
    online = _woodbury(refs, delta, None)
    online.refs = online.cholesky = None
    online.inverse = inverse.inverse()
    for layer in (_woodbury(refs, delta, None), online):
        torch.testing.assert_close(layer.squared_norms(scored), expected, rtol=1e-6, atol=0)


def test_count_sketch_preserves_inner_products_in_expectation() -> None:
    g = torch.Generator().manual_seed(0)
    d, r, trials = 40, 8, 4000
    x, y = torch.randn(2, d, generator=g, dtype=torch.float64)
    products = []
    for _ in range(trials):
        sketch = CountSketch.draw(d, r, g)
        px, py = sketch(torch.stack([x, y]))
        products.append(px @ py)
    products_t = torch.stack(products)
    exact = x @ y
    # Var⟨Px, Py⟩ = (||x||²||y||² + ⟨x,y⟩² − 2 Σ x_j² y_j²) / r for a count sketch
    variance = (x.square().sum() * y.square().sum() + exact**2 - 2 * (x * y).square().sum()) / r
    assert abs(products_t.mean() - exact) < 4 * math.sqrt(variance / trials)
    assert products_t.var() == pytest.approx(float(variance), rel=0.15)


def test_count_sketch_approximates_the_unsketched_metric() -> None:
    """With r well above N, the sketched norm of a 1024-coordinate layer is close to the exact one."""
    torch.manual_seed(0)
    model = MLPEnergy(32, [32], "tanh", bias=True)
    data = [torch.randn(8, 32)]
    x = torch.randn(64, 32)
    exact = _scores(model, x, LowRank(n_reference=8, damping=0.1).fit(model, data), "func")
    errors = []
    for seed in range(4):
        sketched = LowRank(n_reference=8, damping=0.1, projection_dim=512, seed=seed).fit(model, data)
        approx = _scores(model, x, sketched, "func")
        assert sketched.layers["layers.0.weight"].sketch is not None
        torch.testing.assert_close(approx[:, 1:], exact[:, 1:])  # layers of at most 512: exact
        errors.append(((approx[:, 0] - exact[:, 0]).abs() / exact[:, 0]).mean())
    assert float(torch.stack(errors).mean()) < 0.1


@pytest.mark.parametrize(
    "metric",
    [
        LayerScalar(n_samples=10),
        FittedDiagonal(n_samples=10, relative_damping=False),
        LowRank(n_reference=10, projection_dim=5, seed=3),
        LowRank(n_reference=10, projection_dim=5, online=True),
    ],
    ids=["layer_scalar", "diagonal", "low_rank", "low_rank_online"],
)
def test_state_dict_round_trip(metric: FittedMetric) -> None:
    model = _mlp()
    batches, _, test_x = _data()
    metric.fit(model, batches)
    buffer = io.BytesIO()
    torch.save(metric.state_dict(), buffer)
    buffer.seek(0)
    restored = type(metric)()
    assert not restored.fitted
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.fitted and restored.options() == metric.options()
    torch.testing.assert_close(
        _scores(model, test_x, restored, "func"), _scores(model, test_x, metric, "func")
    )


@pytest.mark.parametrize("cls", [LayerScalar, FittedDiagonal, LowRank])
def test_relative_damping_is_scale_free(cls: type[FittedMetric]) -> None:
    """Scaling the log-likelihood by c scales gradients by c and F by c²: the metric must not change."""
    model = _mlp()
    batches, _, test_x = _data()
    base = cls().fit(model, batches)
    scaled = cls().fit(model, batches, log_likelihood=lambda x: 1e3 * model.log_likelihood(x))
    s = per_sample_layer_norms(
        model, test_x, metric=scaled, log_likelihood=lambda x: 1e3 * model.log_likelihood(x)
    )
    torch.testing.assert_close(s.values, _scores(model, test_x, base, "func"))


@pytest.mark.parametrize("cls", [FittedDiagonal, LowRank])
def test_large_absolute_damping_tends_to_scaled_identity(cls: type[FittedMetric]) -> None:
    model = _mlp()
    batches, _, test_x = _data()
    metric = cls(damping=1e8, relative_damping=False).fit(model, batches)
    plain = _scores(model, test_x, "identity", "func")
    torch.testing.assert_close(_scores(model, test_x, metric, "func") * 1e8, plain, rtol=1e-5, atol=0)


def test_zero_gradient_layer_gets_unit_scale() -> None:
    model = WithUnused().double()
    batches, _, test_x = _data()
    with pytest.warns(UserWarning, match="unused"):
        metric = LayerScalar().fit(model, batches)
    assert metric.inverse_diagonal("unused") == 1.0
    with pytest.warns(UserWarning, match="unused"):
        low_rank = LowRank().fit(model, batches)
    assert torch.isfinite(_scores(model, test_x, low_rank, "loop")).all()


def test_statistics_are_reduced_once_over_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ranks with the same shard sum to twice the statistics and counts: the same metric."""
    model = _mlp()
    batches, _, test_x = _data()
    calls = []

    def two_ranks(t: Tensor) -> Tensor:
        calls.append(t.shape)
        return 2 * t

    single = [LayerScalar().fit(model, batches), FittedDiagonal().fit(model, batches)]
    monkeypatch.setattr(fimcb.metrics.base, "all_reduce_sum", two_ranks)
    parallel = [LayerScalar().fit(model, batches), FittedDiagonal().fit(model, batches)]
    assert len(calls) == 2
    for a, b in zip(single, parallel, strict=True):
        torch.testing.assert_close(_scores(model, test_x, b, "func"), _scores(model, test_x, a, "func"))


@pytest.mark.parametrize("cls", [LayerScalar, FittedDiagonal, LowRank])
def test_scoring_errors(cls: type[FittedMetric]) -> None:
    model = _mlp()
    metric = cls()
    assert not metric.fitted
    with pytest.raises(RuntimeError, match="not fitted"):
        metric.squared_norms("layers.0.weight", torch.zeros(2, 4, 3))
    metric.fit(model, _data()[0])
    assert metric.fitted
    with pytest.raises(KeyError, match="not fitted on parameter 'other'"):
        metric.squared_norms("other", torch.zeros(2, 4))


@pytest.mark.parametrize(
    ("cls", "options", "match"),
    [
        (LayerScalar, {"fisher": "model"}, "fisher must be"),
        (LayerScalar, {"n_samples": 0}, "n_samples"),
        (LayerScalar, {"batch_size": 2.5}, "batch_size"),
        (LayerScalar, {"seed": "a"}, "seed"),
        (FittedDiagonal, {"damping": 0}, "damping"),
        (FittedDiagonal, {"relative_damping": "yes"}, "relative_damping"),
        (LowRank, {"n_reference": -1}, "n_reference"),
        (LowRank, {"projection_dim": 0}, "projection_dim"),
        (LowRank, {"online": 1}, "online"),
        (LowRank, {"damping": float("inf")}, "damping"),
    ],
)
def test_invalid_options(cls: type[FittedMetric], options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cls(**options)


def test_online_fit_errors() -> None:
    model = MLPEnergy(65, [64], "tanh", bias=False)  # a 4160-coordinate layer
    with pytest.raises(ValueError, match="projection_dim"):
        LowRank(online=True).fit(model, [torch.randn(2, 65)])
    small = _mlp()
    once = (b for b in _data()[0])  # a generator: empty on the second pass
    with pytest.raises(ValueError, match="same samples each time"):
        LowRank(online=True).fit(small, once)
    assert ONLINE_MAX_DIM < 4160


@pytest.mark.parametrize(
    "metric",
    [LayerScalar(), FittedDiagonal(), LowRank(projection_dim=20)],
    ids=["layer_scalar", "diagonal", "low_rank"],
)
def test_float32_engines_agree(metric: FittedMetric) -> None:
    """In float32, the hooks engine's shortcuts (ghost norms, diagonal weights) agree with the others."""
    torch.manual_seed(0)
    model = MLPEnergy(5, [6, 4], "tanh", bias=True)
    metric.fit(model, [torch.randn(30, 5)])
    x = torch.randn(9, 5)
    expected = _scores(model, x, metric, "loop")
    assert expected.dtype == torch.float32
    for engine in ("func", "hooks"):
        torch.testing.assert_close(_scores(model, x, metric, engine), expected, rtol=1e-4, atol=1e-6)
