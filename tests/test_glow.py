"""Tests of the Glow flow: invertibility, exact log-determinants, the dequantised likelihood's
determinism and normalisation, per-sample gradients under ``torch.func``, training and Lightning."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from image_training import held_out_bpd, train_steps
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

from fimcb.models.distributions import gaussian_log_prob
from fimcb.models.glow import (
    ActNorm,
    AffineCoupling,
    FlowStep,
    Glow,
    InvConv1x1,
    squeeze2x2,
    unsqueeze2x2,
)
from fimcb.models.noise import content_noise

TINY = {"image_shape": (1, 8, 8), "num_levels": 17, "n_levels": 2, "n_steps": 2, "hidden_channels": 8}


def perturb(module: nn.Module, scale: float = 0.1) -> nn.Module:
    """Move every parameter away from its (often zero or identity) initial value."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


def grid_images(n: int, num_levels: int = 17, shape: tuple[int, ...] = (1, 8, 8)) -> Tensor:
    return torch.randint(0, num_levels, (n, *shape)).float() / (num_levels - 1)


def tiny_glow(**overrides: object) -> Glow:
    """A tiny perturbed Glow whose ActNorms are initialised on a training batch, in eval mode."""
    model = Glow(**{**TINY, **overrides})
    shape = model.image_shape
    with torch.no_grad():
        model.train().log_likelihood(grid_images(32, model.num_levels, shape))
    return perturb(model, 0.05).eval()


def digits() -> Tensor:
    """The 1797 sklearn 8x8 digits, 17 intensity levels, as ``[N, 1, 8, 8]`` in [0, 1]."""
    images = torch.as_tensor(load_digits().images, dtype=torch.float32)
    return (images / 16.0).unsqueeze(1)


def test_squeeze_roundtrip() -> None:
    x = torch.randn(2, 3, 4, 6)
    y = squeeze2x2(x)
    assert y.shape == (2, 12, 2, 3)
    assert torch.equal(y[:, :4, 0, 0].reshape(2, 1, 2, 2)[:, 0], x[:, 0, :2, :2])
    assert torch.equal(unsqueeze2x2(y), x)


LAYERS = [
    pytest.param(lambda: ActNorm(4), id="actnorm"),
    pytest.param(lambda: InvConv1x1(4), id="invconv"),
    pytest.param(lambda: AffineCoupling(4, 8), id="coupling"),
    pytest.param(lambda: FlowStep(4, 8), id="step"),
]


@pytest.mark.parametrize("make", LAYERS)
def test_layer_inverse(make) -> None:
    layer = perturb(make()).eval()
    x = torch.randn(3, 4, 5, 5)
    y, log_det = layer(x)
    assert log_det.shape == (3,)
    torch.testing.assert_close(layer.inverse(y), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", LAYERS)
def test_layer_log_det_is_jacobian_log_det(make) -> None:
    layer = perturb(make(), 0.3).double().eval()
    x = torch.randn(1, 4, 2, 2, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: layer(v.reshape(x.shape))[0].flatten(), x.flatten())
    _, log_abs_det = torch.linalg.slogdet(jac)
    torch.testing.assert_close(layer(x)[1], log_abs_det.reshape(1), rtol=1e-9, atol=1e-9)


def test_flow_encode_decode_and_change_of_variables() -> None:
    model = tiny_glow(image_shape=(1, 4, 4)).double()
    y = torch.rand(3, 1, 4, 4, dtype=torch.float64) - 0.5
    latents, log_density = model.encode(y)
    assert [tuple(z.shape[1:]) for z in latents] == model.latent_shapes
    torch.testing.assert_close(model.decode(latents), y, rtol=1e-9, atol=1e-9)

    def flat_latents(v: Tensor) -> Tensor:
        return torch.cat([z.flatten() for z in model.encode(v.reshape(1, 1, 4, 4))[0]])

    jac = torch.autograd.functional.jacobian(flat_latents, y[0].flatten())
    _, log_abs_det = torch.linalg.slogdet(jac)
    prior = sum(gaussian_log_prob(z[:1]) for z in latents)
    torch.testing.assert_close(log_density[:1] - prior, log_abs_det.reshape(1), rtol=1e-9, atol=1e-9)


def test_shape_checks() -> None:
    with pytest.raises(ValueError, match="divisible by 2\\*\\*n_levels"):
        Glow(image_shape=(1, 28, 28), n_levels=3)
    with pytest.raises(ValueError, match="positive"):
        Glow(image_shape=(1, 8, 8), n_steps=0)


def test_actnorm_initialises_on_first_training_batch_only() -> None:
    norm = ActNorm(3)
    x = 2.0 + 3.0 * torch.randn(16, 3, 4, 4)
    y, _ = norm.eval()(x)
    assert not bool(norm.initialized)
    torch.testing.assert_close(y, x)

    y, _ = norm.train()(x)
    assert bool(norm.initialized)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3), rtol=0, atol=1e-5)
    torch.testing.assert_close(y.std(dim=(0, 2, 3), correction=0), torch.ones(3), rtol=1e-4, atol=1e-4)
    state = {k: v.clone() for k, v in norm.state_dict().items()}
    norm(5.0 * x)  # a second batch does not re-initialise
    assert all(torch.equal(v, norm.state_dict()[k]) for k, v in state.items())


