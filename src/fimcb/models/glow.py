"""Glow (Kingma & Dhariwal, 2018): a multi-scale normalising flow with an exact dequantised likelihood.

Each level squeezes the image (2x2 space-to-depth), applies ``n_steps`` flow steps of ActNorm →
invertible 1x1 convolution (LU form) → affine coupling and, except at the last level, splits half
of the channels off to a learned conditional Gaussian prior. ``log_likelihood`` is a lower bound on
the log-probability of the discrete image. In ``eval()`` mode its dequantisation noise is a hash of
the image itself: a sample's score is deterministic, does not depend on the rest of its batch,
leaves the global RNG alone and can be differentiated per sample with ``torch.func``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fimcb.core.distributed import all_reduce_sum
from fimcb.engine.factors import Dense, Factor
from fimcb.engine.rules import Call, Rule, register_rule
from fimcb.models.base import ImageLikelihoodModel
from fimcb.models.distributions import gaussian_log_prob
from fimcb.models.noise import content_noise


def squeeze2x2(x: Tensor) -> Tensor:
    """Space-to-depth: ``[B, C, H, W] -> [B, 4C, H/2, W/2]``."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2)
    return x.permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)


def unsqueeze2x2(x: Tensor) -> Tensor:
    """Depth-to-space, the inverse of :func:`squeeze2x2`."""
    b, c, h, w = x.shape
    x = x.reshape(b, c // 4, 2, 2, h, w)
    return x.permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, 2 * h, 2 * w)


def _zero_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    """3x3 convolution initialised to output zeros, so new coupling/prior layers start as identity/N(0, 1)."""
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
    assert conv.bias is not None  # bias=True
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ActNorm(nn.Module):
    """Per-channel affine ``y = (x + bias) * exp(log_scale)``, initialised from the first training batch
    to zero mean and unit variance per channel. Never initialises (or mutates anything) in eval mode."""

    initialized: Tensor  # buffer

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))
        self._known_initialized = False  # caches the buffer's value: no device sync per training step

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set bias and scale so that ``x`` maps to zero mean and unit variance per channel; under DDP the
        statistics are those of all ranks' batches together, so every replica starts identical."""
        count = all_reduce_sum(x.new_tensor(float(x.shape[0] * x.shape[2] * x.shape[3])))
        mean = all_reduce_sum(x.sum(dim=(0, 2, 3), keepdim=True)) / count
        std = torch.sqrt(all_reduce_sum((x - mean).square().sum(dim=(0, 2, 3), keepdim=True)) / count)
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + 1e-6))
        self.initialized.fill_(True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.training and not self._known_initialized:
            if not bool(self.initialized):
                self.initialize(x)
            self._known_initialized = True
        log_det = x.shape[2] * x.shape[3] * self.log_scale.sum()
        return (x + self.bias) * torch.exp(self.log_scale), log_det.expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return y * torch.exp(-self.log_scale) - self.bias


class InvConv1x1(nn.Module):
    """Invertible 1x1 convolution with ``W = P @ L @ (U + diag(sign_s * exp(log_s)))`` (LU form), which
    makes ``log|det W| = sum(log_s)`` cheap; initialised from a random rotation."""

    # buffers
    perm: Tensor
    sign_s: Tensor
    lower_mask: Tensor
    eye: Tensor

    def __init__(self, channels: int) -> None:
        super().__init__()
        rotation = torch.linalg.qr(torch.randn(channels, channels))[0]
        perm, lower, upper = torch.linalg.lu(rotation)
        s = torch.diagonal(upper)
        self.register_buffer("perm", perm)
        self.register_buffer("sign_s", torch.sign(s))
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.register_buffer("eye", torch.eye(channels))
        self.lower = nn.Parameter(lower * self.lower_mask)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(torch.abs(s)))

    def weight(self) -> Tensor:
        """The ``[C, C]`` mixing matrix."""
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.perm @ lower @ upper

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        c = x.shape[1]
        log_det = x.shape[2] * x.shape[3] * self.log_s.sum()
        return F.conv2d(x, self.weight().reshape(c, c, 1, 1)), log_det.expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        c = y.shape[1]
        return F.conv2d(y, torch.linalg.inv(self.weight()).reshape(c, c, 1, 1))


