"""Noise that is a function of each sample's own content: deterministic, RNG-free, batch-independent.

Models whose likelihood needs randomness (dequantisation, a VAE's latent draw, a diffusion bound's
timesteps and noise) draw it from here in ``eval()`` mode, so a sample's score does not depend on
the rest of its batch or on the global RNG and can be differentiated per sample with ``torch.func``
(everything is elementwise integer arithmetic, which ``vmap`` supports).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """``x * c mod 2**32`` for 32-bit values in int64, split in 16-bit halves so nothing overflows."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def lowbias32(x: Tensor) -> Tensor:
    """The "lowbias32" integer hash, applied elementwise to 32-bit values held in an int64 tensor."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def content_seed(levels: Tensor) -> Tensor:
    """One 32-bit seed per sample (int64 ``[B]``), a hash of all (position, value) pairs of
    ``levels`` (int64 ``[B, ...]``, e.g. pixel levels or tokens)."""
    sample_shape = levels.shape[1:]
    position = torch.arange(math.prod(sample_shape), device=levels.device).reshape(sample_shape)
    cell = lowbias32((lowbias32(position ^ 0x68E31DA4) + levels) & _MASK32)
    return lowbias32(cell.flatten(1).sum(1) & _MASK32)


def seeded_uniform(seed: Tensor, shape: tuple[int, ...], salt: int = 0x1B56C4E9) -> Tensor:
    """Pseudo-uniform float32 noise in ``[0, 1)``, shape ``[B, *shape]``, from per-sample ``seed`` ``[B]``.

    Different ``salt`` values give independent streams from the same seed."""
    position = torch.arange(math.prod(shape), device=seed.device).reshape(shape)
    bits = lowbias32(seed.reshape((-1,) + (1,) * len(shape)) ^ lowbias32(position ^ (salt & _MASK32)))
    return (bits >> 8).to(torch.float32) * 2.0**-24


def seeded_normal(seed: Tensor, shape: tuple[int, ...], salt: int = 0x2C1B3C6D) -> Tensor:
    """Pseudo-standard-normal float32 noise, shape ``[B, *shape]``, by Box–Muller from two uniform streams."""
    u1 = seeded_uniform(seed, shape, salt)
    u2 = seeded_uniform(seed, shape, salt ^ 0x5BD1E995)
    radius = torch.sqrt(-2.0 * torch.log1p(-u1))  # 1 - u1 is in (0, 1]
    return radius * torch.cos(2.0 * math.pi * u2)


def content_noise(levels: Tensor) -> Tensor:
    """Pseudo-uniform noise in ``[0, 1)`` shaped like ``levels`` (int64 ``[B, ...]``), a function of each
    sample's own levels only."""
    return seeded_uniform(content_seed(levels), tuple(levels.shape[1:]))