def test_eval_log_likelihood_mutates_nothing() -> None:
    model = Glow(**TINY).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.log_likelihood(grid_images(4))
    assert not any(bool(m.initialized) for m in model.modules() if isinstance(m, ActNorm))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_log_likelihood_eval_is_deterministic_per_sample() -> None:
    model = tiny_glow()
    x = grid_images(6)
    rng_state = torch.get_rng_state()
    ll = model.log_likelihood(x)
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert ll.shape == (6,) and ll.dtype == torch.float32 and torch.isfinite(ll).all()
    torch.testing.assert_close(model.log_likelihood(x), ll, rtol=0, atol=0)
    singles = torch.cat([model.log_likelihood(x[i : i + 1]) for i in range(6)])
    torch.testing.assert_close(singles, ll, rtol=1e-5, atol=1e-4)
    other_batch = model.log_likelihood(torch.cat([grid_images(3), x[2:3]]))
    torch.testing.assert_close(other_batch[-1], ll[2], rtol=1e-5, atol=1e-4)
    # a lower bound on log P(x) <= 0 for every discrete image
    assert (ll < 0).all()


def test_eval_dequantisation_depends_on_content() -> None:
    model = Glow(**TINY).eval()
    x = grid_images(2)
    x[1] = x[0]
    x[1, 0, 3, 5] = 1.0 - x[0, 0, 3, 5]  # one pixel changed
    noise = model.dequantize(x) * model.num_levels - torch.round(x * (model.num_levels - 1))
    assert ((noise >= 0) & (noise < 1)).all()
    assert (noise[0] != noise[1]).float().mean() > 0.95
    torch.testing.assert_close(model.dequantize(x[:1]), model.dequantize(x)[:1], rtol=0, atol=0)


def test_content_noise_is_roughly_uniform() -> None:
    u = content_noise(torch.randint(0, 256, (256, 3, 8, 8)))
    assert u.dtype == torch.float32 and ((u >= 0) & (u < 1)).all()
    assert abs(u.mean().item() - 0.5) < 0.01
    assert abs(u.var().item() - 1 / 12) < 0.01
    assert len(torch.unique(u)) > 0.99 * u.numel()


def test_training_mode_uses_fresh_noise() -> None:
    model = tiny_glow().train()
    x = grid_images(4)
    a, b = model.dequantize(x), model.dequantize(x)
    assert not torch.equal(a, b)
    torch.testing.assert_close(torch.floor(a * 17), torch.floor(b * 17))
    assert not torch.equal(model.log_likelihood(x), model.log_likelihood(x))


