"""The Lightning layer on top of the library: the callback, the command line, logger dashboards."""

from fimcb.lightning.callback import FIMNormCallback

__all__ = ["FIMNormCallback"]
