"""K-FAC metric against explicit references: factors from per-sample loops, norms from dense
``(A_d ⊗ G_d)⁻¹`` in float64, layer-scalar fallbacks, Fisher sources, state and errors."""

from __future__ import annotations

import copy
import io
import itertools
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from toy_models import CustomLayerModel, InPlaceReLU, LinearFlow, MLPEnergy, SequenceZoo, TiedModel

from fimcb.engine import per_sample_layer_norms
from fimcb.metrics.kfac import KFAC

ENGINES = ("loop", "func", "hooks")
Layer = tuple[str, ...]


class SeqModel(nn.Module):
    """Linear layers over ``[B, T, d]`` sequences, one of them called twice, and a LayerNorm."""

    def __init__(self, dim: int = 3, hidden: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(dim, hidden)
        self.mid = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim, bias=False)

    def log_likelihood(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.mid(torch.tanh(self.mid(self.norm(self.inp(x))))))
        return -0.5 * (self.out(h) - x).pow(2).sum((1, 2))


class ConvModel(nn.Module):
    """Conv2d with stride and padding, Conv2d with asymmetric 'same' reflect padding, a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(3, 2, 2, padding="same", padding_mode="reflect", bias=False)
        self.head = nn.Linear(2, 1)

    def log_likelihood(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.c2(torch.tanh(self.c1(x)))).mean((2, 3))
        return self.head(h).squeeze(1) - 0.5 * x.flatten(1).pow(2).sum(1)


class LinearGaussian(nn.Module):
    """``u ~ N(0, diag(scale²))``, ``v | u ~ N(W u + b, I)``: the Fisher of ``W`` is exactly
    ``I ⊗ diag(scale²)`` (row-major), ``A ⊗ G`` with ``A = E[u uᵀ]``, ``G = E[ε εᵀ] = I``."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.register_buffer("scale", torch.tensor([0.5, 1.0, 2.0]))

    def log_likelihood(self, x: Tensor) -> Tensor:
        u, v = x[:, :3], x[:, 3:]
        return -0.5 * (v - self.linear(u)).pow(2).sum(1) - 0.5 * (u / self.scale).pow(2).sum(1)

    def sample(self, n: int) -> Tensor:
        u = torch.randn(n, 3, dtype=self.scale.dtype) * self.scale
        return torch.cat([u, self.linear(u) + torch.randn(n, 2, dtype=u.dtype)], dim=1)


# ---------------------------------------------------------------- independent references