def test_density_integrates_over_the_dequantisation_cube() -> None:
    """Three estimates of the flow's mass in [0, 1)^D agree: density Monte Carlo, the sampler, and
    the sum over all discrete images of the (training-noise) likelihood ``exp(log p(y) - D log L)``."""
    model = Glow(image_shape=(1, 2, 2), num_levels=2, n_levels=1, n_steps=2, hidden_channels=8)
    n = 40_000
    with torch.no_grad():
        model.train().encode(torch.rand(1000, 1, 2, 2) - 0.5)  # ActNorm init: roughly standardise the cube
        perturb(model, 0.1)
        y = torch.rand(n, 1, 2, 2)
        mass_density = model.eval().encode(y - 0.5)[1].exp().mean()
        x_sample = model.decode([torch.randn(n, *s) for s in model.latent_shapes]) + 0.5
        mass_sampler = ((x_sample >= 0) & (x_sample < 1)).flatten(1).all(1).float().mean()
        codes = torch.arange(16)
        images = torch.stack([(codes >> i) & 1 for i in range(4)], 1).float().reshape(16, 1, 2, 2)
        repeats = 2_500
        ll = model.train().log_likelihood(images.repeat(repeats, 1, 1, 1)).reshape(repeats, 16)
        mass_likelihood = ll.exp().mean(0).sum()
    assert 0.2 < mass_sampler < 0.9
    torch.testing.assert_close(mass_density, mass_sampler, rtol=0.03, atol=0)
    torch.testing.assert_close(mass_likelihood, mass_sampler, rtol=0.03, atol=0)
    assert ll.mean(0).exp().sum() <= mass_likelihood  # Jensen: the bound is a bound


@pytest.mark.parametrize("group", [1, 3])
def test_per_sample_gradients_match_loop(group: int) -> None:
    model = tiny_glow()
    x = grid_images(4 * group).reshape(4, group, 1, 8, 8)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def ll(p: dict[str, Tensor], xs: Tensor) -> Tensor:
        return functional_call(model, {**p, **buffers}, (xs,)).sum()

    fast = vmap(grad(ll), in_dims=(None, 0))(params, x)
    for i in range(len(x)):
        slow = torch.autograd.grad(model.log_likelihood(x[i]).sum(), list(model.parameters()))
        for (name, g_fast), g_slow in zip(fast.items(), slow, strict=True):
            scale = g_slow.abs().max().item()
            torch.testing.assert_close(g_fast[i], g_slow, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_state_dict_roundtrip_keeps_scores() -> None:
    model = tiny_glow()
    clone = Glow(**TINY)
    clone.load_state_dict(model.state_dict())
    x = grid_images(3)
    torch.testing.assert_close(clone.eval().log_likelihood(x), model.log_likelihood(x), rtol=0, atol=0)


def test_training_lowers_bits_per_dim_and_samples_are_on_grid() -> None:
    data = digits()
    model = Glow(image_shape=(1, 8, 8), num_levels=17, n_levels=2, n_steps=4, hidden_channels=32)
    generator = torch.Generator().manual_seed(0)
    held_out = data[-256:]
    with torch.no_grad():
        model.train().log_likelihood(data[:256])  # data-dependent ActNorm initialisation
    initial = held_out_bpd(model, held_out)
    train_steps(model, data[:-256], steps=100, lr=5e-3, generator=generator)
    final = held_out_bpd(model, held_out)
    assert final < 0.7 * initial, (initial, final)

    samples = model.sample(16)
    assert samples.shape == (16, 1, 8, 8)
    assert torch.isfinite(samples).all() and samples.min() >= 0 and samples.max() <= 1
    torch.testing.assert_close(samples * 16, torch.round(samples * 16))


def test_lightning_fit_smoke(tmp_path) -> None:
    x = digits()[:24]
    dataset = TensorDataset(x, torch.zeros(24, dtype=torch.long), torch.arange(24))
    model = Glow(**{**TINY, "n_samples": 4, "warmup_steps": 2})
    trainer = L.Trainer(
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
        limit_val_batches=1,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(dataset, batch_size=8), DataLoader(dataset, batch_size=8))
    assert trainer.global_step == 3
    assert all(bool(m.initialized) for m in model.modules() if isinstance(m, ActNorm))
    assert list((tmp_path / "images").glob("samples_*.png"))
