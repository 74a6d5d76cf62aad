"""Gated PixelCNN (van den Oord et al., 2016, "Conditional Image Generation with PixelCNN Decoders").

An autoregressive model with an exact discrete likelihood: every sub-pixel gets a ``num_levels``-way
softmax given the pixels before it in raster order and, for colour images, the channels before it at
the same pixel (R → G → B). The causal structure comes from shifts instead of masks: a vertical stack
of ``(k//2 + 1) x k`` convolutions padded only at the top sees the rows strictly above a pixel, a
horizontal stack of ``1 x (k//2 + 1)`` convolutions padded only on the left sees the pixels to its
left, and the first layer shifts both by one so that a pixel never sees itself. Combining the two
stacks removes the blind spot of the original PixelCNN. Every parameter lives in a plain
``nn.Conv2d`` (the channel order of colour images too: one output head per channel, fed the earlier
channels of the pixel by their own 1x1 convolution), so fimcb's hooks engine gets exact per-sample
gradients from its built-in convolution rule.

``log_likelihood`` is exact and deterministic (no noise at all), so eval and training mode agree.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fimcb.models.base import ImageLikelihoodModel


def shift_down(x: Tensor) -> Tensor:
    """Move every row one down (zeros enter at the top): position ``i`` then holds row ``i - 1``."""
    return F.pad(x, (0, 0, 1, 0))[:, :, : x.shape[2]]


def shift_right(x: Tensor) -> Tensor:
    """Move every column one right (zeros enter on the left): position ``j`` then holds column ``j - 1``."""
    return F.pad(x, (1, 0))[..., : x.shape[3]]


def gate(x: Tensor) -> Tensor:
    """Gated activation ``tanh(a) * sigmoid(b)`` of the two channel halves ``a, b`` of ``x``."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class CausalConv(nn.Module):
    """A plain ``nn.Conv2d`` (no padding of its own) behind a zero padding that keeps the image size and
    makes the convolution look only at earlier rows or columns; a wrapper rather than a subclass, so that
    fimcb's hooks engine applies its built-in convolution rule to the child."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], padding: tuple[int, ...]
    ) -> None:
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, self.padding))


def vertical_conv(in_channels: int, out_channels: int, kernel_size: int) -> CausalConv:
    """``(k//2 + 1) x k`` convolution over the rows up to and including each output row."""
    half = kernel_size // 2
    return CausalConv(in_channels, out_channels, (half + 1, kernel_size), (half, half, half, 0))


def horizontal_conv(in_channels: int, out_channels: int, kernel_size: int) -> CausalConv:
    """``1 x (k//2 + 1)`` convolution over the pixels of a row up to and including each output pixel."""
    half = kernel_size // 2
    return CausalConv(in_channels, out_channels, (1, half + 1), (half, 0, 0, 0))


class GatedBlock(nn.Module):
    """One gated layer of both stacks (Figure 2 of the paper).

    The vertical features ``v`` at ``(i, j)`` depend only on rows ``< i`` of the image, the horizontal
    features ``h`` only on pixels before ``(i, j)`` in raster order. A block's vertical convolution
    ``vertical(v)`` (2x the channels, pre-gate) feeds the next vertical layer through the gate and the
    horizontal stack through a 1x1 convolution; no extra shift is needed there since ``v`` already
    excludes row ``i``. :meth:`forward` is the residual update of the horizontal stack.
    """

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        self.vertical = vertical_conv(channels, 2 * channels, kernel_size)
        self.horizontal = horizontal_conv(channels, 2 * channels, kernel_size)
        self.vertical_to_horizontal = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.residual = nn.Conv2d(channels, channels, 1)

    def forward(self, h: Tensor, v_features: Tensor) -> Tensor:
        """Next horizontal features from ``h`` and this block's pre-gate vertical features."""
        h_features = self.horizontal(h) + self.vertical_to_horizontal(v_features)
        return h + self.residual(gate(h_features))


class PixelCNN(ImageLikelihoodModel):
    """Gated PixelCNN with a ``num_levels``-way softmax per sub-pixel (exact discrete likelihood).

    Args:
        image_shape: ``(C, H, W)``; colour channels are modelled in order (``C = 3``: R → G → B).
        num_levels: intensity levels per pixel; inputs are ``k / (num_levels - 1)`` for integer ``k``.
        n_layers: gated blocks after the input layer (at least one).
        hidden_channels: feature channels of both stacks and the output head.
        kernel_size: odd width ``k`` of the gated blocks' convolutions.
        input_kernel_size: odd width of the first (self-excluding) layer, 7 in the paper.
        lr, warmup_steps, weight_decay, n_samples: see :class:`~fimcb.models.base.LikelihoodModule`.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int] = (1, 28, 28),
        num_levels: int = 256,
        n_layers: int = 5,
        hidden_channels: int = 64,
        kernel_size: int = 3,
        input_kernel_size: int = 7,
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
        if n_layers < 1 or hidden_channels < 1:
            raise ValueError(  # the vertical stack reaches the output through the blocks only
                f"n_layers and hidden_channels must be positive, got {n_layers} and {hidden_channels}"
            )
        if kernel_size < 1 or kernel_size % 2 == 0 or input_kernel_size < 1 or input_kernel_size % 2 == 0:
            raise ValueError(
                f"kernel sizes must be odd and positive, got {kernel_size} and {input_kernel_size}"
            )
        channels = self.image_shape[0]
        # channels + 1: the constant channel of _with_ones
        self.vertical_in = vertical_conv(channels + 1, hidden_channels, input_kernel_size)
        self.horizontal_in = horizontal_conv(channels + 1, hidden_channels, input_kernel_size)
        self.blocks = nn.ModuleList(GatedBlock(hidden_channels, kernel_size) for _ in range(n_layers))
        self.hidden = nn.Conv2d(hidden_channels, channels * hidden_channels, 1)
        self.context = nn.ModuleList(nn.Conv2d(c, hidden_channels, 1, bias=False) for c in range(1, channels))
        self.out = nn.ModuleList(nn.Conv2d(hidden_channels, self.num_levels, 1) for _ in range(channels))

    @staticmethod
    def _with_ones(u: Tensor) -> Tensor:
        """Append a constant channel of ones, which lets the network tell zero padding from mid-grey."""
        return torch.cat([u, torch.ones_like(u[:, :1])], dim=1)

    def vertical_features(self, u: Tensor) -> list[Tensor]:
        """Each block's pre-gate vertical features of centred images ``u`` (in ``[-1, 1]``); those at row
        ``i`` depend only on rows ``< i``."""
        v = shift_down(self.vertical_in(self._with_ones(u)))
        features = []
        for block in cast(Iterable[GatedBlock], self.blocks):
            features.append(block.vertical(v))
            v = gate(features[-1])
        return features

    def horizontal_features(self, u: Tensor, v_features: list[Tensor]) -> Tensor:
        """Horizontal-stack features ``[B, hidden, H, W]`` of centred images ``u`` given the vertical
        features; each row is computed from its own row alone (any crop of columns ``0 .. j`` works)."""
        h = shift_right(self.horizontal_in(self._with_ones(u)))
        for block, v in zip(self.blocks, v_features, strict=True):
            h = block(h, v)
        return h

    def features(self, u: Tensor) -> Tensor:
        """Features ``[B, hidden, H, W]`` of centred images ``u``; those at ``(i, j)`` depend only on the
        pixels before ``(i, j)`` in raster order."""
        return self.horizontal_features(u, self.vertical_features(u))

    def head(self, h: Tensor, u: Tensor) -> Tensor:
        """Logits ``[B, C, num_levels, H, W]`` from features ``h`` and the centred pixels ``u`` themselves:
        channel ``c`` of each pixel sees only channels ``< c`` of that pixel (pixel-wise, so ``h`` and
        ``u`` may be any matching spatial crop)."""
        hidden = self.hidden(F.elu(h)).chunk(len(self.out), dim=1)
        logits = []
        for c, (z, out) in enumerate(zip(hidden, self.out, strict=True)):
            if c > 0:
                z = z + self.context[c - 1](u[:, :c])
            logits.append(out(F.elu(z)))
        return torch.stack(logits, dim=1)

    def logits(self, x: Tensor) -> Tensor:
        """Logits ``[B, C, num_levels, H, W]`` of every sub-pixel of images ``x`` in ``[0, 1]`` given the
        sub-pixels before it (differentiable in ``x``)."""
        u = 2.0 * x - 1.0
        return self.head(self.features(u), u)

    def log_likelihood(self, x: Tensor) -> Tensor:
        """Exact log-probability in nats of the discrete images ``x`` (in ``[0, 1]``), shape ``[B]``."""
        levels = self.to_levels(x)
        grid = levels.to(x.dtype) / (self.num_levels - 1)
        # Straight-through: the network sees the level grid, and input gradients (double-backprop
        # saliency) pass to x as if the rounding were the identity; the value is unchanged on the grid.
        log_probs = self.logits(x + (grid - x).detach()).log_softmax(dim=2)
        return log_probs.gather(2, levels.unsqueeze(2)).flatten(1).sum(1)

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """``n`` images by ancestral sampling, sub-pixel by sub-pixel, on the level grid in ``[0, 1]``.

        Uses the global RNG. Row ``i``'s vertical features depend only on rows ``< i`` and are computed once
        per row; each pixel then runs the horizontal stack over its own row, up to itself.
        """
        channels, height, width = self.image_shape
        weight = cast(nn.Conv2d, self.out[0]).weight
        levels = torch.zeros(n, channels, height, width, dtype=torch.int64, device=weight.device)
        u = torch.full(levels.shape, -1.0, dtype=weight.dtype, device=weight.device)
        for i in range(height):
            row_features = [v[:, :, i : i + 1] for v in self.vertical_features(u[:, :, : i + 1])]
            for j in range(width):
                pixel = u[:, :, i : i + 1, j : j + 1]  # a view: sees each channel as it is drawn
                left = [v[..., : j + 1] for v in row_features]
                h = self.horizontal_features(u[:, :, i : i + 1, : j + 1], left)
                for c in range(channels):
                    logits = self.head(h[..., j:], pixel)[:, c, :, 0, 0]
                    levels[:, c, i, j] = torch.multinomial(logits.softmax(dim=1), 1)[:, 0]
                    u[:, c, i, j] = 2.0 * levels[:, c, i, j].to(u.dtype) / (self.num_levels - 1) - 1.0
        return levels.to(weight.dtype) / (self.num_levels - 1)
