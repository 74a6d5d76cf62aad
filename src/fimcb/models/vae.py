"""A convolutional variational autoencoder with a discretised logistic decoder.

The latent is a small spatial map ``z`` of shape ``(latent_channels, H / 2**n_downsample,
W / 2**n_downsample)`` with a standard normal prior. A convolutional encoder gives a diagonal
Gaussian ``q(z|x)``; a convolutional decoder gives, for every pixel and channel independently, a
discretised logistic ``p(x|z)`` on the image's ``num_levels`` levels (see
:mod:`fimcb.models.distributions`): a proper distribution on the discrete data, so the bounds below
are bounds on the log-probability of the discrete image itself, not on a density.

``log_likelihood`` is the ELBO (one latent draw, analytic KL) or, with ``n_importance = k > 1``, the
importance-weighted bound IWAE(k) (Burda et al., 2016). Training draws the latent noise from the
global RNG; in ``eval()`` mode it is a hash of the image (:mod:`fimcb.models.noise`), so a sample's
score is deterministic, independent of its batch and differentiable per sample with ``torch.func``.
Every parameter lives in an ``nn.Conv2d``, ``nn.ConvTranspose2d`` or ``nn.GroupNorm``, all of which
have exact per-sample rules in fimcb's hooks engine, and every layer is called on the whole batch
(the ``k`` importance draws are decoded one after the other), as that engine requires.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import Tensor, nn

from fimcb.core.checks import check_int
from fimcb.models.base import ImageLikelihoodModel
from fimcb.models.distributions import (
    discretized_logistic_log_prob,
    gaussian_log_prob,
    sample_discretized_logistic,
)
from fimcb.models.noise import content_seed, seeded_normal

# Salt of the eval-mode latent noise (one stream; the k importance draws are its leading dimension).
_LATENT_SALT = 0x5AE1A7E5
_STREAM_STEP = 0x9E3779B9  # between the salts of successive latent streams (the golden-ratio constant)
# Floor of the decoder's log-scale: keeps the bins' standardised widths finite (PixelCNN++ uses -7).
_MIN_LOG_SCALE = -7.0


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 8 groups (a divisor of ``channels``): per-sample, unlike BatchNorm."""
    return nn.GroupNorm(math.gcd(8, channels), channels)


