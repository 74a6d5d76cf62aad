"""Does representation invariance matter for detection? A measured answer on scikit-learn's digits.

    OMP_NUM_THREADS=1 python benchmarks/invariance.py --seeds 0 1 2

Protocol, fixed before any result was looked at (docs/invariance.md reports what came out):

- Data: ``digits`` (1×8×8, 17 levels, offline). The training split (1437 images) is cut by a seeded
  split (seed 0) into 1077 training images and 360 held-out ones, on which the detectors are fitted; the
  test split (360) is the in-distribution test set; the OOD sets are ``vflip``, ``noise`` and
  ``sample_patches`` (360 each, ``fimcb.data.ood``, seed 0). Pixels are dequantised as ``(k + u) / 17``:
  ``u`` uniform and fresh at every training step, ``u`` a hash of the image when scoring
  (``fimcb.models.noise.content_noise``), so that every score is deterministic.
- Model: a RealNVP-style flow (:class:`CouplingFlow`): four affine couplings over alternating
  checkerboard halves, each an MLP 32 → 8 (leaky ReLU) → 64 (shift and scale of the other half), then
  an elementwise affine layer and a standard normal base; 3,488 parameters, the largest tensor 512.
  Every positive scale is ``exp(r)`` (parametrisation ``exp``) or ``softplus(r + log(e − 1))``
  (``softplus``): one function family, the same function at the (zero) initial output layers.
- Training: each parametrisation from its own init with the seed, float64, Adam (lr 3e-3), batch 128,
  400 steps, on the 1077 training images.
- Metrics (Fisher approximations, all fitted on the 1077 training images, empirical Fisher):
  ``identity``, ``layer_scalar``, ``diagonal``, ``kfac`` and ``low_rank`` (1077 references, more than
  any tensor's 512 coordinates) at fimcb's default damping 1e-3 and at a tiny one (diagonal 1e-12,
  kfac 1e-24, low_rank 1e-10), and ``exact``: the undamped dense empirical Fisher block of each
  parameter tensor, solved by Cholesky (:class:`DenseFisher`, defined here; fimcb has no such metric).
- Detectors: ``fim_gaussian`` (the paper's), ``fim_gaussian_full`` and ``total_norm``; ``likelihood`` for
  reference. Measure: AUROC (OOD positive), mean ± sd over the seeds.
- Reparametrisation of the same trained weights (the clean measurement): the ``exp`` model's hidden
  units rescaled, ``W1 → D W1``, ``b1 → D b1``, ``W2 → W2 D⁻¹`` in every coupling, with ``D`` positive
  diagonal, ``log10 D`` uniform in [-2, 2] (seeded); the log-likelihood is checked to be unchanged.
  Reported: AUROC before and after, and the largest |change| over seeds and OOD sets.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fimcb import per_sample_layer_norms
from fimcb.core.norms import LayerNorms
from fimcb.core.protocol import LogLikelihoodFn
from fimcb.data.datasets import load_image_dataset
from fimcb.data.ood import make_ood_set
from fimcb.data.splits import train_val_indices
from fimcb.engine import per_sample_gradients
from fimcb.evaluation.ood import fit_and_score
from fimcb.metrics import KFAC, FittedDiagonal, FittedMetric, Identity, LayerScalar, LowRank, Metric
from fimcb.models.noise import content_noise

LEVELS = 17
OOD_SETS = ("vflip", "noise", "sample_patches")
DETECTORS = ("fim_gaussian", "fim_gaussian_full", "total_norm")
SLOPE = 0.1  # leaky ReLU: positive-homogeneous, so hidden units can be rescaled; no unit dies
SOFTPLUS_ONE = math.log(math.e - 1)  # softplus(SOFTPLUS_ONE) = 1 = exp(0)


class CouplingFlow(nn.Module):
    """Affine couplings over alternating checkerboard halves of 8×8 images, an elementwise affine layer and
    a standard normal base; positive scales as ``exp`` or shifted ``softplus`` of unconstrained outputs."""

    def __init__(self, scale: str, hidden: int = 8, couplings: int = 4) -> None:
        super().__init__()
        self.scale = scale
        parity = torch.arange(64).div(8, rounding_mode="floor").add(torch.arange(64) % 8) % 2
        self.halves = [(parity == i % 2, parity != i % 2) for i in range(couplings)]
        self.nets = nn.ModuleList(
            nn.Sequential(nn.Linear(32, hidden), nn.LeakyReLU(SLOPE), nn.Linear(hidden, 64))
            for _ in range(couplings)
        )
        for net in self.nets:  # every coupling starts as the identity
            nn.init.zeros_(net[2].weight)
            nn.init.zeros_(net[2].bias)
        self.shift = nn.Parameter(torch.zeros(64))
        self.raw_scale = nn.Parameter(torch.zeros(64))

    def positive(self, raw: Tensor) -> Tensor:
        """The scale ``exp(raw)`` or ``softplus(raw + log(e − 1))``; both are 1 at ``raw = 0``."""
        return raw.exp() if self.scale == "exp" else F.softplus(raw + SOFTPLUS_ONE)

    def log_likelihood(self, x: Tensor) -> Tensor:
        """Log-density ``[B]`` of dequantised images ``x`` ``[B, 1, 8, 8]`` in [0, 1]."""
        y = x.flatten(1)
        log_det = y.new_zeros(len(y))
        for net, (kept, moved) in zip(self.nets, self.halves, strict=True):
            shift, raw = net(y[:, kept]).chunk(2, dim=1)
            s = self.positive(raw)
            y = torch.cat([y[:, kept], y[:, moved] * s + shift], dim=1)[:, _inverse_order(kept, moved)]
            log_det = log_det + s.log().sum(1)
        s = self.positive(self.raw_scale)
        z = (y - self.shift) * s
        return -0.5 * z.pow(2).sum(1) - 32 * math.log(2 * math.pi) + log_det + s.log().sum()


def _inverse_order(kept: Tensor, moved: Tensor) -> Tensor:
    """Positions that put ``cat([y[kept], y[moved]])`` back in pixel order."""
    return torch.argsort(torch.cat([kept.nonzero(), moved.nonzero()]).squeeze(1))


class DenseFisher(FittedMetric):
    """``s_lᵀ F_l⁻¹ s_l`` with the undamped dense empirical Fisher ``F_l = (1/N) Σ_i s_i s_iᵀ`` of each
    parameter tensor, by Cholesky: exactly invariant, and affordable for tensors of a few hundred
    coordinates with more references than coordinates."""

    name = "exact"

    def __init__(self, n_samples: int) -> None:
        super().__init__("empirical", n_samples, batch_size=64, seed=0)
        self.factors: dict[str, Tensor] = {}

    def fit(
        self,
        model: nn.Module,
        data: Iterable[Any] | None = None,
        log_likelihood: LogLikelihoodFn | None = None,
    ) -> DenseFisher:
        sums: dict[str, Tensor] = {}
        count = 0
        for x in self._inputs(model, data):
            for grads, ll in per_sample_gradients(model, x, log_likelihood=log_likelihood):
                for name, g in grads.items():
                    rows = g.flatten(1).double()
                    sums[name] = sums[name] + rows.T @ rows if name in sums else rows.T @ rows
                count += len(ll)
        self.factors = {name: torch.linalg.cholesky(s / count) for name, s in sums.items()}
        self.dims = {name: len(f) for name, f in self.factors.items()}
        return self

    def squared_norms(self, name: str, grads: Tensor) -> Tensor:
        s = grads.flatten(1).double()
        return torch.cholesky_solve(s.T, self._lookup(self.factors, name)).T.mul(s).sum(1).to(grads.dtype)


def metrics(n_reference: int) -> dict[str, Callable[[], Metric]]:
    """Each compared metric by its table name, as a factory of an unfitted instance."""
    return {
        "identity": Identity,
        "layer_scalar": lambda: LayerScalar(n_samples=n_reference),
        "diagonal δ=1e-3": lambda: FittedDiagonal(damping=1e-3, n_samples=n_reference),
        "diagonal δ=1e-12": lambda: FittedDiagonal(damping=1e-12, n_samples=n_reference),
        "kfac δ=1e-3": lambda: KFAC(damping=1e-3, n_samples=n_reference),
        "kfac δ=1e-24": lambda: KFAC(damping=1e-24, n_samples=n_reference),
        "low_rank δ=1e-3": lambda: LowRank(n_reference=n_reference, damping=1e-3),
        "low_rank δ=1e-10": lambda: LowRank(n_reference=n_reference, damping=1e-10),
        "exact (dense)": lambda: DenseFisher(n_reference),
    }


def load_sets() -> tuple[Tensor, dict[str, Tensor]]:
    """Training levels ``[1077, 1, 8, 8]`` and the scored sets by name: ``fit``, ``test`` and the OOD sets."""
    train, _, _ = load_image_dataset("digits", None, "train")
    test, test_targets, _ = load_image_dataset("digits", None, "test")
    train_idx, val_idx = train_val_indices(len(train), 360, seed=0)
    sets = {"fit": train[val_idx], "test": test}
    for name in OOD_SETS:
        sets[name] = make_ood_set(
            name, id_test_images=test, id_test_targets=test_targets, num_levels=LEVELS, size=len(test)
        )[0]
    return train[train_idx], sets


def dequantised(levels: Tensor, noise: Tensor | None = None) -> Tensor:
    """``(k + u) / 17`` in float64, ``u`` the given noise or the image's own hash noise."""
    levels = levels.long()
    u = content_noise(levels) if noise is None else noise
    return (levels.double() + u.double()) / LEVELS