def naive_patches(conv: nn.Conv1d | nn.Conv2d, x: Tensor) -> Tensor:
    """``[T, C·k]`` input patches of one unbatched sample ``x`` ``[C, *spatial]``, by slicing."""
    k, s, d = conv.kernel_size, conv.stride, conv.dilation
    if conv.padding == "same":
        pads = [(di * (ki - 1) // 2, di * (ki - 1) - di * (ki - 1) // 2) for ki, di in zip(k, d, strict=True)]
    else:
        pads = [(p, p) for p in conv.padding]
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x, [v for pair in reversed(pads) for v in pair], mode=mode)
    sizes = [(xp.shape[1 + i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(len(k))]
    rows = []
    for pos in itertools.product(*map(range, sizes)):
        index = tuple(slice(p * s[i], p * s[i] + d[i] * (k[i] - 1) + 1, d[i]) for i, p in enumerate(pos))
        rows.append(xp[(slice(None), *index)].reshape(-1))
    return torch.stack(rows)


def rows_of(module: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``(a_t, g_t)`` rows of one call on one sample (``x`` input, ``y`` output gradient)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, module.in_features), y.reshape(-1, module.out_features)
    return naive_patches(module, x[0]), y[0].reshape(y.shape[1], -1).T


@dataclass
class Reference:
    """Expected factors per layer and per-sample gradients per trainable parameter, in float64."""

    a: dict[Layer, Tensor]
    g: dict[Layer, Tensor]
    grads: dict[str, Tensor]


def reference(model: nn.Module, batches: list[Tensor], owners: dict[str, Layer]) -> Reference:
    """One backward per sample; ``A = mean_n (1/R_n) Σ a aᵀ``, ``G = mean_n Σ g gᵀ`` over each layer's
    calls; checks that ``Σ_t g_t a_tᵀ`` over a layer's calls is autograd's weight gradient."""
    model.eval()
    modules = dict(model.named_modules())
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    layers = set(owners.values())
    a = {layer: 0.0 for layer in layers}
    g = {layer: 0.0 for layer in layers}
    grads: dict[str, list[Tensor]] = {n: [] for n in params}
    count = 0
    for x in batches:
        for xn in x:
            calls: list[tuple[str, Tensor, Tensor]] = []
            handles = [
                modules[m].register_forward_hook(
                    lambda mod, i, o, m=m, calls=calls: calls.append((m, i[0], o))
                )
                for m in {m for layer in layers for m in layer}
            ]
            ll = model.log_likelihood(xn.unsqueeze(0)).sum()
            for h in handles:
                h.remove()
            out = torch.autograd.grad(ll, [c[2] for c in calls] + list(params.values()), allow_unused=True)
            for name, gp in zip(params, out[len(calls) :], strict=True):
                grads[name].append(torch.zeros_like(params[name]) if gp is None else gp)
            rows = [
                (m, *rows_of(modules[m], i.detach(), gy)) for (m, i, _), gy in zip(calls, out, strict=False)
            ]
            for layer in layers:
                mine = [(ar, gr) for m, ar, gr in rows if m in layer]
                total = sum(ar.shape[0] for ar, _ in mine)
                a[layer] = a[layer] + sum(ar.T @ ar for ar, _ in mine) / total
                g[layer] = g[layer] + sum(gr.T @ gr for _, gr in mine)
            for name, layer in owners.items():  # the rows are right: they rebuild the weight gradient
                if grads[name][-1].ndim > 1:
                    s = sum(gr.T @ ar for m, ar, gr in rows if m in layer)
                    torch.testing.assert_close(s.reshape(grads[name][-1].shape), grads[name][-1])
            count += 1
    return Reference(
        a={k: v / count for k, v in a.items()},
        g={k: v / count for k, v in g.items()},
        grads={n: torch.stack(v).detach() for n, v in grads.items()},
    )


def damped(a: Tensor, g: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """``A + π√δ I`` and ``G + (√δ/π) I`` with ``π = sqrt((tr A / dim A) / (tr G / dim G))``."""
    pi = math.sqrt((a.trace() / a.shape[0]) / (g.trace() / g.shape[0]))
    eye_a, eye_g = torch.eye(a.shape[0], dtype=a.dtype), torch.eye(g.shape[0], dtype=g.dtype)
    return a + pi * math.sqrt(damping) * eye_a, g + math.sqrt(damping) / pi * eye_g


def expected_norms(ref: Reference, scores: Reference, owners: dict[str, Layer], damping: float) -> Tensor:
    """``[N, L]`` dense-reference norms of ``scores``' per-sample gradients under factors from ``ref``."""
    columns = []
    for name, s in scores.grads.items():
        s = s.double()
        if name not in owners:  # layer-scalar: λ = E||s||² / d on the fit samples
            lam = ref.grads[name].double().flatten(1).pow(2).sum(1).mean() / ref.grads[name][0].numel()
            columns.append(s.flatten(1).pow(2).sum(1) / lam)
            continue
        g = ref.g[owners[name]].double()
        if s.ndim == 2:  # bias: an input fixed at 1, A = 1 (its own π): bᵀ (A_d ⊗ G_d)⁻¹ b
            a_d, g_d = damped(torch.ones(1, 1, dtype=g.dtype), g, damping)
            columns.append((s * torch.linalg.solve(g_d, s.T).T).sum(1) / a_d[0, 0])
            continue
        a_d, g_d = damped(ref.a[owners[name]].double(), g, damping)
        flat = s.reshape(s.shape[0], -1)  # row-major vec of S [out, in·k]: the block is G ⊗ A
        dense = torch.kron(g_d, a_d)
        columns.append((flat * torch.linalg.solve(dense, flat.T).T).sum(1))
    return torch.stack(columns, dim=1)


def fitted(model: nn.Module, batches: list[Tensor], damping: float = 1e-3) -> KFAC:
    return KFAC(damping=damping, n_samples=sum(len(b) for b in batches)).fit(model, batches)


def check_model(model: nn.Module, batches: list[Tensor], score: Tensor, owners: dict[str, Layer]) -> None:
    kfac = fitted(model, batches)
    assert set(kfac.kronecker_factored) == set(owners)
    ref = reference(model, batches, owners)
    for name, layer in owners.items():
        a, g = kfac.factors(name)
        want_a = ref.a[layer].double() if not name.endswith("bias") else torch.ones(1, 1, dtype=torch.float64)
        torch.testing.assert_close(a.double(), want_a, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(g.double(), ref.g[layer].double(), rtol=1e-8, atol=1e-10)
    expected = expected_norms(ref, reference(model, [score], owners), owners, kfac.damping)
    for engine in ENGINES:
        got = per_sample_layer_norms(model, score, metric=kfac, engine=engine)
        assert got.names == tuple(n for n, p in model.named_parameters() if p.requires_grad)
        torch.testing.assert_close(got.values, expected, rtol=1e-7, atol=1e-9, msg=engine)


# ---------------------------------------------------------------- factors and norms


def test_linear_with_sequence_dims_and_repeated_calls() -> None:
    model = SeqModel().double()
    # batches of different sequence lengths: A averages over each sample's own positions
    batches = [torch.randn(3, 5, 3, dtype=torch.float64), torch.randn(4, 2, 3, dtype=torch.float64)]
    owners = {
        "inp.weight": ("inp",),
        "inp.bias": ("inp",),
        "mid.weight": ("mid",),
        "mid.bias": ("mid",),
        "out.weight": ("out",),
    }
    check_model(model, batches, torch.randn(4, 3, 3, dtype=torch.float64), owners)


def test_conv2d_stride_padding_and_reflect_same() -> None:
    model = ConvModel().double()
    batches = [torch.randn(5, 2, 5, 6, dtype=torch.float64)]
    owners = {
        n: (n.split(".")[0],) for n in ("c1.weight", "c1.bias", "c2.weight", "head.weight", "head.bias")
    }
    check_model(model, batches, torch.randn(3, 2, 5, 6, dtype=torch.float64), owners)


def test_conv1d_sequence_model_with_fallbacks() -> None:
    model = SequenceZoo().double().eval()
    batches = [torch.randint(0, 6, (4, 7)), torch.randint(0, 6, (3, 7))]
    owners = {n: (n.split(".")[0],) for n in ("conv.weight", "conv.bias", "out.weight", "out.bias")}
    check_model(model, batches, torch.randint(0, 6, (3, 7)), owners)


def test_shared_weight_sums_both_modules_and_biases_stay_apart() -> None:
    model = TiedModel(dim=3).double()
    owners = {"first.weight": ("first", "second"), "first.bias": ("first",), "second.bias": ("second",)}
    check_model(
        model, [torch.randn(6, 3, dtype=torch.float64)], torch.randn(3, 3, dtype=torch.float64), owners
    )


@settings(max_examples=8, deadline=None)
@given(
    widths=st.lists(st.integers(1, 4), min_size=1, max_size=2),
    activation=st.sampled_from(["tanh", "gelu"]),
    bias=st.booleans(),
    damping=st.floats(1e-4, 1.0),
)
def test_mlp_matches_dense_reference(widths: list[int], activation: str, bias: bool, damping: float) -> None:
    torch.manual_seed(1)
    model = MLPEnergy(3, widths, activation, bias).double()
    batch = torch.randn(6, 3, dtype=torch.float64)
    owners = {n: (n.rsplit(".", 1)[0],) for n, _ in model.named_parameters()}
    kfac = fitted(model, [batch], damping)
    ref = reference(model, [batch], owners)
    score = torch.randn(3, 3, dtype=torch.float64)
    got = per_sample_layer_norms(model, score, metric=kfac, engine="func").values
    torch.testing.assert_close(got, expected_norms(ref, reference(model, [score], owners), owners, damping))


def test_float32_model_and_in_place_activation() -> None:
    """Float32 factors stay in float32; an in-place ReLU after a conv does not spoil G."""
    model = InPlaceReLU()
    x = torch.randn(6, 1, 5, 5)
    model.log_likelihood(x)  # materialise the LazyLinear
    plain = copy.deepcopy(model)
    plain.net[1] = nn.ReLU()
    kfac, ref = fitted(model, [x]), fitted(plain, [x])
    assert set(kfac.kronecker_factored) == {"net.0.weight", "net.0.bias", "net.3.weight", "net.3.bias"}
    for name in kfac.kronecker_factored:
        for got, want in zip(kfac.factors(name), ref.factors(name), strict=True):
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, want)


def test_kfac_is_exact_for_a_linear_gaussian() -> None:
    """Where ``a`` and ``g`` are independent, ``A ⊗ G`` is the true Fisher ``I ⊗ diag(scale²)``."""
    model = LinearGaussian().double()
    kfac = KFAC(fisher="true", damping=1e-8, n_samples=20000, batch_size=5000).fit(model)
    a, g = kfac.factors("linear.weight")
    torch.testing.assert_close(a, torch.diag(model.scale**2), atol=0.05, rtol=0.05)
    torch.testing.assert_close(g, torch.eye(2, dtype=g.dtype), atol=0.05, rtol=0.05)
    with torch.no_grad():
        x = model.sample(200)
    got = per_sample_layer_norms(model, x, metric=kfac, engine="func")
    s = reference(model, [x], {}).grads
    fisher = torch.kron(torch.eye(2, dtype=x.dtype), torch.diag(model.scale**2))
    w = s["linear.weight"].flatten(1)
    exact = torch.stack([(w * torch.linalg.solve(fisher, w.T).T).sum(1), s["linear.bias"].pow(2).sum(1)], 1)
    ratio = got.values / exact
    assert (ratio.mean(0) - 1).abs().max() < 0.05


# ---------------------------------------------------------------- fallbacks, sources, state, errors


def test_fallback_is_layer_scalar_and_diagonal() -> None:
    model = CustomLayerModel(dim=3).double()  # the gate's parameters are not in a Kronecker module
    x = torch.randn(8, 3, dtype=torch.float64)
    kfac = fitted(model, [x])
    assert kfac.kronecker_factored == ("inp.weight", "inp.bias", "out.weight", "out.bias")
    grads = reference(model, [x], {}).grads
    lam = {n: float(grads[n].pow(2).sum(1).mean()) / 3 for n in ("gate.log_gain", "gate.shift")}
    assert kfac.layer_scalars == pytest.approx(lam)
    assert kfac.inverse_diagonal("gate.shift") == pytest.approx(1 / lam["gate.shift"])
    assert kfac.inverse_diagonal("inp.weight") is None
    for engine in ENGINES:
        got = per_sample_layer_norms(model, x, metric=kfac, engine=engine)
        for name, value in lam.items():
            torch.testing.assert_close(
                got.values[:, got.names.index(name)], grads[name].pow(2).sum(1) / value
            )


class NormOnly(nn.Module):
    """No Kronecker module at all: every parameter is layer-scalar."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(3)

    def log_likelihood(self, x: Tensor) -> Tensor:
        return -self.norm(x).pow(2).sum(1)


def test_model_without_kronecker_modules() -> None:
    model = NormOnly().double()
    kfac = fitted(model, [torch.randn(5, 3, dtype=torch.float64)])
    assert kfac.kronecker_factored == () and set(kfac.layer_scalars) == {"norm.weight", "norm.bias"}


def test_fit_split_over_ranks_equals_single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ranks simulated in one process (a real gloo pair costs ~20 s of imports): rank 1's
    statistics are recorded at its ``all_reduce_sum`` calls, rank 0's calls add them, in order."""
    import fimcb.metrics.base

    model = SeqModel().double()
    batches = [torch.randn(n, 2, 3, dtype=torch.float64) for n in (4, 3, 3)]
    recorded: list[Tensor] = []
    monkeypatch.setattr(fimcb.metrics.base, "all_reduce_sum", lambda t: recorded.append(t.clone()) or t)
    KFAC(n_samples=100).fit(model, batches[2:])  # rank 1: 3 samples
    monkeypatch.setattr(fimcb.metrics.base, "all_reduce_sum", lambda t: t + recorded.pop(0))
    split = KFAC(n_samples=100).fit(model, batches[:2]).state_dict()  # rank 0: 7 samples
    assert not recorded
    monkeypatch.undo()
    single = KFAC(n_samples=100).fit(model, batches).state_dict()
    for name, block in single["factors"].items():
        for key in ("A", "G"):
            torch.testing.assert_close(split["factors"][name][key], block[key])
    assert split["scales"] == pytest.approx(single["scales"])


def test_true_fisher_uses_seeded_model_samples() -> None:
    model = LinearGaussian().double()
    true = KFAC(fisher="true", n_samples=40, batch_size=16, seed=3).fit(model)
    batches = []
    for i in range(3):
        torch.manual_seed(3 + i)
        with torch.no_grad():
            batches.append(model.sample(16))
    batches[-1] = batches[-1][:8]
    empirical = fitted(model, batches)
    for name in ("linear.weight", "linear.bias"):
        for got, want in zip(true.factors(name), empirical.factors(name), strict=True):
            torch.testing.assert_close(got, want)
    assert true.layer_scalars == empirical.layer_scalars == {}
    with pytest.raises(ValueError, match="sample"):
        KFAC(fisher="true").fit(SeqModel())


def test_state_round_trip() -> None:
    model = SequenceZoo().eval()
    x = torch.randint(0, 6, (6, 5))
    kfac = fitted(model, [x])
    buffer = io.BytesIO()
    torch.save(kfac.state_dict(), buffer)
    buffer.seek(0)
    loaded = KFAC(damping=0.5)
    assert not loaded.fitted
    loaded.load_state_dict(torch.load(buffer))
    assert loaded.fitted and loaded.damping == kfac.damping
    assert loaded.kronecker_factored == kfac.kronecker_factored
    torch.testing.assert_close(
        per_sample_layer_norms(model, x, metric=loaded, engine="func").values,
        per_sample_layer_norms(model, x, metric=kfac, engine="func").values,
    )


def test_errors() -> None:
    kfac = KFAC()
    for call in (
        lambda: kfac.squared_norms("w", torch.ones(1, 2)),
        kfac.state_dict,
        lambda: kfac.factors("w"),
    ):
        with pytest.raises(RuntimeError, match="not fitted"):
            call()
    model = LinearFlow(dim=3)
    x = torch.randn(5, 3)
    kfac = fitted(model, [x])
    with pytest.raises(KeyError, match="not fitted on parameter 'nope'"):
        kfac.squared_norms("nope", torch.ones(1, 2))
    with pytest.raises(KeyError, match="not Kronecker-factored"):
        kfac.factors("log_scale")
    with pytest.raises(ValueError, match="shape"):
        kfac.squared_norms("linear.weight", torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="shape"):
        kfac.squared_norms("linear.bias", torch.ones(2, 4))
    with pytest.raises(TypeError, match="unexpected keyword"):
        KFAC().fit(model, [x], chunk=3)
    with pytest.raises(ValueError, match="non-finite"):
        fitted(model, [torch.full((4, 3), math.nan)])
    state = kfac.state_dict()
    state["factors"]["linear.weight"]["A"] = torch.full_like(state["factors"]["linear.weight"]["A"], math.inf)
    with pytest.raises(ValueError, match="non-finite"):
        KFAC().load_state_dict(state)
    with pytest.raises(ValueError, match="missing"):
        KFAC().load_state_dict({"fisher": "true"})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fisher": "model"},
        {"damping": 0.0},
        {"damping": math.nan},
        {"damping": "1e-3"},
        {"n_samples": 0},
        {"batch_size": 2.5},
        {"seed": None},
    ],
)
def test_invalid_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        KFAC(**kwargs)
