"""The Lightning layer on top of the library: the callback, its options, run folders and logger dashboards."""

from fimcb.lightning.callback import FIMNormCallback
from fimcb.lightning.signals import TrainingSignals

__all__ = ["FIMNormCallback", "TrainingSignals"]