def train(scale: str, levels: Tensor, seed: int, steps: int) -> CouplingFlow:
    """A flow in parametrisation ``scale`` trained from its own seeded init by Adam, fresh dequantisation."""
    torch.manual_seed(seed)
    model = CouplingFlow(scale).double()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        batch = levels[torch.randint(len(levels), (128,))]
        loss = -model.log_likelihood(dequantised(batch, torch.rand(batch.shape))).mean() / 64
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


def rescale_hidden_units(model: CouplingFlow, seed: int, decades: float = 2.0) -> CouplingFlow:
    """A copy of ``model`` with every coupling's hidden units rescaled by ``D``, ``log10 D ~ U(±decades)``:
    ``W1 → D W1``, ``b1 → D b1``, ``W2 → W2 D⁻¹``, the same function (leaky ReLU is positive-homogeneous)."""
    copy = CouplingFlow(model.scale).double()
    copy.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for net in copy.nets:
            d = 10 ** (decades * (2 * torch.rand(net[0].out_features, generator=g, dtype=torch.float64) - 1))
            net[0].weight.mul_(d[:, None])
            net[0].bias.mul_(d)
            net[2].weight.div_(d[None, :])
    return copy.eval()


def aurocs(
    model: nn.Module, reference: Tensor, sets: dict[str, Tensor], make: Callable[[], Metric]
) -> dict[str, dict[str, float]]:
    """AUROC ``[OOD set][detector]`` of ``model``'s layer norms under a metric fitted on ``reference``."""
    metric = make().fit(model, [reference])
    norms: dict[str, LayerNorms] = {
        name: per_sample_layer_norms(model, x, metric=metric, engine="hooks") for name, x in sets.items()
    }
    ood = {name: norms[name] for name in OOD_SETS}
    result = fit_and_score(norms["fit"], norms["test"], ood, [*DETECTORS, "likelihood"])
    return {o: {d: m["auroc"] for d, m in by_detector.items()} for o, by_detector in result.measures.items()}


