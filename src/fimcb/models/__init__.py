"""Likelihood-based generative models as LightningModules that follow fimcb's model protocol."""

from fimcb.models.base import ImageLikelihoodModel, LikelihoodModule
from fimcb.models.glow import Glow

__all__ = ["Glow", "ImageLikelihoodModel", "LikelihoodModule"]
