"""Detectors beyond the paper's: full-covariance Gaussian, scaled chi-square and Fisher's method.

References are independent: scikit-learn's Ledoit–Wolf, scipy's distributions and p-value
combination, numpy float64 inverses, mpmath for extreme tails.
"""

from __future__ import annotations

import math
from typing import Any

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from sklearn.covariance import LedoitWolf, ShrunkCovariance
from sklearn.decomposition import FactorAnalysis
from sklearn.metrics import roc_auc_score
from torch import Tensor

from fimcb import LayerNorms
from fimcb.detectors import (
    DETECTORS,
    Detector,
    FIMGaussian,
    NotFittedError,
    build_detector,
    register_detector,
)
from fimcb.detectors.covariance import (
    FactorGaussian,
    FactorGaussianWithLikelihood,
    FullGaussian,
    FullGaussianWithLikelihood,
    ledoit_wolf,
)
from fimcb.detectors.pvalues import ChiSquare, FisherMethod, gamma_log_cdf_sf

NEW = (FullGaussian, FactorGaussian, ChiSquare, FisherMethod)


def _norms(features: np.ndarray | torch.Tensor, names: tuple[str, ...] | None = None) -> LayerNorms:
    """LayerNorms whose log features are ``features``."""
    f = torch.as_tensor(features, dtype=torch.float64)
    names = names or tuple(f"l{i}" for i in range(f.shape[1]))
    return LayerNorms(f.exp(), names, torch.zeros(len(f), dtype=torch.float64))


def _random(n: int, n_layers: int = 4, seed: int = 0, shift: float = 0.0) -> LayerNorms:
    g = torch.Generator().manual_seed(seed)
    return _norms(torch.randn(n, n_layers, generator=g, dtype=torch.float64) + shift)


# --- Ledoit–Wolf ------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 40),
    p=st.integers(1, 7),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([1e-3, 1, 1e3]),
)
def test_ledoit_wolf_equals_sklearn(n: int, p: int, seed: int, scale: float) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, p)) @ rng.normal(size=(p, p)) * scale + rng.normal(size=p)
    ref = LedoitWolf().fit(x)
    cov, shrinkage = ledoit_wolf(torch.tensor(x))
    assert shrinkage == pytest.approx(ref.shrinkage_, rel=1e-8, abs=1e-10)
    np.testing.assert_allclose(cov.numpy(), ref.covariance_, rtol=1e-8, atol=1e-12 * scale**2)


def test_fixed_shrinkage_equals_sklearn_shrunk_covariance() -> None:
    x = np.random.default_rng(1).normal(size=(30, 5))
    cov, shrinkage = ledoit_wolf(torch.tensor(x), 0.25)
    assert shrinkage == 0.25
    np.testing.assert_allclose(cov.numpy(), ShrunkCovariance(shrinkage=0.25).fit(x).covariance_, rtol=1e-12)


# --- FullGaussian -------------------------------------------------------------------------------------


