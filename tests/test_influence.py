"""FIM inner products ``s_aᵀ F⁻¹ s_b``: every metric's ``inner_products`` against explicit dense float64
``F_l⁻¹`` built from per-sample autograd gradients, ``influence`` against a naive double loop over
(query, data sample) pairs, and ``top_influences`` against sorting by hand."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_kfac import damped, reference
from test_metrics import _data, _dense_low_rank, _naive_grads, _sketch_matrix
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from toy_models import MLPEnergy

from fimcb.attribution.influence import Influences, TopInfluences, influence, top_influences
from fimcb.core.metric import polarised_inner_products
from fimcb.metrics import KFAC, FittedDiagonal, LayerScalar, LowRank, Metric, resolve_metric

DAMPING = 0.05
F64 = torch.float64
METRICS = {
    "identity": lambda: resolve_metric("identity"),
    "layer_scalar": lambda: LayerScalar(n_samples=10),
    "diagonal": lambda: FittedDiagonal(damping=DAMPING, n_samples=10),
    "kfac": lambda: KFAC(damping=DAMPING, n_samples=10),
    "low_rank": lambda: LowRank(n_reference=10, damping=DAMPING),
    "low_rank_online": lambda: LowRank(n_reference=10, damping=DAMPING, online=True),
    "low_rank_sketched": lambda: LowRank(n_reference=10, damping=DAMPING, projection_dim=6),
}


class GainedMLP(MLPEnergy):
    """An MLP energy (Linear layers: Kronecker-factored) behind an input gain (a K-FAC fallback)."""

    def __init__(self) -> None:
        super().__init__(3, [4], "tanh", bias=True)
        self.gain = nn.Parameter(1 + 0.3 * torch.randn(3))

    def log_likelihood(self, x: Tensor) -> Tensor:
        return super().log_likelihood(x * self.gain)


def _model() -> GainedMLP:
    torch.manual_seed(3)
    return GainedMLP().double()


def _fitted(kind: str) -> tuple[GainedMLP, Metric, dict[str, Tensor], Tensor]:
    """A model, the metric ``kind`` fitted on the first 10 samples of ``_data()``, the dense ``F_l⁻¹``
    ``[d, d]`` of every parameter (flattened row-major) and test inputs."""
    model = _model()
    batches, fit_x, test_x = _data()
    metric = METRICS[kind]().fit(model, batches)
    return model, metric, _dense_inverses(kind, metric, model, fit_x), test_x


def _dense_inverses(kind: str, metric: Metric, model: nn.Module, fit_x: Tensor) -> dict[str, Tensor]:
    """``F_l⁻¹`` per parameter from the reference gradients of ``fit_x``, by explicit inversion."""
    refs = _naive_grads(model, fit_x)
    if kind == "kfac":
        owners = {n: (n.rsplit(".", 1)[0],) for n in refs if n != "gain"}
        assert set(metric.kronecker_factored) == set(owners)
        factors = reference(model, [fit_x], owners)
    inverses = {}
    for name, r in refs.items():
        d = r.shape[1]
        eye = torch.eye(d, dtype=F64)
        mean_diagonal = float(r.square().sum(1).mean()) / d
        if kind == "identity":
            fisher = eye
        elif kind == "diagonal":
            diag = r.square().mean(0)
            fisher = torch.diag(diag + DAMPING * diag.mean())
        elif kind.startswith("low_rank"):
            sketch = metric.layers[name].sketch
            p = eye if sketch is None else _sketch_matrix(sketch)
            inner = torch.linalg.inv(_dense_low_rank(r @ p.T, DAMPING * mean_diagonal))
            inverses[name] = p.T @ inner @ p  # sᵀPᵀ(δI + (1/N) Σ P s_i s_iᵀ Pᵀ)⁻¹Ps
            continue
        elif kind == "kfac" and name in owners:
            layer = owners[name]
            a = factors.a[layer].double() if not name.endswith("bias") else torch.ones(1, 1, dtype=F64)
            a_d, g_d = damped(a, factors.g[layer].double(), DAMPING)
            fisher = torch.kron(g_d, a_d)  # row-major vec: G ⊗ A (a bias: an input fixed at 1)
        else:  # layer_scalar, and K-FAC's fallback
            fisher = mean_diagonal * eye
        inverses[name] = torch.linalg.inv(fisher)
    return inverses


def _shaped(model: nn.Module, flat: dict[str, Tensor]) -> dict[str, Tensor]:
    """Flattened ``[N, d]`` gradients reshaped to ``[N, *param.shape]``."""
    shapes = dict(model.named_parameters())
    return {n: g.reshape(g.shape[0], *shapes[n].shape) for n, g in flat.items()}


# ---------------------------------------------------------------- metric inner products


@pytest.mark.parametrize("kind", list(METRICS))
def test_inner_products_match_dense_inverse(kind: str) -> None:
    model, metric, inverses, test_x = _fitted(kind)
    if kind == "low_rank_sketched":
        assert metric.layers["layers.0.weight"].sketch is not None  # 12 coordinates > 6
    a_flat, b_flat = _naive_grads(model, test_x), _naive_grads(model, _data()[1][:5])
    a, b = _shaped(model, a_flat), _shaped(model, b_flat)
    for name, inverse in inverses.items():
        got = metric.inner_products(name, a[name], b[name])
        assert got.shape == (7, 5) and got.dtype == F64
        torch.testing.assert_close(got, a_flat[name] @ inverse @ b_flat[name].T, msg=name)
        torch.testing.assert_close(metric.inner_products(name, b[name], a[name]), got.T)  # symmetric
        torch.testing.assert_close(polarised_inner_products(metric, name, a[name], b[name]), got)
        squared_norms = metric.squared_norms(name, a[name])
        torch.testing.assert_close(squared_norms, ((a_flat[name] @ inverse) * a_flat[name]).sum(1))
        torch.testing.assert_close(metric.inner_products(name, a[name], a[name]).diagonal(), squared_norms)


class DenseMetric(Metric):
    """A metric given by explicit ``F_l⁻¹`` matrices, with squared norms only: uses the polarisation."""

    name = "dense"

    def __init__(self, inverses: dict[str, Tensor]) -> None:
        self.inverses = inverses

    def squared_norms(self, name: str, grads: Tensor) -> Tensor:
        flat = grads.flatten(start_dim=1)
        return ((flat @ self.inverses[name]) * flat).sum(1)


@pytest.mark.parametrize("chunk_elements", [1, 7, 1 << 22])
def test_polarisation_default_is_exact_for_any_chunking(chunk_elements: int) -> None:
    g = torch.Generator().manual_seed(0)
    root = torch.randn(6, 6, generator=g, dtype=F64)
    inverse = root @ root.T + 0.1 * torch.eye(6, dtype=F64)
    metric = DenseMetric({"w": inverse})
    a, b = torch.randn(4, 2, 3, generator=g, dtype=F64), torch.randn(5, 2, 3, generator=g, dtype=F64)
    expected = a.flatten(1) @ inverse @ b.flatten(1).T
    got = polarised_inner_products(metric, "w", a, b, chunk_elements=chunk_elements)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(metric.inner_products("w", a, b), expected)  # the default of Metric
    assert polarised_inner_products(metric, "w", a[:0], b).shape == (0, 5)


def test_inner_products_promote_dtypes_and_check_shapes() -> None:
    model, metric, _, test_x = _fitted("diagonal")
    a = _shaped(model, _naive_grads(model, test_x))["layers.0.weight"]
    got = metric.inner_products("layers.0.weight", a.float(), a)
    assert got.dtype == F64
    with pytest.raises(ValueError, match="one parameter shape"):
        metric.inner_products("layers.0.weight", a, a[:, :2])
    with pytest.raises(RuntimeError, match="not fitted"):
        FittedDiagonal().inner_products("layers.0.weight", a, a)
    with pytest.raises(KeyError, match="not fitted on parameter"):
        metric.inner_products("other", a, a)


# ---------------------------------------------------------------- influence


def _naive_influence(model: nn.Module, queries: Tensor, data: Tensor, inverses: dict[str, Tensor]) -> Tensor:
    """Double loop over (query, data sample): one ``autograd.grad`` per sample of each pair."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def gradient(x: Tensor) -> tuple[Tensor, ...]:
        return torch.autograd.grad(model.log_likelihood(x[None]).sum(), list(params.values()))

    out = torch.zeros(len(queries), len(data), dtype=F64)
    for i, q in enumerate(queries):
        for j, x in enumerate(data):
            pairs = zip(params, gradient(q), gradient(x), strict=True)
            out[i, j] = sum(gq.flatten() @ inverses[n] @ gx.flatten() for n, gq, gx in pairs)
    return out


