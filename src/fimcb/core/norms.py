"""``LayerNorms``: per-sample (or per-group) squared gradient norms, one column per parameter tensor.

The value type every layer of fimcb passes on: the engine produces it, metrics shape its values,
detectors fit and score it, the run folder records it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

# Smallest squared norm taken before the log, so that an exactly-zero gradient gives a finite feature.
LOG_FLOOR = 1e-30


def log_norms(values: Tensor) -> Tensor:
    """``log`` of squared norms in float64, zero norms floored at ``LOG_FLOOR`` (NaN stays NaN)."""
    return values.double().clamp_min(LOG_FLOOR).log()


@dataclass(frozen=True)
class LayerNorms:
    """Squared gradient norms of the per-sample log-likelihood, split by parameter tensor.

    Attributes:
        values: ``[N, L]`` squared norms under the chosen metric, row n = sample (or group) n.
        names: the ``L`` parameter names, as in ``model.named_parameters()``.
        log_likelihood: ``[N]`` the log-likelihood that was differentiated (summed over a group).
        ids: ``[N]`` sample ids of the rows (first sample of each group), when known.
    """

    values: Tensor
    names: tuple[str, ...]
    log_likelihood: Tensor
    ids: Tensor | None = None

    def __post_init__(self) -> None:
        if self.values.ndim != 2 or self.values.shape[1] != len(self.names):
            raise ValueError(f"values must be [N, {len(self.names)}], got {list(self.values.shape)}")
        if self.log_likelihood.shape != self.values.shape[:1]:
            raise ValueError(
                f"log_likelihood must be [{len(self.values)}], got {list(self.log_likelihood.shape)}"
            )
        if self.ids is not None and self.ids.shape != self.values.shape[:1]:
            raise ValueError(f"ids must be [{len(self.values)}], got {list(self.ids.shape)}")

    def __len__(self) -> int:
        return self.values.shape[0]

    @property
    def total(self) -> Tensor:
        """``[N]`` squared norm of the whole gradient (sum over layers)."""
        return self.values.sum(dim=1)

    def log_features(self) -> Tensor:
        """``[N, L]`` float64 features ``log ||s_l||²`` of the paper (zero norms floored at ``LOG_FLOOR``)."""
        return log_norms(self.values)

    def finite_rows(self) -> Tensor:
        """``[N]`` bool: rows whose norms and log-likelihood are all finite."""
        return torch.isfinite(self.values).all(dim=1) & torch.isfinite(self.log_likelihood)

    def cpu(self) -> LayerNorms:
        return replace(
            self,
            values=self.values.cpu(),
            log_likelihood=self.log_likelihood.cpu(),
            ids=None if self.ids is None else self.ids.cpu(),
        )

    def __getitem__(self, index: Tensor | slice) -> LayerNorms:
        """Select rows (a slice, an index tensor or a boolean mask)."""
        return replace(
            self,
            values=self.values[index],
            log_likelihood=self.log_likelihood[index],
            ids=None if self.ids is None else self.ids[index],
        )

    @staticmethod
    def cat(parts: Sequence[LayerNorms]) -> LayerNorms:
        """Concatenate rows of several results computed for the same model."""
        if not parts:
            raise ValueError("nothing to concatenate: no LayerNorms given")
        names = parts[0].names
        if any(p.names != names for p in parts):
            raise ValueError("cannot concatenate LayerNorms of different parameter sets")
        has_ids = all(p.ids is not None for p in parts)
        return LayerNorms(
            values=torch.cat([p.values for p in parts]),
            names=names,
            log_likelihood=torch.cat([p.log_likelihood for p in parts]),
            ids=torch.cat([p.ids for p in parts]) if has_ids else None,  # type: ignore[misc]
        )
