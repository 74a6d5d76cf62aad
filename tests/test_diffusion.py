"""Tests of the variational diffusion model: each term of the bound against a closed form or an exact
integral, the bound against the exact probabilities of a known model, its Monte-Carlo and quadrature
estimates, eval-mode determinism, per-sample gradients, training, Lightning and the CLI config."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from cli_runs import run_config
from image_training import held_out_bpd, train_steps
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.distributions import Normal, kl_divergence

from fimcb import FIMNormCallback, per_sample_layer_norms
from fimcb.data import ImageDataModule
from fimcb.lightning.options import Evaluation, Tracking
from fimcb.models.diffusion import Diffusion, UNet
from fimcb.models.noise import content_seed, seeded_normal

TINY = {"image_shape": (1, 4, 4), "num_levels": 2, "channels": 8, "channel_mults": (1, 2), "n_groups": 2}


def perturb(module: nn.Module, scale: float = 0.1) -> nn.Module:
    """Move every parameter away from its (often zero) initial value."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


def tiny_model(**overrides: object) -> Diffusion:
    return perturb(Diffusion(**{**TINY, **overrides})).eval()


def grid_images(n: int, num_levels: int, shape: tuple[int, ...]) -> Tensor:
    return torch.randint(0, num_levels, (n, *shape)).float() / (num_levels - 1)


def digits() -> Tensor:
    """The 1797 sklearn 8x8 digits, 17 intensity levels, as ``[N, 1, 8, 8]`` in [0, 1]."""
    return (torch.as_tensor(load_digits().images, dtype=torch.float32) / 16.0).unsqueeze(1)


class OracleDenoiser(nn.Module):
    """The Bayes-optimal ``ε̂(z_t, t) = (z_t - α_t E[x | z_t]) / σ_t`` for data drawn from ``points``
    (in the model's ``[-1, 1]`` space) with probabilities ``weights``."""

    def __init__(self, gamma_min: float, gamma_max: float, points: Tensor, weights: Tensor) -> None:
        super().__init__()
        self.gamma_min, self.gamma_max = gamma_min, gamma_max
        self.points, self.log_weights = points.flatten(1), weights.log()

    def forward(self, z: Tensor, t: Tensor) -> Tensor:
        gamma = (self.gamma_min + (self.gamma_max - self.gamma_min) * t)[:, None]
        alpha, sigma = torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()
        flat = z.flatten(1)
        sq_dist = ((flat[:, None] - alpha[:, :, None] * self.points[None]) ** 2).sum(-1)
        posterior = torch.softmax(self.log_weights - sq_dist / (2 * sigma**2), dim=1)
        return ((flat - alpha * (posterior @ self.points)) / sigma).reshape(z.shape)


def oracle_model(weights: Tensor) -> Diffusion:
    """A one-pixel model with ``len(weights)`` levels whose denoiser is optimal for those probabilities."""
    model = Diffusion(image_shape=(1, 1, 1), num_levels=len(weights), channels=4, channel_mults=(1,)).double()
    points = model.level_values(weights).reshape(-1, 1, 1, 1)
    model.eps_model = OracleDenoiser(model.gamma_min, model.gamma_max, points, weights)
    return model


def exact_bound(model: Diffusion, x: Tensor, n_t: int = 1000, n_eps: int = 801) -> Tensor:
    """The variational bound of one-pixel images ``x`` by numerical integration over ``t`` (midpoint rule)
    and ``ε`` (trapezoid rule on ``[-8, 8]`` against the normal density) instead of sampling."""
    eps = torch.linspace(-8.0, 8.0, n_eps, dtype=torch.float64)
    w = Normal(0.0, 1.0).log_prob(eps).exp() * (eps[1] - eps[0])
    w[[0, -1]] /= 2
    t = (torch.arange(n_t, dtype=torch.float64) + 0.5) / n_t
    bounds = []
    for image in model.scale(x):
        data = image.expand(n_t * n_eps, 1, 1, 1)
        e = eps.repeat(n_t).reshape(-1, 1, 1, 1)
        diffusion = (model.diffusion_loss(data, t.repeat_interleave(n_eps), e).reshape(n_t, n_eps) @ w).mean()
        level = model.to_levels((image + 1) / 2).expand(n_eps, 1, 1, 1)
        reconstruction = model.reconstruction(data[:n_eps], level, eps.reshape(-1, 1, 1, 1)) @ w
        bounds.append(reconstruction - model.prior_kl(image[None])[0] - diffusion)
    return torch.stack(bounds)


