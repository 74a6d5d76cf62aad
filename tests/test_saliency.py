"""Tests of input saliency by double backpropagation: a closed form, central finite differences of a
naive per-sample squared norm (identity, diagonal, K-FAC and low-rank metrics), batch independence,
the vmap route against the loop, real models, and errors for inputs that cannot be differentiated."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from toy_models import ControlFlowModel, ConvEnergy, MLPEnergy, TokenBigram

from fimcb.attribution.saliency import input_saliency, saliency_map
from fimcb.metrics import KFAC, Diagonal, FittedDiagonal, LowRank, Metric, resolve_metric
from fimcb.models.diffusion import Diffusion
from fimcb.models.glow import Glow
from fimcb.models.pixelcnn import PixelCNN
from fimcb.models.vae import VAE


class GaussianMean(nn.Module):
    """``log p(x) = -½||x - μ||²``: ``s = x - μ``, so under diagonal weights ``w``
    ``q = Σ_j w_j (x_j - μ_j)²`` and ``∇_x q = 2 w (x - μ)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mu = nn.Parameter(torch.randn(dim, dtype=torch.float64))

    def log_likelihood(self, x: Tensor) -> Tensor:
        return -0.5 * (x - self.mu).pow(2).sum(1)


def naive_q(model: nn.Module, x1: Tensor, metric: Metric) -> Tensor:
    """Reference ``q(x1)`` of one sample: ``autograd.grad`` of its log-likelihood, norms summed per tensor."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(model.log_likelihood(x1.unsqueeze(0)).sum(), list(params.values()))
    return sum(metric.squared_norms(n, g.unsqueeze(0)).sum() for n, g in zip(params, grads, strict=True))


def finite_differences(model: nn.Module, x: Tensor, metric: Metric, eps: float = 1e-5) -> Tensor:
    """Central differences of :func:`naive_q`, coordinate by coordinate, sample by sample."""
    model.eval()
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        flat = out[n].view(-1)
        for j in range(x[n].numel()):
            step = torch.zeros(x[n].numel(), dtype=x.dtype)
            step[j] = eps
            step = step.view_as(x[n])
            flat[j] = (naive_q(model, x[n] + step, metric) - naive_q(model, x[n] - step, metric)) / (2 * eps)
    return out


def mlp() -> nn.Module:
    return MLPEnergy(5, [7, 6], "tanh", bias=True).double()


def conv() -> nn.Module:
    return ConvEnergy(channels=2).double()


def inputs(model: nn.Module, n: int) -> Tensor:
    shape = (5,) if isinstance(model, MLPEnergy) else (2, 4, 4)
    return torch.randn(n, *shape, dtype=torch.float64)


def fitted(name: str, model: nn.Module) -> Metric:
    data = [inputs(model, 16)]
    metrics = {
        "identity": lambda: resolve_metric(None),
        "diagonal": lambda: FittedDiagonal(n_samples=16, damping=0.1),
        "kfac": lambda: KFAC(n_samples=16, damping=0.1),
        "low_rank": lambda: LowRank(n_reference=8, damping=0.1),
    }
    return metrics[name]().fit(model, data)


def test_closed_form_of_a_gaussian_mean() -> None:
    model = GaussianMean(6)
    x = torch.randn(4, 6, dtype=torch.float64)
    fisher = torch.rand(6, dtype=torch.float64) + 0.5
    expected_identity = 2 * (x - model.mu.detach())
    torch.testing.assert_close(input_saliency(model, x), expected_identity)
    metric = Diagonal({"mu": fisher}, damping=0.0)
    torch.testing.assert_close(input_saliency(model, x, metric=metric), expected_identity / fisher)


@pytest.mark.parametrize("metric_name", ["identity", "diagonal", "kfac", "low_rank"])
@pytest.mark.parametrize("make", [mlp, conv], ids=["mlp", "conv"])
def test_matches_finite_differences(make, metric_name: str) -> None:
    model = make()
    metric = fitted(metric_name, model)
    x = inputs(model, 3)
    saliency = input_saliency(model, x, metric=metric)
    assert saliency.shape == x.shape
    assert saliency.abs().max() > 1e-4  # a non-trivial comparison
    torch.testing.assert_close(saliency, finite_differences(model, x, metric), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("engine", ["func", "loop"])
def test_batch_independence_and_chunks(engine: str) -> None:
    model = conv()
    metric = fitted("diagonal", model)
    x = inputs(model, 7)
    full = input_saliency(model, x, metric=metric, engine=engine)
    torch.testing.assert_close(input_saliency(model, x[:3], metric=metric, engine=engine), full[:3])
    torch.testing.assert_close(input_saliency(model, x, metric=metric, engine=engine, chunk_size=2), full)


@pytest.mark.parametrize("metric_name", ["identity", "kfac"])
@pytest.mark.parametrize("make", [mlp, conv], ids=["mlp", "conv"])
def test_vmap_route_matches_loop(make, metric_name: str) -> None:
    model = make()
    metric = fitted(metric_name, model)
    x = inputs(model, 5)
    func = input_saliency(model, x, metric=metric, engine="func")
    torch.testing.assert_close(func, input_saliency(model, x, metric=metric, engine="loop"))


def test_auto_falls_back_to_the_loop_for_a_model_that_does_not_vmap(caplog) -> None:
    model = ControlFlowModel(4).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError):
        input_saliency(model, x, engine="func")
    auto = input_saliency(model, x, chunk_size=2)
    assert "per-sample loop" in caplog.text
    torch.testing.assert_close(auto, finite_differences(model, x, resolve_metric(None)), rtol=1e-6, atol=1e-8)


def test_leaves_grad_and_mode_alone_and_works_under_inference_mode() -> None:
    model = mlp().train()
    sentinel = {n: torch.full_like(p, 3.0) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = sentinel[n].clone()
    x = inputs(model, 4)
    reference = input_saliency(model, x)
    with torch.inference_mode():
        inside = input_saliency(model, torch.clone(x))
    torch.testing.assert_close(inside, reference)
    assert model.training
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, sentinel[n])


def test_only_trainable_parameters_count() -> None:
    model = mlp()
    model.layers[0].requires_grad_(False)
    x = inputs(model, 3)
    torch.testing.assert_close(input_saliency(model, x), finite_differences(model, x, resolve_metric(None)))


def tiny_vae() -> nn.Module:
    return VAE(image_shape=(1, 8, 8), num_levels=17, hidden_channels=8, latent_channels=2, n_downsample=1)


def tiny_glow() -> nn.Module:
    model = Glow(image_shape=(1, 8, 8), num_levels=17, n_levels=2, n_steps=2, hidden_channels=8)
    with torch.no_grad():  # initialise the ActNorms on data, then move every parameter off its init
        model.train().log_likelihood(torch.randint(0, 17, (32, 1, 8, 8)).float() / 16)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def tiny_pixelcnn() -> PixelCNN:
    return PixelCNN(image_shape=(1, 8, 8), num_levels=17, n_layers=2, hidden_channels=8)


def tiny_diffusion() -> Diffusion:
    return Diffusion(image_shape=(1, 8, 8), num_levels=17, channels=8, channel_mults=(1,), n_groups=2)


@pytest.mark.parametrize(
    "make", [tiny_vae, tiny_glow, tiny_pixelcnn, tiny_diffusion], ids=["vae", "glow", "pixelcnn", "diffusion"]
)
def test_real_models(make) -> None:
    model = make().train()  # training mode draws fresh noise: the saliency must not
    x = torch.randint(0, 17, (3, 1, 8, 8)).float() / 16
    saliency = input_saliency(model, x)
    assert saliency.shape == x.shape
    assert torch.isfinite(saliency).all()
    assert (saliency.flatten(1).abs().sum(1) > 0).all()
    torch.testing.assert_close(input_saliency(model, x), saliency)  # deterministic
    loop = input_saliency(model, x, engine="loop")  # float32: sums in another order
    torch.testing.assert_close(loop, saliency, rtol=1e-3, atol=1e-5 * float(saliency.abs().max()))
    heat = saliency_map(saliency)
    assert heat.shape == (3, 8, 8)
    torch.testing.assert_close(heat, saliency.abs().squeeze(1))


class Quantised(nn.Module):
    """Rounds its input before a Gaussian: the log-likelihood has no input gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.mu = nn.Parameter(torch.zeros(4))

    def log_likelihood(self, x: Tensor) -> Tensor:
        return -0.5 * (torch.round(x * 4) - self.mu).pow(2).sum(1)


