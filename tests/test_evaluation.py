"""OOD metrics against scikit-learn, detectors against scipy, and evaluate_ood end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy import stats
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.functional.classification import binary_auroc
from toy_models import LinearFlow

from fimcb import LayerNorms, evaluate_ood, ood_measures
from fimcb.core.metric import Identity
from fimcb.core.protocol import ModelProtocolError
from fimcb.detectors import (
    DEFAULT_METHODS,
    DETECTORS,
    FIMGaussian,
    NotFittedError,
    Typicality,
    build_detector,
)
from fimcb.evaluation.analysis import LayerAUROCs, layer_aurocs, plot_layer_aurocs
from fimcb.evaluation.ood import to_unit_interval
from fimcb.evaluation.scoring import ScoringOptions, layer_norms_over
from fimcb.lightning.options import Scoring
from fimcb.models import VAE


def _sklearn_metrics(s_in: np.ndarray, s_out: np.ndarray) -> dict[str, float]:
    scores = np.concatenate([s_in, s_out])
    is_ood = np.concatenate([np.zeros(len(s_in)), np.ones(len(s_out))])
    fpr, tpr, _ = roc_curve(1 - is_ood, -scores, drop_intermediate=False)  # keep collinear points
    return {
        "auroc": roc_auc_score(is_ood, scores),
        "aupr_in": average_precision_score(1 - is_ood, -scores),
        "aupr_out": average_precision_score(is_ood, scores),
        "fpr95": float(fpr[tpr >= 0.95].min()),
    }


score_arrays = st.lists(
    st.one_of(st.integers(-5, 5).map(float), st.floats(-1e8, 1e8, allow_nan=False)), min_size=1, max_size=40
)


@settings(max_examples=60, deadline=None)
@given(s_in=score_arrays, s_out=score_arrays, scale=st.sampled_from([1e-3, 1.0, 1e4]))
@example(s_in=[0.0] * 18 + [1.0, 2.0], s_out=[1.0, 2.0], scale=1e-3)  # 95 % of ID exactly at a tie
def test_metrics_equal_sklearn_including_ties_and_huge_scores(s_in, s_out, scale) -> None:
    a, b = np.array(s_in) * scale, np.array(s_out) * scale
    ours = ood_measures(torch.tensor(a), torch.tensor(b))
    ref = _sklearn_metrics(a, b)
    for key in ref:
        assert ours[key] == pytest.approx(ref[key], abs=1e-6), key  # torchmetrics returns float32


def test_fpr95_matches_its_definition_on_distinct_scores() -> None:
    rng = np.random.default_rng(0)
    s_in, s_out = rng.normal(0, 1, 400), rng.normal(1.5, 1, 300)
    threshold = np.sort(s_in)[int(np.ceil(0.95 * len(s_in))) - 1]  # accepts exactly 95% of ID
    expected = float(np.mean(s_out <= threshold))
    assert ood_measures(torch.tensor(s_in), torch.tensor(s_out))["fpr95"] == pytest.approx(expected)


def test_unbounded_scores_avoid_the_sigmoid_trap() -> None:
    s_in = torch.linspace(100.0, 200.0, 50)
    s_out = torch.linspace(150.5, 250.5, 50)
    raw = float(binary_auroc(torch.cat([s_in, s_out]), torch.cat([torch.zeros(50), torch.ones(50)]).long()))
    ours = ood_measures(s_in, s_out)["auroc"]
    assert ours == pytest.approx(roc_auc_score(np.r_[np.zeros(50), np.ones(50)], np.r_[s_in, s_out]))
    assert raw != pytest.approx(ours)  # torchmetrics' sigmoid saturates every score to 1.0


def test_unit_interval_is_monotone_and_sends_nan_to_top() -> None:
    u = to_unit_interval(torch.tensor([3.0, -1.0, 3.0, float("nan"), float("-inf")]))
    assert u.tolist() == [2 / 3, 1 / 3, 2 / 3, 1.0, 0.0]


def _norms(n: int, n_layers: int = 4, seed: int = 0, shift: float = 0.0) -> LayerNorms:
    g = torch.Generator().manual_seed(seed)
    values = torch.exp(torch.randn(n, n_layers, generator=g) + shift)
    return LayerNorms(values, tuple(f"l{i}" for i in range(n_layers)), torch.randn(n, generator=g) - shift)


def test_fim_gaussian_equals_scipy_and_drops_constant_layers() -> None:
    fit = _norms(50)
    fit.values[:, 2] = 3.0  # zero spread: must be dropped
    det = FIMGaussian().fit(fit)
    assert det.kept_layers == ["l0", "l1", "l3"]
    test = _norms(7, seed=1)
    f_fit, f_test = fit.values.double().log().numpy(), test.values.double().log().numpy()
    keep = [0, 1, 3]
    mu, sd = f_fit[:, keep].mean(0), f_fit[:, keep].std(0, ddof=1)
    expected = -stats.norm.logpdf(f_test[:, keep], mu, sd).sum(1)
    np.testing.assert_allclose(det.score(test).numpy(), expected, rtol=1e-10)


def test_typicality_and_likelihood_against_numpy() -> None:
    fit, test = _norms(30), _norms(5, seed=3)
    h = -fit.log_likelihood.double().numpy().mean()
    np.testing.assert_allclose(
        Typicality().fit(fit).score(test).numpy(), np.abs(-test.log_likelihood.double().numpy() - h)
    )
    np.testing.assert_allclose(
        build_detector("likelihood").fit(fit).score(test).numpy(), -test.log_likelihood.double().numpy()
    )
    np.testing.assert_allclose(
        build_detector("total_norm").fit(fit).score(test).numpy(), np.log(test.values.double().sum(1).numpy())
    )


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_state_round_trip_through_a_file(name: str, tmp_path) -> None:
    fit, test = _norms(40), _norms(9, seed=5, shift=1.0)
    det = build_detector(name).fit(fit)
    torch.save(det.state_dict(), tmp_path / "d.pt")
    restored = build_detector(name)
    restored.load_state_dict(torch.load(tmp_path / "d.pt"))
    torch.testing.assert_close(restored.score(test), det.score(test))
    with pytest.raises(NotFittedError):
        build_detector(name).score(test)


def test_nonfinite_rows_are_excluded_from_fit_and_scored_novel() -> None:
    fit, test = _norms(30), _norms(4, seed=2)
    fit.values[0, 1] = float("nan")
    test.log_likelihood[2] = float("-inf")
    with pytest.warns(UserWarning, match="1 of 30 fit rows"):
        det = FIMGaussian().fit(fit)
    clean = FIMGaussian().fit(fit[1:])
    torch.testing.assert_close(det.state["mean"], clean.state["mean"])
    scores = det.score(test)
    assert torch.isinf(scores[2]) and torch.isfinite(scores[[0, 1, 3]]).all()


def test_detector_refuses_other_layers_and_unknown_names() -> None:
    det = FIMGaussian().fit(_norms(10))
    with pytest.raises(ValueError, match="layers differ"):
        det.score(_norms(3, n_layers=5))
    with pytest.raises(ValueError, match="unknown detector"):
        build_detector("mahalanobis_typo")
    with pytest.raises(ValueError, match="cannot be loaded"):
        Typicality().load_state_dict(det.state_dict())


def _loader(x: torch.Tensor, batch_size: int = 16) -> DataLoader:
    return DataLoader(TensorDataset(x, torch.zeros(len(x)), torch.arange(len(x))), batch_size=batch_size)


def test_evaluate_ood_end_to_end_on_a_fitted_flow() -> None:
    torch.manual_seed(0)
    dim = 4
    data = torch.randn(600, dim) * torch.tensor([1.0, 0.5, 2.0, 1.0]) + 1.0
    model = LinearFlow(dim)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        (-model.log_likelihood(data[:400]).mean()).backward()
        opt.step()
    at_mode = data[:400].mean(0) + 0.01 * torch.randn(100, dim)  # too typical: higher likelihood than ID data
    ood = {"shifted": _loader(data[500:600] + 6.0), "at_mode": _loader(at_mode)}
    result = evaluate_ood(model, _loader(data[400:450]), _loader(data[450:500]), ood, group_size=1)
    metrics = result.measures
    assert set(metrics) == {"shifted", "at_mode"}
    assert set(metrics["shifted"]) == set(DEFAULT_METHODS)
    assert set(metrics["shifted"]["fim_gaussian"]) == {"auroc", "aupr_in", "aupr_out", "fpr95"}
    assert metrics["shifted"]["fim_gaussian"]["auroc"] > 0.95
    assert metrics["shifted"]["likelihood"]["auroc"] > 0.95
    assert metrics["at_mode"]["fim_gaussian"]["auroc"] > 0.9
    assert metrics["at_mode"]["likelihood"]["auroc"] < 0.1  # the classic failure of the likelihood


def test_evaluation_groups_ids_and_errors() -> None:
    model = LinearFlow(3)
    x = torch.randn(40, 3)
    result = evaluate_ood(
        model,
        _loader(x[:20], 6),
        _loader(x[20:30], 7),
        {"o": _loader(x[30:] + 3, 4)},
        methods=["typicality"],
        options=ScoringOptions(group_size=2),
    )
    assert len(result.norms["fit"]) == 10 and len(result.norms["test"]) == 5 and len(result.norms["o"]) == 5
    assert result.norms["fit"].ids.tolist() == list(range(0, 20, 2))  # groups cross batch boundaries
    assert "o" in result.table() and "typicality" in result.table()
    empty = _loader(torch.empty(0, 3))
    with pytest.warns(UserWarning, match="skipping OOD set"):
        partial = evaluate_ood(model, _loader(x[:20]), _loader(x[20:30]), {"o": _loader(x[30:]), "e": empty})
    assert set(partial.measures) == {"o"}
    with pytest.raises(ValueError, match="fit_loader yielded no samples"):
        evaluate_ood(model, empty, _loader(x), {"o": _loader(x)})
    with pytest.raises(ValueError, match=r"shape \[4\] but the model takes \[3\]"):
        evaluate_ood(model, _loader(x), _loader(x), {"wide": _loader(torch.randn(8, 4))})


class _Corrupt(torch.utils.data.Dataset):
    """An OOD set whose files cannot be read."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> torch.Tensor:
        raise OSError("corrupt file")


