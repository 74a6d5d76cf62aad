"""A variational diffusion model (Kingma et al., 2021, "VDM") on discrete images, with a small U-Net.

The forward process is ``z_t = α_t x + σ_t ε`` with ``x`` the image scaled to ``[-1, 1]``, a variance-
preserving schedule ``α_t² = sigmoid(-γ(t))``, ``σ_t² = sigmoid(γ(t))`` and a fixed linear log-SNR
``-γ(t)`` with ``γ(t) = γ_min + (γ_max - γ_min) t``. A U-Net predicts ``ε`` from ``z_t`` (with Fourier
features of it) and an embedding of ``t``. The variational bound on the log-probability of the
*discrete* image, in nats, is

    log P(x) ≥ E[log p(x | z_0)] - KL(q(z_1 | x) || N(0, I)) - ½ γ' ∫₀¹ E_ε ||ε - ε̂(z_t, t)||² dt,

with VDM's discrete decoder ``p(x | z_0)``: per pixel a Gaussian around ``z_0 / α_0`` evaluated at each
level's value and normalised over the ``num_levels`` levels (a softmax), a proper distribution.

``log_likelihood`` estimates it with one random ``t`` per sample in training (low-discrepancy across the
batch, as in VDM) and, in ``eval()`` mode, with the midpoint rule on ``n_eval_timesteps`` fixed times
and noise that is a hash of the image (:mod:`fimcb.models.noise`): deterministic per sample,
independent of the batch, RNG-free and differentiable per sample with ``torch.func``. The U-Net runs
once per timestep on the whole batch, so every layer sees one row per sample, as fimcb's hooks engine
needs. ``likelihood="simple"`` gives the score of the method's paper instead (see :class:`Diffusion`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fimcb.models.base import ImageLikelihoodModel
from fimcb.models.noise import content_seed, seeded_normal

# Independent noise streams of the eval-mode bound: one per use.
_SALT_DECODER = 0x6A09E667
_SALT_DIFFUSION = 0xBB67AE85

Likelihood = Literal["vlb", "simple"]


def _sigmoid(v: float) -> float:
    """The logistic function of a Python float (for the schedule's constants at ``t = 0`` and ``t = 1``)."""
    return 1.0 / (1.0 + math.exp(-v))


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding ``[B, dim]`` of times ``t`` in ``[0, 1]`` (scaled by 1000, as DDPM's steps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=t.dtype, device=t.device) / half)
    angles = 1000.0 * t[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def group_norm(channels: int, n_groups: int) -> nn.GroupNorm:
    """GroupNorm with the most groups, at most ``n_groups``, that divide ``channels`` into groups of at
    least 4 channels (a group of one would cancel the bias of the layer before it exactly, which leaves
    that bias without any gradient)."""
    return nn.GroupNorm(math.gcd(n_groups, max(1, channels // 4)), channels)


class ResBlock(nn.Module):
    """Pre-activation residual block, GroupNorm → SiLU → 3x3 conv twice, conditioned on the time embedding
    by a per-channel scale and shift after the second GroupNorm (improved DDPM's scale-shift norm). The
    second convolution starts at zero, so each block starts as the identity (or its skip projection)."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, n_groups: int) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels, n_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_channels)
        self.norm2 = group_norm(out_channels, n_groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        assert self.conv2.bias is not None  # bias=True
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        out = self.norm2(self.conv1(F.silu(self.norm1(h)))) * (1.0 + scale) + shift
        return self.skip(h) + self.conv2(F.silu(out))


class UNet(nn.Module):
    """A small U-Net ``ε̂(z, t)``: one resolution per entry of ``channel_mults`` (width ``channels * mult``,
    ``n_res_blocks`` blocks, halved by a stride-2 conv between resolutions), two middle blocks, and a
    mirrored up path that concatenates each resolution's skip features. No attention and no BatchNorm:
    every parameter sits in a Conv2d, Linear or GroupNorm. The output layer starts at zero (``ε̂ = 0``).

    ``fourier_frequencies`` adds ``sin(f z)`` and ``cos(f z)`` input channels for each ``f`` (VDM's Fourier
    features): they let the network see where ``z`` sits between the data's levels at low noise, where the
    fine-scale noise is otherwise unpredictable and the bound pays for every level it cannot resolve.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        channel_mults: tuple[int, ...],
        n_res_blocks: int,
        n_groups: int,
        fourier_frequencies: tuple[float, ...] = (),
    ) -> None:
        super().__init__()
        emb_dim = 4 * channels
        self.channels = channels
        self.fourier_frequencies = tuple(fourier_frequencies)
        self.time_mlp = nn.Sequential(
            nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim), nn.SiLU()
        )
        n_features = in_channels * (1 + 2 * len(self.fourier_frequencies))
        self.conv_in = nn.Conv2d(n_features, channels, 3, padding=1)
        widths = [channels * m for m in channel_mults]
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        width = channels
        for i, out in enumerate(widths):
            blocks = [ResBlock(width if j == 0 else out, out, emb_dim, n_groups) for j in range(n_res_blocks)]
            self.down.append(nn.ModuleList(blocks))
            width = out
            if i < len(widths) - 1:
                self.downsample.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
        self.mid = nn.ModuleList([ResBlock(width, width, emb_dim, n_groups) for _ in range(2)])
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, out in reversed(list(enumerate(widths))):
            blocks = [
                ResBlock(width + out if j == 0 else out, out, emb_dim, n_groups) for j in range(n_res_blocks)
            ]
            self.up.append(nn.ModuleList(blocks))
            width = out
            if i > 0:
                self.upsample.append(nn.Conv2d(width, widths[i - 1], 3, padding=1))
                width = widths[i - 1]
        self.norm_out = group_norm(width, n_groups)
        self.conv_out = nn.Conv2d(width, in_channels, 3, padding=1)
        assert self.conv_out.bias is not None  # bias=True
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, z: Tensor, t: Tensor) -> Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.channels))
        features = [z]
        for f in self.fourier_frequencies:
            features += [torch.sin(f * z), torch.cos(f * z)]
        h = self.conv_in(torch.cat(features, dim=1))
        skips = []
        for i, blocks in enumerate(self.down):
            for block in cast(Iterable[ResBlock], blocks):
                h = block(h, emb)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        for block in cast(Iterable[ResBlock], self.mid):
            h = block(h, emb)
        for i, blocks in enumerate(self.up):
            h = torch.cat([h, skips.pop()], dim=1)
            for block in cast(Iterable[ResBlock], blocks):
                h = block(h, emb)
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))