@pytest.mark.parametrize("kind", ["identity", "layer_scalar", "diagonal", "kfac", "low_rank"])
def test_influence_matches_naive_double_loop(kind: str) -> None:
    model, metric, inverses, test_x = _fitted(kind)
    queries, data = test_x[:3], _data()[1]
    expected = _naive_influence(model, queries, data, inverses)
    got = influence(model, queries, data, metric=metric).values
    assert got.shape == (3, 10)
    torch.testing.assert_close(got, expected)
    # normalised: the cosine in the metric, with the norms of the same dense reference
    norms = [torch.diagonal(_naive_influence(model, x, x, inverses)) for x in (queries, data)]
    cosine = influence(model, queries, data, metric=metric, normalize=True).values
    torch.testing.assert_close(cosine, expected / (norms[0][:, None] * norms[1][None, :]).sqrt())


def test_data_as_tensor_loader_and_chunks_agree() -> None:
    model, metric, _, test_x = _fitted("kfac")
    data = torch.cat([_data()[1], test_x])
    expected = influence(model, test_x[:4], data, metric=metric).values
    ids = torch.arange(100, 100 + len(data))
    loader = DataLoader(TensorDataset(data, torch.zeros(len(data)), ids), batch_size=4)
    dicts = [{"x": data[:7], "id": ids[:7]}, {"x": data[7:7]}, {"x": data[7:], "id": ids[7:]}]  # one empty
    for source, source_ids in ((loader, ids), (dicts, ids), ([data[:5], data[5:]], torch.arange(len(data)))):
        found = influence(model, test_x[:4], source, metric=metric)
        torch.testing.assert_close(found.values, expected)
        assert torch.equal(found.ids, source_ids)
    for chunk_size in (1, 3):
        torch.testing.assert_close(
            influence(model, test_x[:4], loader, metric=metric, chunk_size=chunk_size).values, expected
        )