def test_an_ood_set_that_fails_is_skipped_only_when_asked() -> None:
    model, x = LinearFlow(3), torch.randn(40, 3)
    sets = {"o": _loader(x[30:] + 3), "broken": DataLoader(_Corrupt(), batch_size=4)}
    with pytest.warns(
        UserWarning, match=r"skipping OOD set broken: scoring it failed \(OSError: corrupt file\)"
    ):
        result = evaluate_ood(model, _loader(x[:20]), _loader(x[20:30]), sets, skip_failures=True)
    assert set(result.measures) == {"o"}  # the other sets are evaluated
    with pytest.raises(OSError, match="corrupt file"):
        evaluate_ood(model, _loader(x[:20]), _loader(x[20:30]), sets)


def test_layer_aurocs_match_sklearn_per_layer() -> None:
    generator = torch.Generator().manual_seed(0)

    def norms(n: int, shift: float) -> LayerNorms:
        values = torch.exp(torch.randn(n, 3, generator=generator) + torch.tensor([shift, -shift, 0.0]))
        return LayerNorms(values, ("a", "b", "c"), torch.zeros(n))

    fit, test, ood = norms(200, 0.0), norms(150, 0.0), norms(120, 1.5)
    result = layer_aurocs(fit, test, {"shifted": ood})["shifted"]
    labels = [0] * len(test) + [1] * len(ood)
    for j in range(3):
        one = torch.cat([test.log_features()[:, j], ood.log_features()[:, j]])
        assert float(result.one_sided[j]) == pytest.approx(roc_auc_score(labels, one.numpy()), abs=1e-6)
        f = fit.log_features()[:, j]
        two = ((one - f.mean()) / f.std()).abs()
        assert float(result.two_sided[j]) == pytest.approx(roc_auc_score(labels, two.numpy()), abs=1e-6)
    assert result.one_sided[0] > 0.6 and result.one_sided[1] < 0.4  # larger and smaller gradients
    assert result.two_sided[0] > 0.55 and result.two_sided[1] > 0.55  # both caught two-sided
    depth = result.by_depth(2)
    assert [(r["first"], r["last"]) for r in depth] == [(0, 1), (2, 2)]
    assert depth[0]["below_half"] == 1
    assert result.best(1) == [("a", float(result.one_sided[0]))]


