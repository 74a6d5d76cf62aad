"""Shared Lightning plumbing for likelihood-based generative models.

:class:`LikelihoodModule` trains any model on its negative log-likelihood, logs it per split in
nats and in a per-dimension unit (bits/dim for images, nats/token for text), and logs samples at the
end of each validation epoch. :class:`ImageLikelihoodModel` adds images: bits/dim and a sample grid.
Subclasses implement ``log_likelihood`` (nats of the *discrete* data, shape ``[B]``): stochastic in
training mode if they like, deterministic per sample in ``eval()`` mode.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torchvision.utils import make_grid

from fimcb.core.protocol import unpack_batch
from fimcb.lightning.dashboards import log_image


class LikelihoodModule(L.LightningModule):
    """Base class: trains on ``-log_likelihood(x).mean()`` with AdamW and a linear warm-up.

    Args:
        lr: AdamW learning rate.
        warmup_steps: linear learning-rate warm-up, in optimizer steps.
        weight_decay: AdamW's decoupled weight decay (0 is plain Adam).
        n_samples: samples logged after each validation epoch (0 disables it).
    """

    #: Name of the per-dimension unit logged beside the NLL, e.g. ``bpd``.
    unit: str = "nll_per_dim"

    def __init__(
        self, lr: float = 1e-3, warmup_steps: int = 200, weight_decay: float = 0.0, n_samples: int = 64
    ) -> None:
        super().__init__()
        if lr <= 0 or weight_decay < 0 or warmup_steps < 0 or n_samples < 0:
            raise ValueError(
                f"need lr > 0 and non-negative warmup_steps, weight_decay, n_samples; got lr={lr}, "
                f"warmup_steps={warmup_steps}, weight_decay={weight_decay}, n_samples={n_samples}"
            )
        self.lr = lr
        self.warmup_steps = warmup_steps
        self.weight_decay = weight_decay
        self.n_samples = n_samples

    @abstractmethod
    def log_likelihood(self, x: Tensor) -> Tensor:
        """Per-sample log-likelihood in nats, shape ``[B]``."""

    @abstractmethod
    def per_dim(self, log_likelihood: Tensor) -> Tensor:
        """Convert per-sample log-likelihoods to the per-dimension :attr:`unit` (lower is better)."""

    @abstractmethod
    def log_samples(self) -> None:
        """Draw :attr:`n_samples` samples and log them; called with the global RNG forked and seeded."""

    def forward(self, x: Tensor) -> Tensor:
        """Same as :meth:`log_likelihood`, so ``torch.func.functional_call(model, params, (x,))`` works."""
        return self.log_likelihood(x)

    def likelihood_and_metrics(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The per-sample log-likelihood and extra scalars to log per split (for example an accuracy),
        from one forward pass; override to add metrics."""
        return self.log_likelihood(x), {}

    def _step(self, batch: Any, split: str) -> Tensor:
        x, _ = unpack_batch(batch)
        ll, extra = self.likelihood_and_metrics(x)
        loss = -ll.mean()
        # Training logs per step (rank zero's batch); validation and test average over all DDP ranks.
        train = split == "train"
        options: dict[str, Any] = {
            "on_step": train,
            "on_epoch": True,
            "sync_dist": not train,
            "batch_size": len(x),
        }
        self.log(f"{split}/nll", loss, **options)
        self.log(f"{split}/{self.unit}", self.per_dim(ll).mean(), prog_bar=True, **options)
        for name, value in extra.items():
            self.log(f"{split}/{name}", value, **options)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        warmup = max(1, self.warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_validation_epoch_end(self) -> None:
        if self.n_samples <= 0 or self.trainer.sanity_checking:
            return
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode(False), torch.no_grad():
            torch.manual_seed(self.global_step)
            was_training = self.training
            self.eval()
            try:
                self.log_samples()
            finally:
                self.train(was_training)


class ImageLikelihoodModel(LikelihoodModule):
    """Base class: a generative model of images with ``num_levels`` intensity levels per pixel.

    Args:
        image_shape: ``(C, H, W)`` of the inputs (linked from the datamodule in ``train.py``).
        num_levels: number of discrete intensity levels (256 for 8-bit images, 17 for sklearn digits).
        lr, warmup_steps, weight_decay, n_samples: see :class:`LikelihoodModule`.
    """

    unit = "bpd"

    def __init__(
        self,
        image_shape: tuple[int, int, int] = (1, 28, 28),
        num_levels: int = 256,
        lr: float = 1e-3,
        warmup_steps: int = 200,
        weight_decay: float = 0.0,
        n_samples: int = 64,
    ) -> None:
        super().__init__(lr=lr, warmup_steps=warmup_steps, weight_decay=weight_decay, n_samples=n_samples)
        if image_shape is None or len(image_shape) != 3:
            raise ValueError(
                f"image_shape must be (C, H, W), got {image_shape} (train.py takes it from the datamodule's "
                "image_shape: use an image datamodule such as fimcb.data.ImageDataModule)"
            )
        if num_levels is None or num_levels < 2:
            raise ValueError(f"num_levels must be at least 2, got {num_levels}")
        self.image_shape = tuple(int(s) for s in image_shape)
        self.num_levels = int(num_levels)

    @property
    def num_dims(self) -> int:
        """Number of pixel values per image, the denominator of bits/dim."""
        return math.prod(self.image_shape)

    @abstractmethod
    def sample(self, n: int) -> Tensor:
        """``n`` samples from the model as images on the level grid in ``[0, 1]``, shape ``[n, C, H, W]``."""

    def per_dim(self, log_likelihood: Tensor) -> Tensor:
        return self.bits_per_dim(log_likelihood)

    def bits_per_dim(self, log_likelihood: Tensor) -> Tensor:
        """Convert per-sample log-likelihoods in nats to bits per dimension."""
        return -log_likelihood / (self.num_dims * math.log(2.0))

    def to_levels(self, x: Tensor) -> Tensor:
        """Integer levels ``0 .. num_levels - 1`` (int64) of images ``x`` in ``[0, 1]``."""
        return torch.round(x * (self.num_levels - 1)).clamp(0, self.num_levels - 1).to(torch.int64)

    def log_samples(self) -> None:
        images = self.sample(self.n_samples).clamp(0, 1).cpu()
        grid = make_grid(images, nrow=math.ceil(math.sqrt(len(images))), padding=1)
        log_image(self.trainer, "samples", grid, step=self.global_step)