@pytest.mark.parametrize("kind", ["identity", "diagonal", "low_rank"])
def test_normalized_influence_is_a_cosine(kind: str) -> None:
    model, metric, _, _ = _fitted(kind)
    data = _data()[1]
    cosine = influence(model, data[:4], data, metric=metric, normalize=True, chunk_size=3).values
    assert ((cosine >= -1) & (cosine <= 1)).all()
    torch.testing.assert_close(cosine[:, :4].diagonal(), torch.ones(4, dtype=F64))
    assert (cosine[:, 4:] < 1 - 1e-6).all()  # other samples point elsewhere


def test_normalized_influence_of_a_zero_gradient_is_zero() -> None:
    torch.manual_seed(0)
    model = MLPEnergy(3, [4], "tanh", bias=False).double()  # x = 0: every activation and gradient is 0
    x = torch.cat([torch.zeros(1, 3, dtype=F64), torch.randn(4, 3, dtype=F64)])
    assert influence(model, x, x).values.abs()[0].max() == 0
    cosine = influence(model, x, x, normalize=True).values
    assert cosine.isfinite().all() and cosine[0].abs().max() == 0 and cosine[:, 0].abs().max() == 0
    torch.testing.assert_close(cosine[1:, 1:].diagonal(), torch.ones(4, dtype=F64))