class ResBlock(nn.Module):
    """Pre-activation residual block: ``x + conv(SiLU(GN(conv(SiLU(GN(x))))))``, 3x3 convolutions."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            _group_norm(channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            _group_norm(channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


class VAE(ImageLikelihoodModel):
    """Convolutional VAE on discrete images; ``log_likelihood`` is the ELBO or IWAE(k) bound in nats.

    Args:
        image_shape: ``(C, H, W)``; ``H`` and ``W`` must be divisible by ``2**n_downsample``.
        num_levels: intensity levels per pixel; inputs are ``k / (num_levels - 1)`` for integer ``k``.
        hidden_channels: width of the encoder and decoder.
        latent_channels: channels of the latent map.
        n_downsample: stride-2 stages of the encoder (and transposed-convolution stages of the decoder).
        n_res_blocks: residual blocks per stage.
        n_importance: latent draws ``k`` per sample; 1 gives the ELBO with analytic KL, more the IWAE(k)
            bound ``log mean_j p(x, z_j) / q(z_j|x)``, tighter and ``k`` decoder passes dearer.
        latent_stream: which stream of eval-mode latent noise a sample's draws come from (0, the
            default, is the one every earlier score used); scores from several streams are independent
            draws of the same bound, for averaging features over latent draws. Settable later as
            ``noise_stream`` (the model protocol's name, :func:`fimcb.core.protocol.noise_streams`).
        lr, warmup_steps, weight_decay, n_samples: see :class:`~fimcb.models.base.LikelihoodModule`.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int] = (1, 28, 28),
        num_levels: int = 256,
        hidden_channels: int = 32,
        latent_channels: int = 8,
        n_downsample: int = 2,
        n_res_blocks: int = 1,
        n_importance: int = 1,
        latent_stream: int = 0,
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
        if min(hidden_channels, latent_channels, n_importance) < 1 or min(n_downsample, n_res_blocks) < 0:
            raise ValueError(
                "need positive hidden_channels, latent_channels, n_importance and non-negative n_downsample, "
                f"n_res_blocks; got {hidden_channels}, {latent_channels}, {n_importance}, {n_downsample}, "
                f"{n_res_blocks}"
            )
        c, h, w = self.image_shape
        if h % 2**n_downsample or w % 2**n_downsample:
            raise ValueError(
                f"image height and width must be divisible by 2**n_downsample = {2**n_downsample}, got "
                f"{h}x{w}; lower n_downsample or pad the images"
            )
        self.n_importance = n_importance
        self.noise_stream = latent_stream
        self.latent_shape = (latent_channels, h // 2**n_downsample, w // 2**n_downsample)
        width = hidden_channels

        def blocks() -> list[nn.Module]:
            return [ResBlock(width) for _ in range(n_res_blocks)]

        encoder: list[nn.Module] = [nn.Conv2d(c, width, 3, padding=1), *blocks()]
        for _ in range(n_downsample):
            encoder += [nn.SiLU(), nn.Conv2d(width, width, 4, stride=2, padding=1), *blocks()]
        encoder += [nn.SiLU(), nn.Conv2d(width, 2 * latent_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*encoder)

        decoder: list[nn.Module] = [nn.Conv2d(latent_channels, width, 3, padding=1), *blocks()]
        for _ in range(n_downsample):
            decoder += [nn.SiLU(), nn.ConvTranspose2d(width, width, 4, stride=2, padding=1), *blocks()]
        decoder += [nn.SiLU(), nn.Conv2d(width, 2 * c, 3, padding=1)]
        self.decoder = nn.Sequential(*decoder)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-std of ``q(z|x)`` for images ``x`` in ``[0, 1]``, each ``[B, *latent_shape]``."""
        mean, log_std = self.encoder(2.0 * x - 1.0).chunk(2, dim=1)
        return mean, log_std

    def decode(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Per-pixel mean (on the ``[-1, 1]`` scale) and log-scale of ``p(x|z)``, each ``[B, C, H, W]``."""
        mean, log_scale = self.decoder(z).chunk(2, dim=1)
        return mean, log_scale.clamp(min=_MIN_LOG_SCALE)

    def log_prob_given_latent(self, levels: Tensor, z: Tensor) -> Tensor:
        """``log p(x|z)`` in nats, ``[B]``, of integer ``levels`` ``[B, C, H, W]`` given latents ``z``."""
        mean, log_scale = self.decode(z)
        return discretized_logistic_log_prob(levels, mean, log_scale, self.num_levels).flatten(1).sum(1)

    @property
    def noise_stream(self) -> int:
        """The stream of eval-mode latent noise the log-likelihood draws from."""
        return self._noise_stream

    @noise_stream.setter
    def noise_stream(self, stream: int) -> None:
        self._noise_stream = check_int("noise_stream", stream, minimum=0)
        self._latent_salt = (_LATENT_SALT + _STREAM_STEP * self._noise_stream) & 0xFFFFFFFF

    def latent_noise(self, levels: Tensor, dtype: torch.dtype) -> Tensor:
        """Standard normal noise ``[k, B, *latent_shape]``: fresh in training, from ``levels`` in eval."""
        k, b = self.n_importance, levels.shape[0]
        if self.training:
            return torch.randn(k, b, *self.latent_shape, dtype=dtype, device=levels.device)
        noise = seeded_normal(content_seed(levels), (k, *self.latent_shape), salt=self._latent_salt)
        return noise.to(dtype).transpose(0, 1)

    def log_likelihood(self, x: Tensor) -> Tensor:
        """ELBO (``n_importance`` 1) or IWAE(k) bound on ``log P(x)`` in nats, shape ``[B]``, of images ``x``
        on the level grid in ``[0, 1]``."""
        levels = self.to_levels(x)
        mean, log_std = self.encode(x)
        noise = self.latent_noise(levels, mean.dtype)
        std = torch.exp(log_std)
        if self.n_importance == 1:
            kl = 0.5 * (mean**2 + std**2 - 1.0 - 2.0 * log_std)
            return self.log_prob_given_latent(levels, mean + std * noise[0]) - kl.flatten(1).sum(1)
        log_weights = []
        for eps in noise:  # a static loop: every decoder call sees the whole batch
            z = mean + std * eps
            log_q = gaussian_log_prob(eps) - log_std.flatten(1).sum(1)  # log N(z; mean, std²)
            log_weights.append(self.log_prob_given_latent(levels, z) + gaussian_log_prob(z) - log_q)
        return torch.logsumexp(torch.stack(log_weights), dim=0) - math.log(self.n_importance)

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """``n`` images from the model: ``z`` from the prior, then every pixel from ``p(x|z)``."""
        weight = cast(nn.Conv2d, self.decoder[0]).weight
        z = torch.randn(n, *self.latent_shape, dtype=weight.dtype, device=weight.device)
        levels = sample_discretized_logistic(*self.decode(z), self.num_levels)
        return levels.to(weight.dtype) / (self.num_levels - 1)