def test_decoder_is_a_normalised_gaussian_over_levels() -> None:
    model = Diffusion(image_shape=(1, 2, 2), num_levels=5, channels=4, channel_mults=(1,), gamma_min=-3.0)
    z_0 = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    log_probs = model.decoder_log_probs(z_0)
    assert log_probs.shape == (3, 1, 2, 2, 5)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(3, 1, 2, 2, dtype=torch.float64))
    alpha_0, sigma_0 = math.sqrt(1 / (1 + math.exp(-3.0))), math.exp(-3.0 / 2)  # std of z_0 / α_0
    density = Normal(z_0[..., None] / alpha_0, sigma_0).log_prob(
        torch.linspace(-1, 1, 5, dtype=torch.float64)
    )
    torch.testing.assert_close(log_probs, density - density.logsumexp(-1, keepdim=True))


def test_prior_kl_matches_torch_distributions() -> None:
    model = Diffusion(
        image_shape=(1, 2, 2), num_levels=3, channels=4, channel_mults=(1,), gamma_max=1.5
    ).double()
    x = model.scale(grid_images(4, 3, (1, 2, 2)).double())
    alpha_1, sigma_1 = math.sqrt(1 / (1 + math.exp(1.5))), math.sqrt(1 / (1 + math.exp(-1.5)))
    expected = kl_divergence(Normal(alpha_1 * x, sigma_1), Normal(0.0, 1.0)).flatten(1).sum(1)
    torch.testing.assert_close(model.prior_kl(x), expected)


def test_bound_of_the_optimal_denoiser_is_tight_and_normalised() -> None:
    """With the Bayes-optimal denoiser of a known distribution over 4 levels, the exact bound sums (in
    probability) to at most one, and each level's bound is close to its log-probability."""
    weights = torch.tensor([0.5, 0.3, 0.2, 1e-3], dtype=torch.float64)
    weights = weights / weights.sum()
    model = oracle_model(weights)
    x = torch.arange(4, dtype=torch.float64).reshape(4, 1, 1, 1) / 3
    with torch.no_grad():
        bound = exact_bound(model, x)
    total = bound.exp().sum()
    assert 0.99 < total <= 1.0, bound  # a 10 % error in the diffusion loss's weight moves it by 0.1
    torch.testing.assert_close(bound, weights.log(), rtol=0, atol=0.01)


def test_monte_carlo_and_quadrature_estimate_the_exact_bound() -> None:
    """Training-mode estimates average to the exact bound; the eval-mode quadrature converges to it."""
    model = oracle_model(torch.softmax(torch.randn(8, dtype=torch.float64), 0))
    x = torch.arange(8, dtype=torch.float64).reshape(8, 1, 1, 1) / 7
    with torch.no_grad():
        exact = exact_bound(model, x, n_t=500, n_eps=401)
        draws = model.train().log_likelihood(x.repeat(10_000, 1, 1, 1)).reshape(-1, 8)
        rms_errors = []
        for n in (1, 16, 256, 4096):
            model.eval().n_eval_timesteps = n
            rms_errors.append((model.log_likelihood(x) - exact).pow(2).mean().sqrt().item())
    standard_error = draws.std(0) / math.sqrt(len(draws))
    assert ((draws.mean(0) - exact).abs() < 4 * standard_error).all(), (draws.mean(0), exact, standard_error)
    # one noise draw per time: the error shrinks like a Monte-Carlo error, ~5 nats / sqrt(n)
    assert rms_errors == sorted(rms_errors, reverse=True) and rms_errors[-1] < 0.25, rms_errors