def test_influence_defaults_to_identity_and_keeps_float32() -> None:
    torch.manual_seed(0)
    model = MLPEnergy(3, [4], "tanh", bias=True)
    x = torch.randn(6, 3)
    got = influence(model, x[:2], x).values
    assert got.dtype == torch.float32
    x, model = x.double(), model.double()
    expected = _naive_influence(model, x[:2], x, _dense_inverses("identity", resolve_metric(None), model, x))
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_influence_errors() -> None:
    model, metric, _, test_x = _fitted("diagonal")
    with pytest.raises(RuntimeError, match="not fitted"):
        influence(model, test_x, test_x, metric=FittedDiagonal())
    with pytest.raises(ValueError, match="no samples"):
        influence(model, test_x, [], metric=metric)
    with pytest.raises(ValueError, match="empty batch"):
        influence(model, test_x, test_x[:0], metric=metric)
    with pytest.raises(ValueError, match="queries is an empty batch"):
        influence(model, test_x[:0], test_x, metric=metric)
    bad = test_x.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="queries contain NaN"):
        influence(model, bad, test_x, metric=metric)
    with pytest.raises(ValueError, match="data batch contain NaN"):
        influence(model, test_x, [test_x, bad], metric=metric)
    with pytest.raises(ValueError, match="chunk_size"):
        influence(model, test_x, test_x, metric=metric, chunk_size=0)
    with pytest.raises(ValueError, match="batched tensor"):
        influence(model, [1.0, 2.0], test_x, metric=metric)


# ---------------------------------------------------------------- top influences


def test_top_influences_match_sorting_by_hand() -> None:
    values = torch.randn(4, 9, generator=torch.Generator().manual_seed(1), dtype=F64)
    ids = torch.tensor([10 * j + 7 for j in range(9)])
    result = Influences(values, ids).top(3)
    assert isinstance(result, TopInfluences)
    for q, row in enumerate(values.tolist()):
        order = sorted(range(9), key=lambda j, row=row: row[j])
        assert result.top.columns[q].tolist() == order[::-1][:3]
        assert result.top.ids[q].tolist() == [ids[j] for j in order[::-1][:3]]
        assert result.bottom.ids[q].tolist() == [ids[j] for j in order[:3]]
        assert result.top.values[q].tolist() == [row[j] for j in order[::-1][:3]]
        assert result.bottom.values[q].tolist() == [row[j] for j in order[:3]]
    every = top_influences(Influences(values, torch.arange(9)), 20)  # k > N: clamped, every column ranked
    expected = torch.sort(values, dim=1, descending=True)
    assert torch.equal(every.top.values, expected.values) and torch.equal(every.top.ids, expected.indices)
    assert torch.equal(every.bottom.columns, expected.indices.flip(1))
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.top = every.top  # type: ignore[misc]


def test_influences_carry_the_ids_of_a_shuffled_loader() -> None:
    """The columns name the samples the loader gave, in its (shuffled) order: ranking by id picks the
    same training samples as ranking a fixed-order pass."""
    model = _model()
    data = torch.randn(24, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    dataset = TensorDataset(data, torch.zeros(len(data)), torch.arange(100, 124))
    shuffled = DataLoader(dataset, batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(3))
    queries = data[:3]
    fixed = influence(model, queries, data)
    mixed = influence(model, queries, shuffled)
    assert sorted(mixed.ids.tolist()) == list(range(100, 124)) and mixed.ids.tolist() != sorted(mixed.ids)
    torch.testing.assert_close(mixed.values[:, mixed.ids.argsort()], fixed.values)
    assert torch.equal(fixed.ids, torch.arange(24))  # a bare tensor: running positions
    best = mixed.top(4)
    assert torch.equal(best.top.ids - 100, fixed.top(4).top.ids)
    with pytest.raises(ValueError, match="some data batches carry sample ids"):
        influence(model, queries, [data[:4], (data[4:8], None, torch.arange(4))])


@pytest.mark.parametrize(
    ("values", "ids", "k", "match"),
    [
        (torch.zeros(3), torch.arange(3), 1, r"\[Q, N\]"),
        (torch.zeros(2, 0), torch.arange(0), 1, r"\[Q, N\]"),
        (torch.tensor([[0.0, float("nan")]]), torch.arange(2), 1, "NaN"),
        (torch.zeros(2, 3), torch.arange(3), 0, "positive integer"),
        (torch.zeros(2, 3), torch.arange(4), 1, "one id per column"),
    ],
)
def test_top_influences_errors(values: Tensor, ids: Tensor, k: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Influences(values, ids).top(k)
