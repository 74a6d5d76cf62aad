"""Where novelty comes from: input saliency by double backpropagation and influence of training samples."""

from fimcb.attribution.influence import Influences, influence, top_influences
from fimcb.attribution.saliency import input_saliency, saliency_map

__all__ = ["Influences", "influence", "input_saliency", "saliency_map", "top_influences"]