def test_training_average_matches_many_step_quadrature_with_a_unet() -> None:
    model = tiny_model().double()
    x = grid_images(1, 2, (1, 4, 4)).double()
    with torch.no_grad():
        draws = model.train().log_likelihood(x.repeat(4096, 1, 1, 1))
        model.eval().n_eval_timesteps = 1024
        quadrature = model.log_likelihood(x)
    assert (draws.mean() - quadrature).abs() < 4 * draws.std() / math.sqrt(1024), (draws.mean(), quadrature)


def test_bound_of_a_random_unet_is_below_zero_on_an_enumerated_space() -> None:
    model = tiny_model(image_shape=(1, 2, 2), channel_mults=(1,), n_eval_timesteps=32).double()
    codes = torch.arange(16)
    images = torch.stack([(codes >> i) & 1 for i in range(4)], 1).double().reshape(16, 1, 2, 2)
    with torch.no_grad():
        ll = model.log_likelihood(images)
    assert (ll < 0).all() and ll.exp().sum() <= 1


@pytest.mark.parametrize("likelihood", ["vlb", "simple"])
def test_eval_log_likelihood_is_deterministic_per_sample(likelihood: str) -> None:
    model = tiny_model(likelihood=likelihood, num_levels=17, n_eval_timesteps=3)
    x = grid_images(6, 17, (1, 4, 4))
    rng_state = torch.get_rng_state()
    ll = model.log_likelihood(x)
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert ll.shape == (6,) and ll.dtype == torch.float32 and torch.isfinite(ll).all() and (ll < 0).all()
    torch.testing.assert_close(model.log_likelihood(x), ll, rtol=0, atol=0)
    singles = torch.cat([model.log_likelihood(x[i : i + 1]) for i in range(6)])
    torch.testing.assert_close(singles, ll, rtol=1e-5, atol=1e-4)
    other_batch = model.log_likelihood(torch.cat([grid_images(3, 17, (1, 4, 4)), x[2:3]]))
    torch.testing.assert_close(other_batch[-1], ll[2], rtol=1e-5, atol=1e-4)
    model.train()
    assert not torch.equal(model.log_likelihood(x), model.log_likelihood(x))


def test_simple_score_is_the_negated_noise_error_at_t_simple() -> None:
    model = Diffusion(**TINY, likelihood="simple", t_simple=0.25).eval()  # untrained: ε̂ = 0
    x = grid_images(3, 2, (1, 4, 4))
    eps = seeded_normal(content_seed(model.to_levels(x)), (1, 4, 4), 0xBB67AE85)
    torch.testing.assert_close(model.log_likelihood(x), -(eps**2).flatten(1).sum(1))
    perturb(model)
    t = torch.full((3,), 0.25)
    gamma = model.gamma(t)[:, None, None, None]
    z = torch.sigmoid(-gamma).sqrt() * model.scale(x) + torch.sigmoid(gamma).sqrt() * eps
    expected = -((eps - model.eps_model(z, t)) ** 2).flatten(1).sum(1)
    torch.testing.assert_close(model.log_likelihood(x), expected)


@pytest.mark.parametrize("engine", ["hooks", "func"])
def test_per_sample_layer_norms_match_loop(engine: str) -> None:
    model = tiny_model(num_levels=17, n_eval_timesteps=2).double()
    x = grid_images(5, 17, (1, 4, 4)).double()
    fast = per_sample_layer_norms(model, x, engine=engine)
    slow = per_sample_layer_norms(model, x, engine="loop")
    assert fast.names == slow.names and len(fast.names) == len(list(model.parameters()))
    torch.testing.assert_close(fast.values, slow.values, rtol=1e-6, atol=1e-12)


