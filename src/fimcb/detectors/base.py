"""The detector interface: fit on in-distribution layer norms, then score; higher score = more novel."""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor

from fimcb.core.norms import LayerNorms


class NotFittedError(RuntimeError):
    """``score`` was called before ``fit`` (or ``load_state_dict``)."""


class Detector(ABC):
    """Fit on in-distribution rows of :class:`LayerNorms`; score any rows, higher = more novel.

    Rows with a non-finite norm or log-likelihood are left out of the fit (with a warning) and
    scored ``+inf``: a sample the model cannot even evaluate is reported as novel, never dropped.
    Subclasses implement ``_fit``/``_score`` on finite rows and keep their fitted tensors in
    ``self.state`` so that saving and restoring is uniform.
    """

    name: ClassVar[str]

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    @property
    def fitted(self) -> bool:
        return bool(self.state)

    def fit(self, norms: LayerNorms) -> Detector:
        finite = norms.finite_rows()
        if not finite.all():
            warnings.warn(
                f"{self.name}: {int((~finite).sum())} of {len(norms)} fit rows have non-finite values "
                "and are left out of the fit",
                stacklevel=2,
            )
        if int(finite.sum()) < 2:
            raise ValueError(
                f"{self.name}: need at least 2 finite in-distribution rows to fit, got {int(finite.sum())}"
            )
        self.state = {"names": list(norms.names), **self._fit(norms[finite])}
        return self

    def score(self, norms: LayerNorms) -> Tensor:
        """Novelty scores ``[N]``; ``+inf`` for rows with non-finite values."""
        if not self.fitted:
            raise NotFittedError(f"{self.name}: call fit() (or load_state_dict()) before score()")
        if list(norms.names) != self.state["names"]:
            raise ValueError(f"{self.name}: scored layers differ from the layers it was fitted on")
        finite = norms.finite_rows()
        scores = torch.full((len(norms),), float("inf"), dtype=torch.float64)
        if finite.any():
            scores[finite] = self._score(norms[finite]).to(torch.float64).cpu()
        return scores

    @abstractmethod
    def _fit(self, norms: LayerNorms) -> dict[str, Any]:
        """Fitted state from finite in-distribution rows."""

    @abstractmethod
    def _score(self, norms: LayerNorms) -> Tensor:
        """Scores of finite rows, higher = more novel."""

    def state_dict(self) -> dict[str, Any]:
        return {"detector": self.name, **self.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("detector") != self.name:
            raise ValueError(
                f"state of detector {state.get('detector')!r} cannot be loaded into {self.name!r}"
            )
        self.state = {k: v for k, v in state.items() if k != "detector"}