class Diffusion(ImageLikelihoodModel):
    """Continuous-time variational diffusion model with ε-prediction and a fixed linear log-SNR schedule.

    Args:
        image_shape: ``(C, H, W)``; ``H`` and ``W`` must be divisible by ``2**(len(channel_mults) - 1)``.
        num_levels: intensity levels per pixel; inputs are ``k / (num_levels - 1)`` for integer ``k``.
        channels: base width of the U-Net.
        channel_mults: width multiplier of each U-Net resolution (one entry per resolution).
        n_res_blocks: residual blocks per resolution and path.
        n_groups: GroupNorm groups (at most; the largest divisor of each width not above it).
        fourier_features: feed the U-Net ``sin``/``cos`` of ``z`` at the level spacing's frequencies (see
            :class:`UNet`): much better bounds at low noise, at the cost of a few input channels.
        gamma_min, gamma_max: ``γ = log σ² / α²`` at ``t = 0`` and ``t = 1`` (VDM's -13.3 and 5).
        likelihood: ``"vlb"``: the variational bound above, in nats of the discrete image (a lower bound
            on ``log P(x)``). ``"simple"``: the score used by the method's paper, ``-||ε - ε̂(z_t, t)||²``
            summed over pixels at the fixed time ``t_simple`` with one noise draw (in training: DDPM's
            simplified loss, ``t`` uniform in ``[0, 1]``). It is *not* a normalised log-likelihood: its
            logged NLL and bits/dim are not comparable with other models'.
        n_eval_timesteps: times of the eval-mode midpoint quadrature of the diffusion integral (each
            with its own noise draw); every one costs a U-Net pass. Unused by ``"simple"``.
        t_simple: the time of the ``"simple"`` score (0 is the least noisy, ``σ_0² = sigmoid(γ_min)``).
        n_sample_steps: ancestral sampling steps of :meth:`sample`.
        lr, warmup_steps, weight_decay, n_samples: see :class:`~fimcb.models.base.LikelihoodModule`.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int] = (1, 28, 28),
        num_levels: int = 256,
        channels: int = 32,
        channel_mults: tuple[int, ...] = (1, 2, 2),
        n_res_blocks: int = 1,
        n_groups: int = 8,
        fourier_features: bool = True,
        gamma_min: float = -13.3,
        gamma_max: float = 5.0,
        likelihood: Likelihood = "vlb",
        n_eval_timesteps: int = 8,
        t_simple: float = 0.0,
        n_sample_steps: int = 200,
        lr: float = 2e-4,
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
        if likelihood not in ("vlb", "simple"):
            raise ValueError(f"likelihood must be 'vlb' or 'simple', got {likelihood!r}")
        if channels < 1 or n_res_blocks < 1 or n_groups < 1 or not channel_mults or min(channel_mults) < 1:
            raise ValueError(
                f"channels, n_res_blocks, n_groups and every channel_mults entry must be positive, got "
                f"{channels}, {n_res_blocks}, {n_groups}, {channel_mults}"
            )
        if n_eval_timesteps < 1 or n_sample_steps < 1:
            raise ValueError(
                f"n_eval_timesteps and n_sample_steps must be positive, got {n_eval_timesteps}, "
                f"{n_sample_steps}"
            )
        if not gamma_min < gamma_max or not 0.0 <= t_simple <= 1.0:
            raise ValueError(
                f"need gamma_min < gamma_max and 0 <= t_simple <= 1, got {gamma_min}, {gamma_max}, {t_simple}"
            )
        c, h, w = self.image_shape
        factor = 2 ** (len(channel_mults) - 1)
        if h % factor or w % factor:
            raise ValueError(
                f"image height and width must be divisible by 2**(len(channel_mults) - 1) = {factor}, got "
                f"{h}x{w}; use fewer channel_mults"
            )
        self.gamma_min, self.gamma_max = float(gamma_min), float(gamma_max)
        self.likelihood = likelihood
        self.n_eval_timesteps = n_eval_timesteps
        self.t_simple = float(t_simple)
        self.n_sample_steps = n_sample_steps
        # periods of two level spacings and one: z / level spacing, modulo 2 and 1
        level_frequency = math.pi * (self.num_levels - 1) / 2
        frequencies = (level_frequency, 2 * level_frequency) if fourier_features else ()
        self.eps_model = UNet(c, channels, tuple(channel_mults), n_res_blocks, n_groups, frequencies)

    def gamma(self, t: Tensor) -> Tensor:
        """``γ(t) = log σ_t² / α_t²``, linear in ``t``."""
        return self.gamma_min + (self.gamma_max - self.gamma_min) * t

    def scale(self, x: Tensor) -> Tensor:
        """Images in ``[0, 1]`` to the model's data space ``[-1, 1]``."""
        return 2.0 * x - 1.0

    def level_values(self, like: Tensor) -> Tensor:
        """The ``num_levels`` level values in data space, ``[-1, 1]``."""
        return torch.linspace(-1.0, 1.0, self.num_levels, dtype=like.dtype, device=like.device)

    def decoder_log_probs(self, z_0: Tensor) -> Tensor:
        """``log p(x = level | z_0)`` per pixel, ``[B, C, H, W, num_levels]`` (each pixel sums to one)."""
        z_rescaled = z_0 / math.sqrt(_sigmoid(-self.gamma_min))  # z_0 / α_0
        logits = -0.5 * math.exp(-self.gamma_min) * (z_rescaled[..., None] - self.level_values(z_0)) ** 2
        return torch.log_softmax(logits, dim=-1)

    def reconstruction(self, x: Tensor, levels: Tensor, eps: Tensor) -> Tensor:
        """``log p(x | z_0)`` at ``z_0 = α_0 x + σ_0 ε``, shape ``[B]``."""
        z_0 = math.sqrt(_sigmoid(-self.gamma_min)) * x + math.sqrt(_sigmoid(self.gamma_min)) * eps
        log_probs = self.decoder_log_probs(z_0)
        return log_probs.gather(-1, levels[..., None]).flatten(1).sum(1)

    def prior_kl(self, x: Tensor) -> Tensor:
        """``KL(q(z_1 | x) || N(0, I))`` in closed form, shape ``[B]``."""
        var_1 = _sigmoid(self.gamma_max)
        kl = 0.5 * (_sigmoid(-self.gamma_max) * x**2 + var_1 - math.log(var_1) - 1.0)
        return kl.flatten(1).sum(1)

    def eps_error(self, x: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """``||ε - ε̂(z_t, t)||²`` per sample at per-sample times ``t`` ``[B]``, shape ``[B]``."""
        gamma = self.gamma(t)[:, None, None, None]
        z_t = torch.sqrt(torch.sigmoid(-gamma)) * x + torch.sqrt(torch.sigmoid(gamma)) * eps
        return ((eps - self.eps_model(z_t, t)) ** 2).flatten(1).sum(1)

    def diffusion_loss(self, x: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """``½ γ'(t) ||ε - ε̂(z_t, t)||²``, shape ``[B]``: the integrand whose mean over ``t ~ U(0, 1)`` and
        ``ε ~ N(0, I)`` is the bound's diffusion loss."""
        return 0.5 * (self.gamma_max - self.gamma_min) * self.eps_error(x, t, eps)

    def log_likelihood(self, x: Tensor) -> Tensor:
        """The variational bound (``likelihood="vlb"``, nats) or the simple score, shape ``[B]``: one random
        draw in training, deterministic per sample in eval mode."""
        levels = self.to_levels(x)
        data = self.scale(x)
        shape = tuple(x.shape[1:])
        ones = torch.ones_like(data[:, 0, 0, 0])  # [B], built from x so that it works under vmap
        seed = None if self.training else content_seed(levels)
        if self.likelihood == "simple":
            if self.training:
                return -self.eps_error(data, torch.rand_like(ones), torch.randn_like(data))
            assert seed is not None  # eval mode
            eps = seeded_normal(seed, shape, _SALT_DIFFUSION).to(x.dtype)
            return -self.eps_error(data, self.t_simple * ones, eps)
        if self.training:
            # t_b = (u + b / B) mod 1: stratified over the batch (VDM's low-discrepancy sampler), each uniform
            offsets = torch.arange(len(x), dtype=x.dtype, device=x.device) / len(x)
            times = [torch.remainder(torch.rand((), dtype=x.dtype, device=x.device) + offsets, 1.0)]
            noises: Sequence[Tensor] = [torch.randn_like(data)]
            eps_0 = torch.randn_like(data)
        else:  # midpoint rule on n fixed times, an independent noise draw at each
            assert seed is not None  # eval mode
            n = self.n_eval_timesteps
            times = [(i + 0.5) / n * ones for i in range(n)]
            noises = seeded_normal(seed, (n, *shape), _SALT_DIFFUSION).to(x.dtype).unbind(1)
            eps_0 = seeded_normal(seed, shape, _SALT_DECODER).to(x.dtype)
        diffusion = sum(self.diffusion_loss(data, t, e) for t, e in zip(times, noises, strict=True)) / len(
            times
        )
        return self.reconstruction(data, levels, eps_0) - self.prior_kl(data) - diffusion

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """``n`` images by ancestral sampling over ``n_sample_steps`` equal steps of ``t`` from 1 to 0, then a
        draw from the discrete decoder; on the level grid in ``[0, 1]``."""
        param = self.eps_model.conv_out.weight
        z = torch.randn(n, *self.image_shape, dtype=param.dtype, device=param.device)
        steps = self.n_sample_steps
        for i in reversed(range(1, steps + 1)):
            t = torch.full((n,), i / steps, dtype=z.dtype, device=z.device)
            gamma_t, gamma_s = (
                self.gamma(t)[:, None, None, None],
                self.gamma(t - 1 / steps)[:, None, None, None],
            )
            c = -torch.expm1(gamma_s - gamma_t)  # 1 - SNR(t) / SNR(s)
            eps_hat = self.eps_model(z, t)
            mean = torch.sqrt(torch.sigmoid(-gamma_s) / torch.sigmoid(-gamma_t)) * (
                z - torch.sqrt(torch.sigmoid(gamma_t)) * c * eps_hat
            )
            z = mean + torch.sqrt(torch.sigmoid(gamma_s) * c) * torch.randn_like(z)
        levels = torch.distributions.Categorical(logits=self.decoder_log_probs(z)).sample()
        return levels.to(z.dtype) / (self.num_levels - 1)