class AffineCoupling(nn.Module):
    """Glow's affine coupling: the second half of the channels is shifted and scaled by
    ``sigmoid(raw + 2)`` (bounded, for stability), both computed from the first half. ``channels`` is even
    (always so after a squeeze)."""

    def __init__(self, channels: int, hidden_channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels // 2, hidden_channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden_channels, hidden_channels, 1),
            nn.ReLU(),
            _zero_conv(hidden_channels, channels),
        )

    def _shift_and_logit(self, x_a: Tensor) -> tuple[Tensor, Tensor]:
        shift, raw = self.net(x_a).chunk(2, dim=1)
        return shift, raw + 2.0

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x_a, x_b = x.chunk(2, dim=1)
        shift, logit = self._shift_and_logit(x_a)
        y_b = (x_b + shift) * torch.sigmoid(logit)
        return torch.cat([x_a, y_b], dim=1), F.logsigmoid(logit).flatten(1).sum(1)

    def inverse(self, y: Tensor) -> Tensor:
        y_a, y_b = y.chunk(2, dim=1)
        shift, logit = self._shift_and_logit(y_a)
        return torch.cat([y_a, y_b / torch.sigmoid(logit) - shift], dim=1)


class FlowStep(nn.Module):
    """One Glow step: ActNorm → invertible 1x1 convolution → affine coupling."""

    def __init__(self, channels: int, hidden_channels: int) -> None:
        super().__init__()
        self.actnorm = ActNorm(channels)
        self.invconv = InvConv1x1(channels)
        self.coupling = AffineCoupling(channels, hidden_channels)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x, ld_norm = self.actnorm(x)
        x, ld_conv = self.invconv(x)
        x, ld_coupling = self.coupling(x)
        return x, ld_norm + ld_conv + ld_coupling

    def inverse(self, y: Tensor) -> Tensor:
        return self.actnorm.inverse(self.invconv.inverse(self.coupling.inverse(y)))


class SplitPrior(nn.Module):
    """Conditional Gaussian prior of the channels split off at a level, given the channels kept."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = _zero_conv(channels // 2, channels)

    def forward(self, kept: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-std of the split-off half."""
        mean, log_std = self.conv(kept).chunk(2, dim=1)
        return mean, log_std


