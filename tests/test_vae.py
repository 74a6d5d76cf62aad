"""Tests of the convolutional VAE: its bounds against the exact likelihood of a tiny model (latent
integrated numerically), normalisation, eval-mode determinism, per-sample gradients, training,
Lightning with the FIM callback, and the configs end to end."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from cli_runs import run_config
from image_training import held_out_bpd, train_steps
from lightning.pytorch.loggers import CSVLogger
from sklearn.datasets import load_digits
from torch import Tensor

from fimcb import FIMNormCallback, per_sample_layer_norms
from fimcb.data import ImageDataModule
from fimcb.detectors import DEFAULT_METHODS
from fimcb.lightning.options import Evaluation, Tracking
from fimcb.models.distributions import discretized_logistic_log_prob
from fimcb.models.vae import VAE

# 2x2 images with 3 levels (81 of them) and a one-dimensional latent: log p(x) by quadrature.
EXACT = {
    "image_shape": (1, 2, 2),
    "num_levels": 3,
    "hidden_channels": 4,
    "latent_channels": 1,
    "n_downsample": 1,
    "n_res_blocks": 1,
}
TINY = {
    "image_shape": (1, 8, 8),
    "num_levels": 17,
    "hidden_channels": 8,
    "latent_channels": 2,
    "n_downsample": 1,
}


def all_tiny_images() -> Tensor:
    """Every 2x2 image with 3 levels, ``[81, 1, 2, 2]`` in [0, 1]."""
    codes = torch.arange(81)
    digits = torch.stack([(codes // 3**i) % 3 for i in range(4)], 1)
    return (digits.double() / 2).reshape(81, 1, 2, 2)


def exact_model() -> VAE:
    torch.manual_seed(3)
    model = VAE(**EXACT).double().eval()
    with torch.no_grad():  # a more varied decoder than the initialisation: a posterior worth approximating
        for p in model.decoder.parameters():
            p.mul_(2.0)
    return model


def quadrature(model: VAE, images: Tensor) -> tuple[Tensor, Tensor]:
    """Exact ``log p(x)`` and exact ELBO ``E_q[log p(x|z)] - KL(q || p)`` of ``images`` by quadrature over
    the one-dimensional latent (the integrands are smooth and decay like Gaussians: a fine uniform grid
    on a wide interval is exact to far below the tolerances used)."""
    z = torch.linspace(-14.0, 14.0, 6_001, dtype=torch.float64)
    dz = z[1] - z[0]
    with torch.no_grad():
        mean, log_scale = model.decode(z.reshape(-1, 1, 1, 1))
        levels = model.to_levels(images)
        log_px_z = discretized_logistic_log_prob(levels[:, None], mean, log_scale, model.num_levels)
        log_px_z = log_px_z.flatten(2).sum(2)  # [images, grid]
        log_prior = -0.5 * (z**2 + math.log(2 * math.pi))
        log_px = torch.logsumexp(log_px_z + log_prior, 1) + torch.log(dz)
        q_mean, q_log_std = (t.reshape(-1, 1) for t in model.encode(images))
        q = torch.exp(-0.5 * ((z - q_mean) / q_log_std.exp()) ** 2 - q_log_std - 0.5 * math.log(2 * math.pi))
        kl = 0.5 * (q_mean**2 + torch.exp(2 * q_log_std) - 1 - 2 * q_log_std).squeeze(1)
        elbo = (q * log_px_z).sum(1) * dz - kl
    return log_px, elbo


def test_exact_likelihood_is_normalised_and_bounds_stay_below_it() -> None:
    model = exact_model()
    images = all_tiny_images()
    log_px, elbo = quadrature(model, images)
    torch.testing.assert_close(log_px.exp().sum(), torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-9)
    gap = log_px - elbo
    assert (gap > 1e-3).all() and gap.mean() > 0.05, gap  # the encoder is poor: a real gap to close

    repeats = 400
    batch = images.repeat(repeats, 1, 1, 1)
    mean_gap = {}
    with torch.no_grad():
        for k in (1, 2, 8):
            model.n_importance = k
            draws = model.train().log_likelihood(batch).reshape(repeats, 81)
            mean, stderr = draws.mean(0), draws.std(0) / math.sqrt(repeats)
            if k == 1:  # the training-mode ELBO is an unbiased estimate of the exact ELBO
                assert ((mean - elbo).abs() < 5 * stderr).all()
            assert (mean <= log_px + 5 * stderr).all()  # a bound in expectation, for every image
            mean_gap[k] = (log_px - mean).mean()
    assert gap.mean() > 1.5 * mean_gap[2] > 0  # IWAE(k) tightens with k, towards log p(x)
    assert mean_gap[2] > 2 * mean_gap[8] > 0


def grid_images(n: int, num_levels: int = 17, shape: tuple[int, ...] = (1, 8, 8)) -> Tensor:
    return torch.randint(0, num_levels, (n, *shape)).float() / (num_levels - 1)


def digits() -> Tensor:
    """The 1797 sklearn 8x8 digits, 17 intensity levels, as ``[N, 1, 8, 8]`` in [0, 1]."""
    return (torch.as_tensor(load_digits().images, dtype=torch.float32) / 16.0).unsqueeze(1)


@pytest.mark.parametrize("k", [1, 3])
def test_eval_log_likelihood_is_deterministic_per_sample(k: int) -> None:
    model = VAE(**TINY, n_importance=k).eval()
    x = grid_images(6)
    rng_state = torch.get_rng_state()
    ll = model.log_likelihood(x)
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert ll.shape == (6,) and ll.dtype == torch.float32 and torch.isfinite(ll).all()
    assert torch.equal(model.log_likelihood(x), ll)
    singles = torch.cat([model.log_likelihood(x[i : i + 1]) for i in range(6)])
    torch.testing.assert_close(singles, ll, rtol=1e-5, atol=1e-4)
    other_batch = model.log_likelihood(torch.cat([grid_images(3), x[2:3]]))
    torch.testing.assert_close(other_batch[-1], ll[2], rtol=1e-5, atol=1e-4)


def test_latent_streams_are_independent_draws_of_the_same_bound() -> None:
    """Stream 0 is the default's noise; other streams give other, deterministic draws whose mean ELBO is
    the same bound (the training-mode estimate's)."""
    torch.manual_seed(0)
    model = VAE(**TINY).eval()
    x = grid_images(8)
    state = model.state_dict()
    scores = {}
    for stream in (0, 1, 2):
        other = VAE(**TINY, latent_stream=stream).eval()
        other.load_state_dict(state)
        scores[stream] = other.log_likelihood(x)
        assert torch.equal(other.log_likelihood(x), scores[stream])  # deterministic per stream
    assert torch.equal(scores[0], model.log_likelihood(x))
    assert not torch.equal(scores[1], scores[0]) and not torch.equal(scores[2], scores[1])
    noise = [
        VAE(**TINY, latent_stream=s).eval().latent_noise(model.to_levels(grid_images(400)), torch.float32)
        for s in (1, 2)
    ]
    correlation = torch.corrcoef(torch.stack([n.flatten() for n in noise]))[0, 1]
    assert abs(float(correlation)) < 0.02  # independent streams
    assert abs(float(noise[1].mean())) < 0.02 and abs(float(noise[1].std()) - 1) < 0.02


def test_eval_noise_depends_on_content_and_training_noise_is_fresh() -> None:
    model = VAE(**TINY, n_importance=2).eval()
    x = grid_images(2)
    x[1] = x[0]
    x[1, 0, 3, 5] = 1.0 - x[0, 0, 3, 5]  # one pixel changed
    noise = model.latent_noise(model.to_levels(x), torch.float32)
    assert noise.shape == (2, 2, *model.latent_shape)
    assert (noise[:, 0] != noise[:, 1]).float().mean() > 0.95  # another image, other noise
    assert (noise[0] != noise[1]).float().mean() > 0.95  # the k draws differ
    assert abs(noise.mean().item()) < 0.3 and abs(noise.std().item() - 1) < 0.3
    model.train()
    assert not torch.equal(model.log_likelihood(x), model.log_likelihood(x))


def test_shape_and_argument_checks() -> None:
    with pytest.raises(ValueError, match="divisible by 2\\*\\*n_downsample"):
        VAE(image_shape=(1, 28, 28), n_downsample=3)
    with pytest.raises(ValueError, match="n_importance"):
        VAE(image_shape=(1, 8, 8), n_importance=0)
    model = VAE(image_shape=(3, 32, 32), n_downsample=2, latent_channels=5)
    assert model.latent_shape == (5, 8, 8)
    assert model.log_likelihood(torch.rand(2, 3, 32, 32)).shape == (2,)


@pytest.mark.parametrize(("k", "group_size"), [(1, 1), (2, 1), (1, 2)])
def test_hooks_engine_matches_loop_and_func(k: int, group_size: int) -> None:
    model = VAE(**TINY, n_importance=k).double()
    x = grid_images(6).double()
    hooks = per_sample_layer_norms(model, x, engine="hooks", group_size=group_size)  # raises if refused
    loop = per_sample_layer_norms(model, x, engine="loop", group_size=group_size)
    func = per_sample_layer_norms(model, x, engine="func", group_size=group_size)
    assert hooks.names == loop.names and len(hooks.names) == len(list(model.parameters()))
    torch.testing.assert_close(hooks.values, loop.values, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(func.values, loop.values, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(hooks.log_likelihood, loop.log_likelihood, rtol=1e-12, atol=1e-12)
    assert (hooks.values > 0).all()


def test_hooks_engine_in_float32() -> None:
    model = VAE(**TINY)
    x = grid_images(8)
    hooks = per_sample_layer_norms(model, x, engine="hooks")
    loop = per_sample_layer_norms(model, x, engine="loop")
    torch.testing.assert_close(hooks.values, loop.values, rtol=1e-4, atol=1e-6 * loop.values.max().item())


def independent_pixels_bpd(train: Tensor, held_out: Tensor, num_levels: int = 17) -> Tensor:
    """Held-out bits/dim of the best model without a latent: independent per-pixel level histograms."""
    levels = torch.round(train * (num_levels - 1)).long().flatten(1)
    counts = torch.stack([torch.bincount(column, minlength=num_levels) for column in levels.T]).double() + 0.5
    log_p = (counts / counts.sum(1, keepdim=True)).log()  # [pixels, levels]
    held = torch.round(held_out * (num_levels - 1)).long().flatten(1)
    return -log_p.gather(1, held.T).sum(0).mean() / (held.shape[1] * math.log(2.0))


def test_training_lowers_bits_per_dim_below_independent_pixels_and_samples_are_on_grid() -> None:
    data = digits()
    train, held_out = data[:-256], data[-256:]
    model = VAE(image_shape=(1, 8, 8), num_levels=17, hidden_channels=16, latent_channels=4, n_downsample=1)
    initial = held_out_bpd(model, held_out)
    train_steps(model, train, steps=150, lr=5e-3, generator=torch.Generator().manual_seed(0))
    final = held_out_bpd(model, held_out)
    baseline = independent_pixels_bpd(train, held_out)  # about 2.36 bits/dim
    assert final < 0.75 * initial and final < baseline - 0.05, (initial, final, baseline)

    samples = model.sample(16)
    assert samples.shape == (16, 1, 8, 8)
    assert samples.min() >= 0 and samples.max() <= 1
    torch.testing.assert_close(samples * 16, torch.round(samples * 16))


def test_lightning_fit_with_fim_callback(tmp_path: Path) -> None:
    L.seed_everything(0)
    model = VAE(**{**TINY, "n_samples": 4, "warmup_steps": 1})
    dm = ImageDataModule(
        dataset="digits", ood=["vflip", "noise"], val_size=32, train_size=64, test_size=32, batch_size=16
    )
    callback = FIMNormCallback(
        Tracking(every_n_train_steps=2, n_train_probe=8, n_val_probe=8),
        evaluation=Evaluation(max_samples=16),
        progress=False,
    )
    trainer = L.Trainer(
        max_steps=3,
        logger=CSVLogger(tmp_path, name="run"),
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        val_check_interval=2,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
    )
    trainer.fit(model, dm)
    assert trainer.global_step == 3
    run_dir = Path(trainer.log_dir)
    metrics = json.loads((run_dir / "ood_metrics.json").read_text())
    assert list(metrics) == ["vflip", "noise"]
    assert "fim/train_probe/log_norm_mean" in (run_dir / "metrics.csv").read_text()
    assert list((run_dir / "images").glob("samples_*.png"))


def _run_config(tmp_path: Path, config: str, data_root: Path):
    return run_config(
        tmp_path,
        config,
        "--trainer.accelerator",
        "cpu",
        "--trainer.max_steps",
        "4",
        "--trainer.limit_val_batches",
        "1",
        "--model.init_args.hidden_channels",
        "8",
        "--model.init_args.n_res_blocks",
        "0",
        "--model.init_args.n_samples",
        "4",
        "--data.init_args.root",
        str(data_root),
        "--data.init_args.train_size",
        "64",
        "--data.init_args.val_size",
        "48",
        "--data.init_args.test_size",
        "48",
        "--data.init_args.num_workers",
        "0",
    )


def test_fashionmnist_config_end_to_end_on_real_data(
    tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["train.py"])
    cli = _run_config(tmp_path, "vae_fashionmnist.yaml", data_root)
    assert isinstance(cli.model, VAE)
    assert cli.model.image_shape == (1, 28, 28) and cli.model.num_levels == 256  # linked from the datamodule
    metrics = json.loads((Path(cli.trainer.log_dir) / "ood_metrics.json").read_text())
    assert list(metrics) == ["mnist", "hflip", "vflip", "noise", "constant"]
    assert list(metrics["noise"]) == list(DEFAULT_METHODS)
    assert all(0 <= v <= 1 for m in metrics.values() for scores in m.values() for v in scores.values())
