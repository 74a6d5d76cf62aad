"""What every backend is asked, and the signature a backend has."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from fimcb.core.metric import Metric


@dataclass(frozen=True)
class NormRequest:
    """What every backend is asked: per-group squared norms of ``log_likelihood``'s gradient with
    respect to ``params`` (trainable parameters of ``model`` by name), under ``metric``."""

    model: nn.Module
    log_likelihood: Callable[[Tensor], Tensor]
    params: dict[str, nn.Parameter]
    metric: Metric


# A backend maps a request and groups ``[G, k, ...]`` to squared norms ``[G, L]`` and summed
# log-likelihoods ``[G]``; the caller splits large batches into chunks.
Backend = Callable[[NormRequest, Tensor], tuple[Tensor, Tensor]]
