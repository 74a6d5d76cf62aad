"""Which layers carry the OOD decision of a finished run: single-layer AUROCs, by depth and best layers.

    OMP_NUM_THREADS=1 python benchmarks/layer_analysis.py runs/zoo/glow/version_0 --data.root ../shared/data

Reads the run's ``ood_features.pt`` (written by ``FIMNormCallback``); for runs without it, rebuilds
model and data from the run's ``config.yaml``, loads its last checkpoint and rescores the callback's
evaluation sets (fit = validation, in-distribution = test, at most the callback's ``max_eval_samples``
per set), writing ``ood_features.pt`` for next time. ``--features other.pt`` plus overrides rescores
the same weights another way, e.g. the diffusion model's simplified score:

    python benchmarks/layer_analysis.py runs/zoo/diffusion/version_0 --features simple.pt \\
        --model.init_args.likelihood simple --data.root ../shared/data

Prints, per OOD set, the AUROC of the paper's detector, ``total_norm`` and ``typicality``, and the
single-layer AUROCs (one-sided: larger gradient = OOD; two-sided: distance from the fit set's mean)
averaged over depth groups, with the best layers.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from finished_runs import load_run

from fimcb.engine import LayerNorms
from fimcb.evaluation.analysis import layer_aurocs, plot_layer_aurocs
from fimcb.evaluation.ood import evaluate_ood, fit_and_score, load_features


def rescore(run_dir: Path, overrides: list[str], path: Path) -> dict[str, LayerNorms]:
    """Rebuild the run from its config and last checkpoint and score its evaluation sets again."""
    run = load_run(run_dir, overrides)
    options = replace(run.callback.options, progress=True)
    dm = run.datamodule
    result = evaluate_ood(
        run.model, dm.val_dataloader(), dm.test_dataloader(), dm.ood_dataloaders(), options=options
    )
    result.save_features(path)
    return result.norms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--bins", type=int, default=4, help="depth groups")
    parser.add_argument("--plot", type=Path, help="also draw the single-layer AUROCs to this image file")
    parser.add_argument(
        "--features",
        default="ood_features.pt",
        help="features file in the run directory; rescored (with the overrides) when missing",
    )
    parser.add_argument("overrides", nargs="*", help="train.py options for rescoring, e.g. --data.root PATH")
    args, unknown = parser.parse_known_args()
    path = args.run_dir / args.features
    norms = load_features(path) if path.exists() else rescore(args.run_dir, args.overrides + unknown, path)
    fit, test = norms.pop("fit"), norms.pop("test")
    result = fit_and_score(fit, test, norms, ["fim_gaussian", "total_norm", "typicality"])
    print(f"run: {args.run_dir}; {len(fit.names)} layers; fit {len(fit)}, test {len(test)} samples")
    per_layer = layer_aurocs(fit, test, norms)
    if args.plot:
        print(f"plot: {plot_layer_aurocs(per_layer, args.plot, args.bins)}")
    for name, aurocs in per_layer.items():
        summary = ", ".join(f"{m} {v['auroc']:.3f}" for m, v in result.measures[name].items())
        print(f"\n## {name}: {summary}")
        below = int((aurocs.one_sided < 0.5).sum())
        print(f"layers whose gradient is smaller on {name} than on test (one-sided AUROC < 0.5): {below}")
        print("| layers | mean one-sided AUROC | mean two-sided AUROC | one-sided < 0.5 |")
        print("|---|---|---|---|")
        for row in aurocs.by_depth(args.bins):
            print(
                f"| {row['first']}-{row['last']} | {row['one_sided']:.3f} | {row['two_sided']:.3f} | "
                f"{row['below_half']} |"
            )
        best = ", ".join(f"{n} {v:.3f}" for n, v in aurocs.best(3, two_sided=True))
        print(f"best single layers (two-sided): {best}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