def _correlated(n: int, seed: int, rho: float = 0.95, ood: bool = False) -> np.ndarray:
    """Two strongly correlated layers (unit marginals) and two noise layers; OOD flips the correlation."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=n), rng.normal(size=n)
    second = (-rho if ood else rho) * a + math.sqrt(1 - rho**2) * b
    return np.stack([a, second, rng.normal(size=n), rng.normal(size=n)], axis=1) * 0.7 + 2.0


@pytest.mark.parametrize("shrinkage", [None, 0.0, 0.4])
def test_full_gaussian_equals_numpy_mahalanobis(shrinkage: float | None) -> None:
    fit, test = _correlated(60, 0), _correlated(9, 1)
    fit[:, 2] = -1.5  # zero spread: dropped
    det = FullGaussian(shrinkage).fit(_norms(fit))
    assert det.kept_layers == ["l0", "l1", "l3"]
    keep = [0, 1, 3]
    mu, sd = fit[:, keep].mean(0), fit[:, keep].std(0, ddof=1)
    z_fit, z_test = (fit[:, keep] - mu) / sd, (test[:, keep] - mu) / sd
    est = LedoitWolf() if shrinkage is None else ShrunkCovariance(shrinkage=shrinkage)
    precision = np.linalg.inv(est.fit(z_fit).covariance_)
    expected = np.einsum("ni,ij,nj->n", z_test, precision, z_test)
    np.testing.assert_allclose(det.score(_norms(test)).numpy(), expected, rtol=1e-9)
    expected_shrinkage = est.shrinkage_ if shrinkage is None else shrinkage
    assert det.fitted_shrinkage == pytest.approx(expected_shrinkage, rel=1e-9)


@settings(max_examples=25, deadline=None)
@given(
    scale=st.lists(st.floats(0.2, 5.0).flatmap(lambda s: st.sampled_from([s, -s])), min_size=4, max_size=4),
    offset=st.lists(st.floats(-20, 20), min_size=4, max_size=4),
)
def test_full_gaussian_is_invariant_to_an_affine_change_of_each_feature(scale, offset) -> None:
    fit, test = _correlated(50, 2), np.r_[_correlated(5, 3), _correlated(5, 4, ood=True)]
    a, b = np.array(scale), np.array(offset)
    base = FullGaussian().fit(_norms(fit)).score(_norms(test))
    moved = FullGaussian().fit(_norms(fit * a + b)).score(_norms(test * a + b))
    np.testing.assert_allclose(moved.numpy(), base.numpy(), rtol=1e-7)


def test_full_gaussian_beats_independent_gaussians_on_correlated_layers() -> None:
    fit = _norms(_correlated(400, 5))
    test_in, test_out = _norms(_correlated(300, 6)), _norms(_correlated(300, 7, ood=True))
    is_ood = np.r_[np.zeros(300), np.ones(300)]

    def auroc(det: Detector) -> float:
        det.fit(fit)
        return roc_auc_score(is_ood, np.r_[det.score(test_in).numpy(), det.score(test_out).numpy()])

    full, independent = auroc(FullGaussian()), auroc(FIMGaussian())
    assert full > 0.75 and independent < 0.55  # the marginals alone cannot tell the two apart


def test_full_gaussian_singular_without_shrinkage_raises_and_ledoit_wolf_copes() -> None:
    fit = _random(3, n_layers=6)  # 3 rows, 6 layers: rank-deficient covariance
    with pytest.raises(ValueError, match="singular"):
        FullGaussian(shrinkage=0.0).fit(fit)
    det = FullGaussian().fit(fit)
    assert 0 < det.fitted_shrinkage <= 1 and torch.isfinite(det.score(_random(4, n_layers=6, seed=1))).all()


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (1.5, ValueError, r"\[0, 1\]"),
        (-0.1, ValueError, r"\[0, 1\]"),
        (True, TypeError, "float"),
        ("lw", TypeError, "float"),
    ],
)
def test_full_gaussian_rejects_bad_shrinkage(value, error, match) -> None:
    with pytest.raises(error, match=match):
        FullGaussian(shrinkage=value)


# --- ChiSquare ----------------------------------------------------------------------------------------


def _chi2_norms(n: int, dofs: tuple[float, ...], scales: tuple[float, ...], seed: int) -> LayerNorms:
    rng = np.random.default_rng(seed)
    y = np.stack([c * rng.chisquare(k, size=n) for k, c in zip(dofs, scales, strict=True)], axis=1)
    return LayerNorms(torch.tensor(y), tuple(f"l{i}" for i in range(len(dofs))), torch.zeros(n))


def _scipy_chi_square_score(y: np.ndarray, dof: np.ndarray, scale: np.ndarray) -> np.ndarray:
    law = stats.chi2(df=dof, scale=scale)
    p = 2 * np.minimum(law.cdf(y), law.sf(y))
    return -2 * np.log(p).sum(axis=1)


def test_chi_square_ml_fit_equals_scipy_gamma_fit_and_scores_equal_scipy_chi2() -> None:
    fit, test = (
        _chi2_norms(300, (3.0, 40.0, 0.7), (2.0, 1e-4, 50.0), 0),
        _chi2_norms(8, (3.0, 40.0, 0.7), (2.0, 1e-4, 50.0), 1),
    )
    det = ChiSquare().fit(fit)
    for layer in range(3):
        shape, _, scale = stats.gamma.fit(fit.values[:, layer].numpy(), floc=0)
        assert float(det.state["dof"][layer]) == pytest.approx(2 * shape, rel=1e-5)
        assert float(det.state["scale"][layer]) == pytest.approx(scale / 2, rel=1e-5)
    expected = _scipy_chi_square_score(
        test.values.numpy(), det.state["dof"].numpy(), det.state["scale"].numpy()
    )
    np.testing.assert_allclose(det.score(test).numpy(), expected, rtol=1e-9)
    np.testing.assert_allclose(det.state["dof"].numpy(), [3.0, 40.0, 0.7], rtol=0.3)  # recovers the truth


def test_chi_square_moments_fit_and_drops_constant_layers() -> None:
    fit = _chi2_norms(200, (5.0, 2.0, 9.0), (1.0, 1.0, 3.0), 2)
    fit.values[:, 1] = 4.0
    det = ChiSquare(estimator="moments").fit(fit)
    assert det.kept_layers == ["l0", "l2"]
    y = fit.values[:, [0, 2]].double().numpy()
    mean, var = y.mean(0), y.var(0, ddof=1)
    np.testing.assert_allclose(det.state["dof"].numpy(), 2 * mean**2 / var, rtol=1e-10)
    np.testing.assert_allclose(det.state["scale"].numpy(), var / (2 * mean), rtol=1e-10)
    test = _chi2_norms(6, (5.0, 2.0, 9.0), (1.0, 1.0, 3.0), 3)
    expected = _scipy_chi_square_score(
        test.values[:, [0, 2]].numpy(), det.state["dof"].numpy(), det.state["scale"].numpy()
    )
    np.testing.assert_allclose(det.score(test).numpy(), expected, rtol=1e-9)


@pytest.mark.parametrize(
    ("a", "x"), [(300.0, 5.0), (5.0, 1e-60), (500.0, 2.0), (500.0, 3000.0), (2.0, 700.0), (50.0, 1e4)]
)
def test_incomplete_gamma_tails_stay_finite_and_match_mpmath(a: float, x: float) -> None:
    log_lower, log_upper = gamma_log_cdf_sf(torch.tensor(a), torch.tensor(math.log(x), dtype=torch.float64))
    with mpmath.workdps(50):
        ref_lower = float(mpmath.log(mpmath.gammainc(a, 0, x, regularized=True)))
        ref_upper = float(mpmath.log(mpmath.gammainc(a, x, mpmath.inf, regularized=True)))
    tail = min(ref_lower, ref_upper)
    assert min(float(log_lower), float(log_upper)) == pytest.approx(tail, rel=2e-3)
    assert tail < math.log(1e-280)  # the cases reach the expansion, not torch's functions


def test_chi_square_far_outliers_keep_distinct_finite_scores() -> None:
    det = ChiSquare().fit(_chi2_norms(200, (400.0,), (1.0,), 4))
    scores = det.score(
        LayerNorms(torch.tensor([[2000.0], [4000.0], [8000.0], [1.0], [1e-3]]), ("l0",), torch.zeros(5))
    )
    assert torch.isfinite(scores).all() and scores[0] < scores[1] < scores[2] and scores[3] < scores[4]


# --- FisherMethod -----------------------------------------------------------------------------------


def test_fisher_method_equals_scipy_combine_pvalues() -> None:
    fit, test = _random(80, seed=0), _random(7, seed=1, shift=0.8)
    fit.values[:, 3] = 2.0  # dropped
    det = FisherMethod().fit(fit)
    assert det.kept_layers == ["l0", "l1", "l2"]
    f_fit, f_test = fit.log_features().numpy()[:, :3], test.log_features().numpy()[:, :3]
    z = (f_test - f_fit.mean(0)) / f_fit.std(0, ddof=1)
    p = 2 * stats.norm.sf(np.abs(z))
    ref = [stats.combine_pvalues(row, method="fisher") for row in p]
    np.testing.assert_allclose(det.score(test).numpy(), [r.statistic for r in ref], rtol=1e-10)
    np.testing.assert_allclose(det.p_values(test).numpy(), [r.pvalue for r in ref], rtol=1e-8)


def test_fisher_method_ranks_far_outliers_where_p_values_tie() -> None:
    det = FisherMethod().fit(_random(50))
    far = _norms(torch.tensor([[60.0, 0, 0, 0], [90.0, 0, 0, 0]], dtype=torch.float64))
    scores = det.score(far)
    assert torch.isfinite(scores).all() and scores[0] < scores[1]
    assert det.p_values(far).tolist() == [0.0, 0.0]


# --- all new detectors ------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", NEW)
def test_permuting_layers_permutes_nothing_in_the_scores(cls: type[Detector]) -> None:
    fit, test = _correlated(60, 8), np.r_[_correlated(5, 9), _correlated(5, 10, ood=True)]
    perm = [2, 0, 3, 1]
    names = tuple(f"l{i}" for i in range(4))
    base = cls().fit(_norms(fit, names)).score(_norms(test, names))
    permuted = (
        cls()
        .fit(_norms(fit[:, perm], tuple(names[i] for i in perm)))
        .score(_norms(test[:, perm], tuple(names[i] for i in perm)))
    )
    np.testing.assert_allclose(permuted.numpy(), base.numpy(), rtol=1e-9)


@pytest.mark.parametrize("cls", NEW)
def test_state_round_trip_through_weights_only_load(cls: type[Detector], tmp_path) -> None:
    fit, test = _random(40), _random(9, seed=5, shift=1.0)
    det = cls().fit(fit)
    torch.save(det.state_dict(), tmp_path / "d.pt")
    restored = build_detector(cls())
    restored.load_state_dict(torch.load(tmp_path / "d.pt", weights_only=True))
    torch.testing.assert_close(restored.score(test), det.score(test))
    with pytest.raises(NotFittedError):
        cls().score(test)
    with pytest.raises(ValueError, match="cannot be loaded"):
        FIMGaussian().load_state_dict(det.state_dict())


@pytest.mark.parametrize("cls", NEW)
def test_nonfinite_rows_are_left_out_and_scored_novel(cls: type[Detector]) -> None:
    fit, test = _random(30), _random(4, seed=2)
    fit.values[0, 1] = float("nan")
    test.values[2, 0] = float("inf")
    with pytest.warns(UserWarning, match="1 of 30 fit rows"):
        det = cls().fit(fit)
    torch.testing.assert_close(det.score(test), cls().fit(fit[1:]).score(test))
    scores = det.score(test)
    assert torch.isinf(scores[2]) and torch.isfinite(scores[[0, 1, 3]]).all()


@pytest.mark.parametrize("cls", NEW)
def test_names_and_errors(cls: type[Detector]) -> None:
    assert cls.name in {"fim_gaussian_full", "fim_gaussian_factor", "chi_square", "fisher_method"}
    with pytest.raises(ValueError, match="constant"):
        cls().fit(_norms(np.ones((10, 3))))
    with pytest.raises(ValueError, match="layers differ"):
        cls().fit(_random(10)).score(_random(3, n_layers=5))


def test_chi_square_rejects_unknown_estimator() -> None:
    with pytest.raises(ValueError, match="'ml' or 'moments'"):
        ChiSquare(estimator="mle")  # type: ignore[arg-type]


def test_full_gaussian_with_likelihood_uses_the_likelihood_as_one_more_feature() -> None:
    generator = torch.Generator().manual_seed(3)

    def norms(n: int, ll_shift: float) -> LayerNorms:
        values = torch.exp(torch.randn(n, 3, generator=generator, dtype=torch.float64))
        ll = torch.randn(n, generator=generator, dtype=torch.float64) + ll_shift
        return LayerNorms(values, ("a", "b", "c"), ll)

    fit, test, ood = norms(400, 0.0), norms(300, 0.0), norms(300, 4.0)  # same gradients, other likelihood
    labels = [0] * len(test) + [1] * len(ood)

    def auroc(detector) -> float:
        detector.fit(fit)
        return roc_auc_score(labels, torch.cat([detector.score(test), detector.score(ood)]).numpy())

    assert auroc(FullGaussianWithLikelihood()) > 0.95
    assert 0.4 < auroc(FullGaussian()) < 0.6
    joint = FullGaussianWithLikelihood().fit(fit)
    assert joint.state["keep"].shape == (4,)  # three layers and the log-likelihood
    expected = FullGaussian().fit(
        LayerNorms(
            torch.cat([fit.values, fit.log_likelihood.exp().reshape(-1, 1)], 1),
            ("a", "b", "c", "ll"),
            fit.log_likelihood,
        )
    )
    probe = LayerNorms(
        torch.cat([test.values, test.log_likelihood.exp().reshape(-1, 1)], 1),
        ("a", "b", "c", "ll"),
        test.log_likelihood,
    )
    torch.testing.assert_close(joint.score(test), expected.score(probe))


# --- FactorGaussian ----------------------------------------------------------------------------------


def _factors(n: int, n_factors: int, p: int = 12, seed: int = 0, noise: float = 0.5) -> np.ndarray:
    """Log features driven by ``n_factors`` shared factors plus independent noise."""
    rng = np.random.default_rng(seed)
    loadings = np.random.default_rng(100).normal(size=(n_factors, p))
    return rng.normal(size=(n, n_factors)) @ loadings + noise * rng.normal(size=(n, p))


@pytest.mark.parametrize("n_factors", [0, 1, 3])
def test_factor_gaussian_finds_the_number_of_shared_factors(n_factors: int) -> None:
    detector = FactorGaussian().fit(_norms(_factors(1500, n_factors)))
    # cross-validation may keep one factor of noise more, never one factor less
    assert n_factors <= detector.rank <= n_factors + (n_factors > 1)
    with pytest.raises(AttributeError, match=r"not a shrinkage: read \.rank"):
        detector.fitted_shrinkage  # noqa: B018  # inherited from the full Gaussian, meaningless here


def test_factor_gaussian_equals_sklearn_factor_analysis() -> None:
    x = _factors(400, 2, seed=1)
    test = _factors(50, 2, seed=2, noise=1.5)
    detector = FactorGaussian().fit(_norms(x))
    assert detector.rank == 2
    z = (x - x.mean(0)) / x.std(0, ddof=1)
    covariance = FactorAnalysis(n_components=2, tol=1e-10, max_iter=5000).fit(z).get_covariance()
    zt = (test - x.mean(0)) / x.std(0, ddof=1)
    expected = np.einsum("ij,jk,ik->i", zt, np.linalg.inv(covariance), zt)
    np.testing.assert_allclose(detector.score(_norms(test)).numpy(), expected, rtol=1e-4)


def test_factor_gaussian_beats_independent_layers_when_the_shift_breaks_the_common_factor() -> None:
    fit, test = _factors(1000, 1, seed=3), _factors(500, 1, seed=4)
    rng = np.random.default_rng(5)
    ood = _factors(500, 1, seed=6) * np.where(rng.random(12) < 0.5, -1, 1)  # half the layers flip sign
    labels = [0] * len(test) + [1] * len(ood)

    def auroc(detector: Detector) -> float:
        detector.fit(_norms(fit))
        return roc_auc_score(labels, torch.cat([detector.score(_norms(test)), detector.score(_norms(ood))]))

    assert auroc(FactorGaussian()) > auroc(FIMGaussian()) + 0.2


def test_factor_gaussian_with_likelihood_adds_the_likelihood_as_a_feature() -> None:
    x = torch.as_tensor(_factors(600, 1, p=5, seed=7))
    ll = x[:, 0] + 0.3 * torch.randn(600, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    joint = FactorGaussianWithLikelihood().fit(LayerNorms(x.exp(), tuple("abcde"), ll))
    alone = FactorGaussian().fit(LayerNorms(torch.cat([x, ll[:, None]], 1).exp(), tuple("abcdef"), ll))
    probe = LayerNorms(x[:7].exp(), tuple("abcde"), ll[:7] - 3)
    probe_alone = LayerNorms(torch.cat([x[:7], ll[:7, None] - 3], 1).exp(), tuple("abcdef"), ll[:7] - 3)
    torch.testing.assert_close(joint.score(probe), alone.score(probe_alone))
    assert joint.rank == alone.rank


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_factor_gaussian_rejects_bad_max_rank(value: Any) -> None:
    with pytest.raises(ValueError, match="max_rank"):
        FactorGaussian(max_rank=value)


def test_a_registered_detector_is_usable_by_name() -> None:
    class Median(Detector):
        """Distance of the total log norm from the fit set's median (a toy of a user's detector)."""

        name = "median_distance_test"

        def _fit(self, norms: LayerNorms) -> dict[str, Any]:
            return {"median": norms.total.log().median()}

        def _score(self, norms: LayerNorms) -> Tensor:
            return (norms.total.log() - self.state["median"]).abs().double()

    try:
        assert register_detector(Median) is Median and isinstance(build_detector(Median.name), Median)
        norms = _norms(torch.randn(20, 3, dtype=torch.float64))
        detector = build_detector(Median.name).fit(norms)
        torch.testing.assert_close(
            detector.score(norms), (norms.total.log() - norms.total.log().median()).abs().double()
        )
    finally:
        DETECTORS.pop(Median.name, None)