class TopPrior(nn.Module):
    """Learned diagonal Gaussian prior of the last level's output; a module of its own, so that its
    parameters are used inside a ``forward`` (where fimcb's hooks engine sees them)."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(1, *shape))
        self.log_std = nn.Parameter(torch.zeros(1, *shape))

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """Standardised latent ``(h - mean) / std`` and its log-Jacobian ``-sum(log_std)`` per sample."""
        return (h - self.mean) * torch.exp(-self.log_std), (-self.log_std.sum()).expand(h.shape[0])

    def inverse(self, latent: Tensor, temperature: float = 1.0) -> Tensor:
        return self.mean + torch.exp(self.log_std) * temperature * latent


class Glow(ImageLikelihoodModel):
    """Multi-scale Glow flow on dequantised images.

    Args:
        image_shape: ``(C, H, W)``; ``H`` and ``W`` must be divisible by ``2**n_levels``.
        num_levels: intensity levels per pixel; inputs are ``k / (num_levels - 1)`` for integer ``k``.
        n_levels: number of scales (squeeze, steps, split).
        n_steps: flow steps per scale.
        hidden_channels: width of the coupling networks.
        sample_temperature: standard-deviation multiplier of the priors when sampling.
        lr, warmup_steps, weight_decay, n_samples: see :class:`~fimcb.models.base.LikelihoodModule`.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int] = (1, 28, 28),
        num_levels: int = 256,
        n_levels: int = 2,
        n_steps: int = 8,
        hidden_channels: int = 64,
        sample_temperature: float = 0.7,
        lr: float = 1e-3,
        warmup_steps: int = 200,
        weight_decay: float = 0.0,
        n_samples: int = 64,
    ) -> None:
        super().__init__(
            image_shape=image_shape,
            num_levels=num_levels,
            lr=lr,
            warmup_steps=warmup_steps,
            weight_decay=weight_decay,
            n_samples=n_samples,
        )
        self.save_hyperparameters()
        if n_levels < 1 or n_steps < 1 or hidden_channels < 1:
            raise ValueError(
                f"n_levels, n_steps and hidden_channels must be positive, got {n_levels}, {n_steps}, "
                f"{hidden_channels}"
            )
        c, h, w = self.image_shape
        if h % 2**n_levels or w % 2**n_levels:
            raise ValueError(
                f"image height and width must be divisible by 2**n_levels = {2**n_levels} (one 2x2 squeeze "
                f"per level), got {h}x{w}; lower n_levels or pad the images"
            )
        self.sample_temperature = sample_temperature
        self.levels = nn.ModuleList()
        self.priors = nn.ModuleList()
        self.latent_shapes: list[tuple[int, int, int]] = []
        for level in range(n_levels):
            c, h, w = 4 * c, h // 2, w // 2
            self.levels.append(nn.ModuleList(FlowStep(c, hidden_channels) for _ in range(n_steps)))
            if level < n_levels - 1:
                self.priors.append(SplitPrior(c))
                self.latent_shapes.append((c // 2, h, w))
                c = c // 2
        self.latent_shapes.append((c, h, w))
        self.top_prior = TopPrior((c, h, w))

    def encode(self, y: Tensor) -> tuple[list[Tensor], Tensor]:
        """Map centred dequantised images ``y`` to standardised latents and the log-density ``log p(y)``.

        The latents are ``(z - mean) / std`` under each prior, one per split and then the top one (shapes
        :attr:`latent_shapes`); ``log p(y) = sum log N(latents; 0, I) + log|det d latents / dy|``.
        """
        h = y
        log_det = y.new_zeros(y.shape[0])
        latents = []
        for level, steps in enumerate(self.levels):
            h = squeeze2x2(h)
            for step in cast(Iterable[FlowStep], steps):
                h, step_log_det = step(h)
                log_det = log_det + step_log_det
            if level < len(self.priors):
                h, z = h.chunk(2, dim=1)
                mean, log_std = self.priors[level](h)
                latents.append((z - mean) * torch.exp(-log_std))
                log_det = log_det - log_std.flatten(1).sum(1)
        latent, top_log_det = self.top_prior(h)
        latents.append(latent)
        log_det = log_det + top_log_det
        return latents, log_det + sum(gaussian_log_prob(e) for e in latents)

    def decode(self, latents: list[Tensor], temperature: float = 1.0) -> Tensor:
        """Inverse of :meth:`encode` (at ``temperature`` 1; other values scale every prior's std)."""
        h = self.top_prior.inverse(latents[-1], temperature)
        for level in reversed(range(len(self.levels))):
            if level < len(self.priors):
                mean, log_std = self.priors[level](h)
                h = torch.cat([h, mean + torch.exp(log_std) * temperature * latents[level]], dim=1)
            for step in reversed(cast(nn.ModuleList, self.levels[level])):
                h = cast(FlowStep, step).inverse(h)
            h = unsqueeze2x2(h)
        return h

    def dequantize(self, x: Tensor) -> Tensor:
        """Map images on the level grid to ``(k + u) / num_levels`` in their dequantisation cells.

        ``u`` is fresh uniform noise in training and :func:`content_noise` of the image in eval mode.
        ``k`` carries a straight-through gradient so that ``x`` can still be differentiated.
        """
        scaled = x * (self.num_levels - 1)
        k = torch.round(scaled).clamp(0, self.num_levels - 1)
        u = torch.rand_like(x) if self.training else content_noise(k.to(torch.int64)).to(x.dtype)
        return (k + (scaled - scaled.detach()) + u) / self.num_levels

    def log_likelihood(self, x: Tensor) -> Tensor:
        """Dequantised log-likelihood ``log p(y) - D log(num_levels)`` in nats, shape ``[B]``: a lower bound
        on the log-probability of the discrete images ``x`` (in ``[0, 1]``)."""
        _, log_density = self.encode(self.dequantize(x) - 0.5)
        return log_density - self.num_dims * math.log(self.num_levels)

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """``n`` images drawn at ``sample_temperature``, quantised to the level grid in ``[0, 1]``."""
        device = self.top_prior.mean.device
        latents = [torch.randn(n, *shape, device=device) for shape in self.latent_shapes]
        y = self.decode(latents, self.sample_temperature) + 0.5
        levels = torch.floor(y.clamp(0, 1) * self.num_levels).clamp(max=self.num_levels - 1)
        return levels / (self.num_levels - 1)


# Per-sample gradient rules for fimcb's hooks engine: closed forms for Glow's own layers, which
# would otherwise take the slower module-local torch.func route. Each call's outputs are
# ``[y, log_det]`` and ``grads`` the gradients of the summed log-likelihood with respect to them.


@register_rule(ActNorm)
class ActNormRule(Rule):
    def factors(self, call: Call) -> dict[str, Factor]:
        module, (y, _), (g_y, g_det) = call.module, call.outputs, call.grads
        area = y.shape[2] * y.shape[3]
        bias = g_y.sum((2, 3), keepdim=True) * torch.exp(module.log_scale)
        log_scale = (g_y * y).sum((2, 3), keepdim=True) + area * g_det.reshape(-1, 1, 1, 1)
        return {"bias": Dense(bias.unsqueeze(1)), "log_scale": Dense(log_scale.unsqueeze(1))}


@register_rule(InvConv1x1)
class InvConv1x1Rule(Rule):
    """Per-sample ``∂/∂W = Σ_t b_t x_tᵀ``, then the chain rule through ``W = P L U`` to the LU factors."""

    def factors(self, call: Call) -> dict[str, Factor]:
        module, (y, _), (g_y, g_det) = call.module, call.outputs, call.grads
        g_w = torch.bmm(g_y.flatten(2), call.args[0].flatten(2).transpose(1, 2))  # Σ_t b_t x_tᵀ
        lower = module.lower * module.lower_mask + module.eye
        upper = module.upper * module.lower_mask.T + torch.diag(module.sign_s * torch.exp(module.log_s))
        pl_t_g = (module.perm @ lower).T @ g_w  # ∂/∂U (full upper factor)
        return {
            "lower": Dense(module.perm.T @ g_w @ upper.T * module.lower_mask),
            "upper": Dense(pl_t_g * module.lower_mask.T),
            "log_s": Dense(
                torch.diagonal(pl_t_g, dim1=1, dim2=2) * module.sign_s * torch.exp(module.log_s)
                + y.shape[2] * y.shape[3] * g_det.unsqueeze(1)
            ),
        }


@register_rule(TopPrior)
class TopPriorRule(Rule):
    def factors(self, call: Call) -> dict[str, Factor]:
        module, (latent, _), (g_latent, g_det) = call.module, call.outputs, call.grads
        mean = -g_latent * torch.exp(-module.log_std)
        log_std = -g_latent * latent - g_det.reshape(-1, 1, 1, 1)
        return {"mean": Dense(mean.unsqueeze(1)), "log_std": Dense(log_std.unsqueeze(1))}