def mean_sd(values: list[float]) -> str:
    """``mean ± sd`` over seeds (sd 0 for one seed)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def averaged(results: list[dict[str, dict[str, float]]], detector: str) -> list[float]:
    """Per seed, the AUROC of ``detector`` averaged over the OOD sets."""
    return [statistics.mean(r[o][detector] for o in OOD_SETS) for r in results]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=400, help="training steps per model")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    train_levels, level_sets = load_sets()
    reference = dequantised(train_levels)
    sets = {name: dequantised(levels) for name, levels in level_sets.items()}
    makers = metrics(len(reference))
    # results[variant][metric] = one AUROC table per seed; variants: two trainings, one reparametrisation
    results: dict[str, dict[str, list[dict[str, dict[str, float]]]]] = {
        v: {m: [] for m in makers} for v in ("exp", "softplus", "exp, rescaled")
    }
    for seed in args.seeds:
        models = {scale: train(scale, train_levels, seed, args.steps) for scale in ("exp", "softplus")}
        models["exp, rescaled"] = rescale_hidden_units(models["exp"], seed)
        with torch.no_grad():
            ll, ll_rescaled = (models[v].log_likelihood(sets["test"]) for v in ("exp", "exp, rescaled"))
        assert torch.allclose(ll_rescaled, ll, rtol=1e-10, atol=1e-8), "rescaling changed the function"
        for variant, model in models.items():
            for name, make in makers.items():
                results[variant][name].append(aurocs(model, reference, sets, make))
        print(f"seed {seed} done ({time.perf_counter() - start:.0f} s)", flush=True)

    print(f"\n## AUROC averaged over {', '.join(OOD_SETS)}; mean ± sd over seeds {args.seeds}\n")
    print("Two parametrisations of the scales, each trained from its own init.\n")
    header = [f"{v}: {d}" for v in ("exp", "softplus") for d in DETECTORS]
    print("| metric | " + " | ".join(header) + " |")
    print("|---" * (len(header) + 1) + "|")
    for name in makers:
        cells = [mean_sd(averaged(results[v][name], d)) for v in ("exp", "softplus") for d in DETECTORS]
        print(f"| {name} | " + " | ".join(cells) + " |")
    likelihood = [mean_sd(averaged(results[v]["identity"], "likelihood")) for v in ("exp", "softplus")]
    print(f"\nlikelihood baseline: exp {likelihood[0]}, softplus {likelihood[1]}")

    print("\n## Same trained weights (exp), hidden units rescaled by D in 1e-2..1e2\n")
    print("AUROC averaged over the OOD sets (mean ± sd over seeds), and the largest |change| over seeds")
    print("and OOD sets.\n")
    header = [f"{d}: {c}" for d in DETECTORS for c in ("before", "after", "max abs Δ")]
    print("| metric | " + " | ".join(header) + " |")
    print("|---" * (len(header) + 1) + "|")
    for name in makers:
        before, after = results["exp"][name], results["exp, rescaled"][name]
        cells = []
        for d in DETECTORS:
            delta = max(abs(a[o][d] - b[o][d]) for a, b in zip(after, before, strict=True) for o in OOD_SETS)
            cells += [mean_sd(averaged(before, d)), mean_sd(averaged(after, d)), f"{delta:.3f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")

    print("\n## Per OOD set, fim_gaussian, exp parametrisation (before / after rescaling)\n")
    print("| metric | " + " | ".join(OOD_SETS) + " |")
    print("|---" * (len(OOD_SETS) + 1) + "|")
    for name in makers:
        cells = [
            " / ".join(
                mean_sd([r[o]["fim_gaussian"] for r in results[v][name]]) for v in ("exp", "exp, rescaled")
            )
            for o in OOD_SETS
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\ntotal time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
