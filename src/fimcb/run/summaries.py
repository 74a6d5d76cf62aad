"""Summaries of per-sample FIM-norms for dashboards: scalars per split, logged against the global step."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fimcb.core.norms import LayerNorms, log_norms

DEFAULT_QUANTILES: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95)


def summarize(
    norms: LayerNorms,
    prefix: str,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    per_layer: bool = False,
) -> dict[str, float]:
    """Scalar summaries of one tracking event, keyed ``{prefix}/...``.

    ``log_norm_*``: mean, std and quantiles over samples of the log total squared FIM-norm;
    ``log_likelihood_mean``; ``nonfinite``: rows left out because of NaN/inf. With
    ``per_layer``, also the mean log squared norm of each parameter tensor.
    """
    finite = norms.finite_rows()
    out: dict[str, float] = {f"{prefix}/nonfinite": float((~finite).sum())}
    norms = norms[finite]
    if len(norms) == 0:
        return out
    log_total = log_norms(norms.total)
    out[f"{prefix}/log_norm_mean"] = float(log_total.mean())
    out[f"{prefix}/log_norm_std"] = float(log_total.std()) if len(log_total) > 1 else 0.0
    levels = torch.tensor(list(quantiles), dtype=torch.float64)
    for q, value in zip(quantiles, torch.quantile(log_total, levels).tolist(), strict=True):
        out[f"{prefix}/log_norm_q{round(q * 100):02d}"] = value
    out[f"{prefix}/log_likelihood_mean"] = float(norms.log_likelihood.double().mean())
    if per_layer:
        for name, value in zip(norms.names, norms.log_features().mean(dim=0).tolist(), strict=True):
            out[f"{prefix}/layer/{name}"] = value
    return out