def test_plot_layer_aurocs_writes_one_panel_per_ood_set(tmp_path) -> None:
    from PIL import Image

    names = ("a", "b", "c", "d")
    aurocs = LayerAUROCs(names, torch.tensor([0.2, 0.4, 0.6, 0.9]), torch.tensor([0.5, 0.5, 0.7, 0.8]))
    one = plot_layer_aurocs({"x": aurocs}, tmp_path / "one.png", n_bins=2)
    three = plot_layer_aurocs({"x": aurocs, "y": aurocs, "z": aurocs}, tmp_path / "three.png", n_bins=2)
    with Image.open(one) as a, Image.open(three) as b:
        assert a.format == b.format == "PNG"
        assert b.width > 2.5 * a.width and a.height == b.height  # panels side by side
        pixels = torch.tensor(list(a.convert("L").getdata()), dtype=torch.float32)
        assert pixels.min() < 100  # something is drawn, not a blank canvas


def test_noise_draws_average_independent_streams_of_a_stochastic_bound() -> None:
    """Features averaged over a VAE's eval-mode latent streams are the mean of the streams scored one by
    one; the model's own stream is restored; a model without streams is refused with what to do."""
    torch.manual_seed(0)
    model = VAE(image_shape=(1, 8, 8), num_levels=17, hidden_channels=4, latent_channels=2, n_downsample=1)
    model.eval().noise_stream = 5
    images = torch.randint(0, 17, (10, 1, 8, 8)) / 16.0
    loader = DataLoader(TensorDataset(images), batch_size=4)
    averaged = layer_norms_over(model, loader, ScoringOptions(noise_draws=3, engine="hooks"))
    assert model.noise_stream == 5
    streams = []
    for stream in range(3):
        model.noise_stream = stream
        streams.append(layer_norms_over(model, loader, ScoringOptions(engine="hooks")))
    torch.testing.assert_close(averaged.values, torch.stack([s.values for s in streams]).mean(0))
    torch.testing.assert_close(
        averaged.log_likelihood, torch.stack([s.log_likelihood for s in streams]).mean(0)
    )
    assert not torch.equal(streams[0].values, streams[1].values)  # independent draws, not one repeated
    assert torch.equal(averaged.ids, streams[0].ids)
    flow = LinearFlow(4)
    data = DataLoader(TensorDataset(torch.randn(6, 4)), batch_size=3)
    layer_norms_over(flow, data, ScoringOptions(noise_draws=1))  # one draw: any model
    with pytest.raises(ModelProtocolError, match="noise_stream"):
        layer_norms_over(flow, data, ScoringOptions(noise_draws=2))


def test_the_callbacks_scoring_passes_noise_draws_to_the_evaluation_only() -> None:
    assert Scoring(noise_draws=4).options(Identity(), None, None).noise_draws == 4
    for bad in (0, -1, 1.5, 2.0, True):
        with pytest.raises(ValueError, match="noise_draws"):
            Scoring(noise_draws=bad)
        with pytest.raises(ValueError, match="noise_draws"):
            ScoringOptions(noise_draws=bad)
    model = VAE(image_shape=(1, 8, 8), hidden_channels=4, latent_channels=2, n_downsample=1)
    for bad in (-1, 1.5, "1"):
        with pytest.raises(ValueError, match="noise_stream"):
            model.noise_stream = bad
