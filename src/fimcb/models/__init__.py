"""Likelihood-based generative models as LightningModules that follow fimcb's model protocol.

Images: :class:`Glow` (flow), :class:`VAE`, :class:`PixelCNN` (autoregressive), :class:`Diffusion`;
token sequences: :class:`Transformer` (decoder-only, autoregressive).
"""

from fimcb.models.base import ImageLikelihoodModel, LikelihoodModule
from fimcb.models.diffusion import Diffusion
from fimcb.models.glow import Glow
from fimcb.models.pixelcnn import PixelCNN
from fimcb.models.transformer import Transformer
from fimcb.models.vae import VAE

__all__ = ["VAE", "Diffusion", "Glow", "ImageLikelihoodModel", "LikelihoodModule", "PixelCNN", "Transformer"]