def test_an_input_quantised_inside_the_model_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    saliency = input_saliency(Quantised(), torch.rand(3, 4))
    assert not saliency.any()
    assert "zero everywhere" in caplog.text and "straight-through" in caplog.text


def test_saliency_map_sums_absolute_values_over_channels() -> None:
    saliency = torch.tensor([[[[1.0, -2.0]], [[-3.0, 0.5]]]])  # [1, 2, 1, 2]
    torch.testing.assert_close(saliency_map(saliency), torch.tensor([[[4.0, 2.5]]]))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        saliency_map(torch.zeros(2, 3))


def test_errors() -> None:
    with pytest.raises(TypeError, match=r"torch\.int64.*floating input such as an image"):
        input_saliency(TokenBigram(), torch.randint(0, 7, (2, 5)))
    model = mlp()
    x = inputs(model, 3)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        input_saliency(model, x)
    with pytest.raises(ValueError, match="empty"):
        input_saliency(model, inputs(model, 0))
    with pytest.raises(RuntimeError, match="diagonal metric is not fitted"):
        input_saliency(model, inputs(model, 2), metric=FittedDiagonal())
    with pytest.raises(RuntimeError, match="not fitted"):
        input_saliency(model, inputs(model, 2), metric="kfac")
    with pytest.raises(ValueError, match="chunk_size"):
        input_saliency(model, inputs(model, 2), chunk_size=0)
    with pytest.raises(ValueError, match="engine"):
        input_saliency(model, inputs(model, 2), engine="hooks")  # type: ignore[arg-type]
