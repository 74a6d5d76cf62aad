"""Shared Lightning plumbing for likelihood-based image models.

Subclasses implement ``log_likelihood`` (nats of the *discrete* data, shape ``[B]``) and
``sample``; this base trains on the negative log-likelihood, logs bits/dim per split and logs
a grid of samples to every logger at the end of each validation epoch.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torchvision.utils import make_grid, save_image

from fimcb.protocol import unpack_batch


class ImageLikelihoodModel(L.LightningModule):
    """Base class: a generative model of images with ``num_levels`` intensity levels per pixel.

    Args:
        image_shape: ``(C, H, W)`` of the inputs (linked from the datamodule in ``train.py``).
        num_levels: number of discrete intensity levels (256 for 8-bit images, 17 for sklearn digits).
        lr: Adam learning rate.
        warmup_steps: linear learning-rate warm-up, in optimizer steps.
        n_samples: images in the sample grid logged after each validation epoch (0 disables it).
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int] = (1, 28, 28),
        num_levels: int = 256,
        lr: float = 1e-3,
        warmup_steps: int = 200,
        n_samples: int = 64,
    ) -> None:
        super().__init__()
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {image_shape}")
        if num_levels < 2:
            raise ValueError(f"num_levels must be at least 2, got {num_levels}")
        self.image_shape = tuple(int(s) for s in image_shape)
        self.num_levels = int(num_levels)
        self.lr = lr
        self.warmup_steps = warmup_steps
        self.n_samples = n_samples

    @property
    def num_dims(self) -> int:
        """Number of pixel values per image, the denominator of bits/dim."""
        return math.prod(self.image_shape)

    @abstractmethod
    def log_likelihood(self, x: Tensor) -> Tensor:
        """Per-sample log-likelihood in nats of images ``x`` in ``[0, 1]``, shape ``[B]``."""

    @abstractmethod
    def sample(self, n: int) -> Tensor:
        """``n`` samples from the model as images in ``[0, 1]``, shape ``[n, C, H, W]``."""

    def bits_per_dim(self, log_likelihood: Tensor) -> Tensor:
        """Convert per-sample log-likelihoods in nats to bits per dimension."""
        return -log_likelihood / (self.num_dims * math.log(2.0))

    def _step(self, batch: Any, split: str) -> Tensor:
        x, _ = unpack_batch(batch)
        ll = self.log_likelihood(x)
        loss = -ll.mean()
        on_step = split == "train"
        self.log(f"{split}/nll", loss, prog_bar=False, on_step=on_step, on_epoch=True, batch_size=len(x))
        self.log(
            f"{split}/bpd",
            self.bits_per_dim(ll).mean(),
            prog_bar=True,
            on_step=on_step,
            on_epoch=True,
            batch_size=len(x),
        )
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        warmup = max(1, self.warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_validation_epoch_end(self) -> None:
        if self.n_samples <= 0 or self.trainer.sanity_checking:
            return
        self.log_sample_grid()

    def log_sample_grid(self) -> None:
        """Draw samples without touching the global RNG and log them as one image grid."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode(False), torch.no_grad():
            torch.manual_seed(self.global_step)
            was_training = self.training
            self.eval()
            images = self.sample(self.n_samples).clamp(0, 1).cpu()
            self.train(was_training)
        grid = make_grid(images, nrow=math.ceil(math.sqrt(len(images))), padding=1)
        log_image(self.trainer, "samples", grid, step=self.global_step)


def log_image(trainer: L.Trainer, key: str, image: Tensor, step: int) -> None:
    """Log a ``[C, H, W]`` image in ``[0, 1]`` to every logger that takes images, and as a PNG file."""
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):  # WandbLogger, NeptuneLogger
                logger.log_image(key=key, images=[image], step=step)
            elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoardLogger
                logger.experiment.add_image(key, image, global_step=step)
        if trainer.log_dir is not None:
            path = Path(trainer.log_dir) / "images" / f"{key}_step{step:07d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_image(image, path)