def test_hooks_engine_accepts_the_default_width_in_float32() -> None:
    model = Diffusion(image_shape=(1, 8, 8), num_levels=17, channels=8, n_eval_timesteps=1).eval()
    x = digits()[:8]
    fast = per_sample_layer_norms(model, x, engine="hooks")
    slow = per_sample_layer_norms(model, x, engine="loop")
    torch.testing.assert_close(fast.values, slow.values, rtol=1e-4, atol=1e-6 * slow.values.max().item())


def test_shape_and_option_checks() -> None:
    with pytest.raises(ValueError, match="divisible"):
        Diffusion(image_shape=(1, 28, 28), channel_mults=(1, 2, 2, 2))
    with pytest.raises(ValueError, match="likelihood"):
        Diffusion(likelihood="elbo")
    with pytest.raises(ValueError, match="gamma_min < gamma_max"):
        Diffusion(gamma_min=1.0, gamma_max=0.0)
    assert UNet(1, 8, (1, 2, 2), 1, 8)(torch.randn(2, 1, 8, 8), torch.rand(2)).shape == (2, 1, 8, 8)


def test_training_lowers_bits_per_dim_and_samples_are_on_grid() -> None:
    data = digits()
    model = Diffusion(
        image_shape=(1, 8, 8), num_levels=17, channels=8, channel_mults=(1, 2), n_eval_timesteps=8
    )
    held_out = data[-128:]
    initial = held_out_bpd(model, held_out)
    train_steps(model, data[:-128], steps=100, lr=5e-3, generator=torch.Generator().manual_seed(0))
    final = held_out_bpd(model, held_out)
    assert final < 0.4 * initial, (initial, final)  # about 13.2 -> 3.9 bits/dim

    model.n_sample_steps = 10
    samples = model.sample(4)
    assert samples.shape == (4, 1, 8, 8) and samples.min() >= 0 and samples.max() <= 1
    torch.testing.assert_close(samples * 16, torch.round(samples * 16))


def test_lightning_fit_with_the_callback(tmp_path: Path) -> None:
    L.seed_everything(0)
    model = Diffusion(
        image_shape=(1, 8, 8),
        num_levels=17,
        channels=8,
        channel_mults=(1, 2),
        n_eval_timesteps=2,
        n_sample_steps=4,
        n_samples=4,
        warmup_steps=1,
    )
    dm = ImageDataModule(
        dataset="digits", ood=["vflip", "noise"], val_size=32, train_size=48, test_size=32, batch_size=16
    )
    callback = FIMNormCallback(
        Tracking(every_n_train_steps=2, n_train_probe=8, n_val_probe=8),
        evaluation=Evaluation(max_samples=32),
        progress=False,
    )
    trainer = L.Trainer(
        max_steps=3,
        logger=False,
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
        limit_val_batches=1,
    )
    trainer.fit(model, dm)
    assert trainer.global_step == 3
    assert set(callback.result.scores) >= {"test", "vflip", "noise"}
    assert list((tmp_path / "images").glob("samples_*.png"))


def test_fashionmnist_config_end_to_end(
    tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["train.py"])
    overrides = {
        "model.init_args.channels": "8",
        "model.init_args.channel_mults": "[1, 2]",
        "model.init_args.n_eval_timesteps": "1",
        "model.init_args.n_sample_steps": "2",
        "model.init_args.n_samples": "4",
        "trainer.max_steps": "4",
        "trainer.limit_val_batches": "1",
        "data.init_args.root": str(data_root),
        "data.init_args.train_size": "64",
        "data.init_args.val_size": "32",
        "data.init_args.test_size": "32",
    }
    args = [item for key, value in overrides.items() for item in (f"--{key}", value)]
    cli = run_config(tmp_path, "diffusion_fashionmnist.yaml", *args)
    assert isinstance(cli.model, Diffusion) and cli.model.image_shape == (1, 28, 28)
    metrics = (Path(cli.trainer.log_dir) / "ood_metrics.json").read_text()
    assert all(name in metrics for name in ("mnist", "hflip", "vflip", "noise", "constant"))
