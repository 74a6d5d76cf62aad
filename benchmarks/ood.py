"""OOD detection of finished runs under every Fisher approximation × detector × group size.

    OMP_NUM_THREADS=1 python benchmarks/ood.py runs/zoo/glow/version_0 runs/zoo/vae/version_0 \\
        --metrics identity layer_scalar diagonal kfac low_rank --groups 1 5 -- --data.root ../shared/data

For each run (rebuilt from its ``config.yaml`` and last checkpoint) and each metric: the metric is
fitted on the training split (empirical Fisher, ``--fisher-samples`` samples) or on model samples
(``--fisher true``); then, for each group size k, the layer norms of the validation split (the
detectors' fit set), the test split (in-distribution) and every OOD set of the run's datamodule are
computed (at most ``--max-samples`` samples per set), every detector is fitted on the validation
features only and AUROCs are computed against the test split. Nothing is fitted or tuned on an OOD
set. Prints markdown tables (AUROC per OOD set; seconds to fit the metric and to score all sets) and
writes everything to ``--out`` as JSON; the features are kept in ``RUN/ood_benchmark/`` so that a
second pass (new detectors) skips the scoring.
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from finished_runs import load_run
from torch import nn

from fimcb.detectors import BASELINE_METHODS, DETECTORS
from fimcb.engine import LayerNorms
from fimcb.evaluation.ood import fit_and_score
from fimcb.evaluation.scoring import ScoringOptions, layer_norms_over
from fimcb.metrics import METRICS, Metric

DEFAULT_METRICS = ("identity", "layer_scalar", "diagonal", "kfac", "low_rank")


def fitted_metric(name: str, model: nn.Module, train: Any, args: argparse.Namespace) -> tuple[Metric, float]:
    """Metric ``name`` fitted on the training data (or model samples), and the seconds it took."""
    cls = METRICS[name]
    accepted = inspect.signature(cls).parameters
    options = {"fisher": args.fisher, "n_samples": args.fisher_samples}
    metric = cls(**{key: value for key, value in options.items() if key in accepted})
    start = time.perf_counter()
    metric.fit(model, train)
    return metric, time.perf_counter() - start


def evaluate_run(run_dir: Path, args: argparse.Namespace) -> dict:
    """``{metric: {k: {"aurocs": {ood: {detector: auroc}}, "seconds": {...}}}}`` for one run."""
    run = load_run(run_dir, args.overrides)
    dm = run.datamodule
    sets = {"fit": dm.val_dataloader(), "test": dm.test_dataloader(), **dm.ood_dataloaders()}
    detectors = [d for d in DETECTORS if d not in BASELINE_METHODS]
    out: dict = {}
    for name in args.metrics:
        metric: Metric | None = None  # fitted only when some group size's features are not cached
        fit_seconds = 0.0
        out[name] = {}
        for k in args.groups:
            prefix = f"{args.tag}_" if args.tag else ""
            cache = run_dir / "ood_benchmark" / f"{prefix}{name}_{args.fisher}_k{k}.pt"
            if cache.exists():  # features of an earlier pass: only the detectors run again
                norms, score_seconds, fit_seconds = torch.load(cache, weights_only=False)
                norms = {s: LayerNorms(**fields) for s, fields in norms.items()}
            else:
                if metric is None:
                    metric, fit_seconds = fitted_metric(name, run.model, dm.train_dataloader(), args)
                scoring = ScoringOptions(group_size=k, metric=metric, max_samples=args.max_samples)
                start = time.perf_counter()
                norms = {s: layer_norms_over(run.model, data, scoring, name=s) for s, data in sets.items()}
                score_seconds = time.perf_counter() - start
                cache.parent.mkdir(exist_ok=True)
                torch.save(({s: asdict(n) for s, n in norms.items()}, score_seconds, fit_seconds), cache)
            fit, test = norms.pop("fit"), norms.pop("test")
            result = fit_and_score(fit, test, norms, [*detectors, *BASELINE_METHODS])
            aurocs = {o: {d: m["auroc"] for d, m in by.items()} for o, by in result.measures.items()}
            out[name][k] = {
                "aurocs": aurocs,
                "seconds": {"fit_metric": fit_seconds, "score": score_seconds},
                "samples": {s: len(n) for s, n in {"fit": fit, "test": test, **norms}.items()},
            }
            print(
                f"{run_dir} {name} k={k}: metric fit {fit_seconds:.1f} s, scoring {score_seconds:.1f} s",
                flush=True,
            )
    return out


def tables(results: dict) -> str:
    """One markdown table per run and group size: rows metric × detector, columns OOD sets."""
    lines = []
    for run, by_metric in results.items():
        groups = sorted({k for by_k in by_metric.values() for k in by_k})
        for k in groups:
            first = next(by_k[k] for by_k in by_metric.values() if k in by_k)
            ood_sets = list(first["aurocs"])
            lines += [
                f"\n### {run}, k = {k}\n",
                "| metric | detector | " + " | ".join(ood_sets) + " |",
                "|---|---|" + "---|" * len(ood_sets),
            ]
            for metric, by_k in by_metric.items():
                entry = by_k[k]
                for detector in next(iter(entry["aurocs"].values())):
                    if detector in BASELINE_METHODS and metric != next(iter(by_metric)):
                        continue  # the baselines do not depend on the metric: once per table
                    row = [f"{entry['aurocs'][o][detector]:.3f}" for o in ood_sets]
                    label = "–" if detector in BASELINE_METHODS else metric
                    lines.append(f"| {label} | {detector} | " + " | ".join(row) + " |")
            lines += ["", "| metric | fit metric (s) | score all sets (s) |", "|---|---|---|"]
            for metric, by_k in by_metric.items():
                seconds = by_k[k]["seconds"]
                lines.append(f"| {metric} | {seconds['fit_metric']:.1f} | {seconds['score']:.1f} |")
    return "\n".join(lines)


def summary(results: dict) -> str:
    """Per run and group size: the best FIM method (metric × detector) on each OOD set against typicality."""
    lines = [
        "| run | k | OOD set | best FIM method | AUROC | typicality | likelihood |",
        "|---|---|---|---|---|---|---|",
    ]
    for run, by_metric in results.items():
        groups = sorted({k for by_k in by_metric.values() for k in by_k})
        for k in groups:
            entries = {m: by_k[k]["aurocs"] for m, by_k in by_metric.items() if k in by_k}
            first = next(iter(entries.values()))
            for ood in first:
                candidates = [
                    (aurocs[ood][d], f"{m} + {d}")
                    for m, aurocs in entries.items()
                    for d in aurocs[ood]
                    if d not in BASELINE_METHODS
                ]
                best, label = max(candidates)
                base = first[ood]
                lines.append(
                    f"| {run} | {k} | {ood} | {label} | {best:.3f} | {base['typicality']:.3f} | "
                    f"{base['likelihood']:.3f} |"
                )
    return "\n".join(lines)


def compare(results: dict) -> str:
    """Per run and group size, the mean AUROC over its OOD sets of every metric × detector pair: a
    comparison of the approximations at a fixed detector, with no choice made on the OOD sets."""
    lines = []
    for run, by_metric in results.items():
        for k in sorted({k for by_k in by_metric.values() for k in by_k}):
            entries = {m: by_k[k]["aurocs"] for m, by_k in by_metric.items() if k in by_k}
            detectors = [
                d for d in next(iter(next(iter(entries.values())).values())) if d not in BASELINE_METHODS
            ]
            lines += [
                f"\n### {run}, k = {k}: mean AUROC over the OOD sets\n",
                "| metric | " + " | ".join(detectors) + " |",
                "|---|" + "---|" * len(detectors),
            ]
            for metric, aurocs in entries.items():
                means = [sum(a[d] for a in aurocs.values()) / len(aurocs) for d in detectors]
                lines.append(f"| {metric} | " + " | ".join(f"{m:.3f}" for m in means) + " |")
            first = next(iter(entries.values()))
            base = {b: sum(a[b] for a in first.values()) / len(first) for b in BASELINE_METHODS}
            lines.append("baselines: " + ", ".join(f"{b} {v:.3f}" for b, v in base.items()))
    return "\n".join(lines)


def load(path: Path) -> dict:
    """Results written by this script (JSON turns the group sizes into strings: back to ints)."""
    raw = json.loads(path.read_text())
    return {run: {m: {int(k): v for k, v in by_k.items()} for m, by_k in r.items()} for run, r in raw.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", type=Path, help="run directories (config.yaml + checkpoints/)")
    parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS))
    parser.add_argument("--groups", nargs="+", type=int, default=[1, 5])
    parser.add_argument("--fisher", choices=["empirical", "true"], default="empirical")
    parser.add_argument("--fisher-samples", type=int, default=1000)
    parser.add_argument("--max-samples", type=int, default=1000, help="per set")
    parser.add_argument("--out", type=Path, default=Path("runs/ood_benchmark.json"))
    parser.add_argument("--tag", default="", help="names results and cached features scored with overrides")
    parser.add_argument("--collect", nargs="+", type=Path, help="only print the tables of these JSON files")
    args, unknown = parser.parse_known_args()  # the rest: train.py options, e.g. --data.root PATH
    args.overrides = [a for a in unknown if a != "--"]
    if args.collect:
        results: dict = {}
        for path in args.collect:  # files may hold other metrics of the same run: merge per metric
            for run, by_metric in load(path).items():
                results.setdefault(run, {}).update(by_metric)
        print(tables(results) + "\n\n" + summary(results) + "\n" + compare(results))
        return
    results = {}
    if args.out.exists():
        results = load(args.out)  # runs scored earlier keep their entries
    for run_dir in args.runs:
        results[f"{run_dir}{' ' + args.tag if args.tag else ''}"] = evaluate_run(run_dir, args)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    print(tables(results) + "\n\n" + summary(results) + "\n" + compare(results))


if __name__ == "__main__":
    main()
