"""Which layers carry an OOD decision: the AUROC of each layer's feature alone, and by depth.

For every layer ``l`` and OOD set, two single-feature scores of ``f_l = log ||s_l||²`` are compared
with the in-distribution test set: one-sided (``f_l`` itself: larger gradient = more novel, the
direction ``total_norm`` assumes) and two-sided (``|f_l - μ_l| / σ_l`` with ``μ_l, σ_l`` from the fit
set: the per-layer term of the paper's ``fim_gaussian``). A one-sided AUROC below 0.5 means OOD
samples have *smaller* gradients in that layer than in-distribution ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from fimcb.core.norms import LayerNorms
from fimcb.evaluation.ood import ood_measures


@dataclass(frozen=True)
class LayerAUROCs:
    """Per-layer AUROCs of one OOD set against the test set.

    Attributes:
        names: the ``L`` layer (parameter tensor) names, in model order (shallow to deep).
        one_sided: ``[L]`` AUROC of ``log ||s_l||²`` (higher = OOD).
        two_sided: ``[L]`` AUROC of ``|z_l|``, the distance from the fit set's mean in its std.
    """

    names: tuple[str, ...]
    one_sided: Tensor
    two_sided: Tensor

    def by_depth(self, n_bins: int = 4) -> list[dict[str, float]]:
        """Mean AUROCs over ``n_bins`` consecutive groups of layers (shallow to deep), with counts."""
        rows = []
        for chunk in torch.arange(len(self.names)).tensor_split(n_bins):
            if len(chunk):
                rows.append(
                    {
                        "first": int(chunk[0]),
                        "last": int(chunk[-1]),
                        "one_sided": float(self.one_sided[chunk].mean()),
                        "two_sided": float(self.two_sided[chunk].mean()),
                        "below_half": int((self.one_sided[chunk] < 0.5).sum()),
                    }
                )
        return rows

    def best(self, n: int = 5, two_sided: bool = False) -> list[tuple[str, float]]:
        """The ``n`` layers with the highest single-layer AUROC."""
        values = self.two_sided if two_sided else self.one_sided
        order = torch.argsort(values, descending=True)[:n]
        return [(self.names[i], float(values[i])) for i in order.tolist()]


def layer_aurocs(fit: LayerNorms, test: LayerNorms, ood: Mapping[str, LayerNorms]) -> dict[str, LayerAUROCs]:
    """Single-layer AUROCs of every OOD set against ``test``, with ``fit`` giving the two-sided centre."""
    fit_features = fit.log_features()
    mean, std = fit_features.mean(0), fit_features.std(0).clamp_min(1e-12)
    test_features = test.log_features()

    def aurocs(features: Tensor, two_sided: bool) -> Tensor:
        reference = test_features
        if two_sided:
            features, reference = ((features - mean) / std).abs(), ((reference - mean) / std).abs()
        return torch.tensor(
            [ood_measures(reference[:, j], features[:, j])["auroc"] for j in range(features.shape[1])]
        )

    return {
        name: LayerAUROCs(test.names, aurocs(norms.log_features(), False), aurocs(norms.log_features(), True))
        for name, norms in ood.items()
    }


def plot_layer_aurocs(results: Mapping[str, LayerAUROCs], path: str | Path, n_bins: int = 4) -> Path:
    """One panel per OOD set: each layer's one- and two-sided AUROC against its depth, with the depth-group
    means as steps, written to ``path`` (PNG, SVG or PDF by its suffix)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 3.0), sharey=True, squeeze=False)
    for ax, (name, aurocs) in zip(axes[0], results.items(), strict=True):
        depth = torch.arange(len(aurocs.names))
        ax.scatter(depth, aurocs.one_sided, s=6, label="one-sided (larger = OOD)")
        ax.scatter(depth, aurocs.two_sided, s=6, marker="x", label="two-sided (|z|)")
        for row in aurocs.by_depth(n_bins):
            span = [row["first"] - 0.5, row["last"] + 0.5]
            ax.plot(span, [row["one_sided"]] * 2, color="C0")
            ax.plot(span, [row["two_sided"]] * 2, color="C1")
        ax.axhline(0.5, color="grey", linewidth=0.5)
        ax.set(title=name, xlabel="layer (parameter tensor), shallow to deep", ylim=(0, 1))
    axes[0][0].set_ylabel("single-layer AUROC")
    axes[0][-1].legend(fontsize="small", loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
