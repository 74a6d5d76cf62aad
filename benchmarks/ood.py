"""OOD detection of finished runs under Fisher approximations × detectors × group sizes, over seeds and
disjoint draws, with the in-distribution-only selection of the default detector.

    OMP_NUM_THREADS=1 python benchmarks/ood.py runs/grid/vae_fashionmnist --seeds 0 1 2 --draws 2 \\
        --metrics identity diagonal low_rank --groups 1 --shifts --out runs/ood_vae.json -- --data.root PATH

A run is a directory with ``config.yaml`` and ``checkpoints/``; with ``--seeds`` each given directory
holds ``seed_<S>/`` runs (``benchmarks/zoo.py --seeds``). For each run (rebuilt from its config and
last checkpoint) and each metric: the metric is fitted on the training split (empirical Fisher,
``--fisher-samples`` samples) or on model samples (``--fisher true``); then, for each group size k,
the layer norms of the validation split (the detectors' fit set), the test split (in-distribution),
every OOD set of the run's datamodule and, with ``--shifts``, the in-distribution shifts of
:data:`SHIFTS` are computed, ``--draws × --max-samples`` samples per set. Draw d takes rows
``[d·m, (d+1)·m)`` of every set (m groups of k samples), so draws are disjoint in fit, test and
OOD samples; every detector is fitted on the draw's validation rows only and AUROCs are computed
against the draw's test rows.

The selection (``--shifts``, needs ``--draws`` ≥ 2) touches no OOD set: a detector fitted on draw d's
validation rows is scored on draw d+1's validation rows (held-out in-distribution) against the shifts
made from those same validation images. ``--collect`` prints the tables of JSON files written by
this script: per run, per model over seeds and draws (mean ± sd), the grid, and the selection ranking.
Features are cached in ``RUN/ood_benchmark/`` so that a second pass (new detectors) skips the scoring.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from finished_runs import load_run
from torch import Tensor, nn
from torch.utils.data import DataLoader

from fimcb.data.datamodule import ImageSplit
from fimcb.detectors import BASELINE_METHODS, DETECTORS
from fimcb.engine import LayerNorms
from fimcb.evaluation.ood import fit_and_score, ood_measures
from fimcb.evaluation.scoring import ScoringOptions, layer_norms_over
from fimcb.metrics import METRICS, Metric

DEFAULT_METRICS = ("identity", "layer_scalar", "diagonal", "kfac", "low_rank")
SHIFT_PREFIX = "shift:"


def _pixelate(images: Tensor, generator: torch.Generator) -> Tensor:
    """Each 2×2 block replaced by its mean: the image's content at half the resolution."""
    x = images.double()
    h, w = x.shape[-2:]
    pooled = F.avg_pool2d(x[..., : h // 2 * 2, : w // 2 * 2], 2)
    out = x.clone()
    out[..., : h // 2 * 2, : w // 2 * 2] = F.interpolate(pooled, scale_factor=2, mode="nearest")
    return out.round().to(torch.uint8)


def _blend(images: Tensor, generator: torch.Generator) -> Tensor:
    """The pixel-wise mean of two different in-distribution images."""
    order = torch.randperm(len(images), generator=generator)
    partner = order.roll(1)  # the next image in a random cycle: never the image itself
    return ((images[order].double() + images[partner].double()) / 2).round().to(torch.uint8)


def _contrast(images: Tensor, generator: torch.Generator) -> Tensor:
    """Contrast halved around each image's mean level."""
    x = images.double()
    mean = x.mean(dim=(-3, -2, -1), keepdim=True)
    return (mean + (x - mean) / 2).round().to(torch.uint8)


def _tiles(images: Tensor, generator: torch.Generator) -> Tensor:
    """The four quadrants moved one place clockwise: local statistics kept, global layout broken."""
    h, w = images.shape[-2] // 2 * 2, images.shape[-1] // 2 * 2
    x = images[..., :h, :w]
    top, bottom = x[..., : h // 2, :], x[..., h // 2 :, :]
    tl, tr = top[..., : w // 2], top[..., w // 2 :]
    bl, br = bottom[..., : w // 2], bottom[..., w // 2 :]
    moved = torch.cat([torch.cat([bl, tl], dim=-1), torch.cat([br, tr], dim=-1)], dim=-2)
    out = images.clone()
    out[..., :h, :w] = moved
    return out


#: Shifts made from in-distribution validation images only, for choosing a default detector without OOD
#: data; none of them is an OOD set of the evaluation (those are other datasets, flips, noise, constants).
SHIFTS: dict[str, Callable[[Tensor, torch.Generator], Tensor]] = {
    "pixelate": _pixelate,
    "blend": _blend,
    "contrast": _contrast,
    "tiles": _tiles,
}


def shift_loaders(
    val: ImageSplit, rows: int, per_draw: int, draws: int, batch_size: int
) -> dict[str, DataLoader]:
    """``{shift:NAME: loader}``: rows ``[d·per_draw, (d+1)·per_draw)`` are made, draw by draw, from the
    first ``per_draw`` images of validation draw d (``val`` rows ``[d·rows, (d+1)·rows)``, the rows
    ``draw`` gives the detectors), so that a shift of draw d holds no image of another draw."""
    loaders = {}
    parts = [torch.arange(d * rows, d * rows + min(per_draw, rows)) for d in range(draws)]
    index = torch.cat(parts)
    for name, shift in SHIFTS.items():
        generator = torch.Generator().manual_seed(sum(map(ord, name)))
        images = torch.cat([shift(val.images[rows_of_draw], generator) for rows_of_draw in parts])
        split = ImageSplit(images, val.targets[index], val.num_levels, torch.full((len(index),), -1))
        loaders[SHIFT_PREFIX + name] = DataLoader(split, batch_size=batch_size)
    return loaders


def fitted_metric(name: str, model: nn.Module, train: Any, args: argparse.Namespace) -> tuple[Metric, float]:
    """Metric ``name`` fitted on the training data (or model samples), and the seconds it took."""
    cls = METRICS[name]
    accepted = inspect.signature(cls).parameters
    options = {"fisher": args.fisher, "n_samples": args.fisher_samples}
    metric = cls(**{key: value for key, value in options.items() if key in accepted})
    start = time.perf_counter()
    metric.fit(model, train)
    return metric, time.perf_counter() - start


def draw(norms: LayerNorms, d: int, draws: int) -> LayerNorms:
    """Rows of draw ``d`` of ``draws`` equal, disjoint, consecutive parts."""
    n = len(norms) // draws
    return norms[torch.arange(d * n, (d + 1) * n)]


def evaluate_draws(norms: dict[str, LayerNorms], draws: int) -> list[dict]:
    """Per draw: AUROCs of every detector on every OOD set and, when shift sets were scored, on every
    shift against held-out validation rows (the next draw's), fitted on the draw's validation rows."""
    detectors = [d for d in DETECTORS if d not in BASELINE_METHODS]
    shifts = {s: n for s, n in norms.items() if s.startswith(SHIFT_PREFIX)}
    ood = {s: n for s, n in norms.items() if s not in ("fit", "test") and s not in shifts}
    out = []
    for d in range(draws):
        fit = draw(norms["fit"], d, draws)
        result = fit_and_score(
            fit,
            draw(norms["test"], d, draws),
            {o: draw(n, d, draws) for o, n in ood.items()},
            [*detectors, *BASELINE_METHODS],
        )
        entry: dict[str, Any] = {"aurocs": aurocs_of(result.measures)}
        if shifts:
            other = (d + 1) % draws
            held_out = draw(norms["fit"], other, draws)
            shifted = {s[len(SHIFT_PREFIX) :]: draw(n, other, draws) for s, n in shifts.items()}
            fitted = result.detectors  # already fitted on this draw's validation rows: score, do not refit
            held = {name: detector.score(held_out) for name, detector in fitted.items()}
            entry["selection"] = {
                s: {name: ood_measures(held[name], d.score(rows))["auroc"] for name, d in fitted.items()}
                for s, rows in shifted.items()
            }
        out.append(entry)
    return out


def aurocs_of(measures: dict) -> dict:
    return {o: {d: m["auroc"] for d, m in by.items()} for o, by in measures.items()}


def cache_path(run_dir: Path, args: argparse.Namespace, name: str, k: int, tag: str) -> Path:
    """Where a run's features for a metric and group size, scored under ``tag``, are cached."""
    prefix = f"{tag}_" if tag else ""
    suffix = f"_shifts{args.max_samples // 2}" if args.shifts and k == 1 else ""
    stem = f"{prefix}{name}_{args.fisher}_k{k}_d{args.draws}_n{args.max_samples}{suffix}"
    return run_dir / "ood_benchmark" / f"{stem}.pt"


def load_features(path: Path) -> tuple[dict[str, LayerNorms], float, float]:
    norms, score_seconds, fit_seconds = torch.load(path, weights_only=False)
    return {s: LayerNorms(**fields) for s, fields in norms.items()}, score_seconds, fit_seconds


def averaged_features(
    run_dir: Path, args: argparse.Namespace, name: str, k: int
) -> tuple[dict[str, LayerNorms], float, float]:
    """The cached features of the tags in ``--average`` ("" for the untagged pass), averaged row by row
    (squared norms and log-likelihoods): several scorings of the same samples with independent noise of a
    stochastic bound (``--model.init_args.latent_stream S``), for features averaged over latent draws."""
    passes = []
    for tag in args.average:
        path = cache_path(run_dir, args, name, k, tag)
        if not path.exists():
            raise SystemExit(f"{path} is missing: score tag {tag!r} first, with the same options")
        passes.append(load_features(path))
    first = passes[0][0]
    averaged = {}
    for s, norms in first.items():
        rows = [p[0][s] for p in passes]
        same_ids = all(
            (r.ids is None) == (norms.ids is None) and (r.ids is None or torch.equal(r.ids, norms.ids))
            for r in rows
        )
        if not same_ids or any(r.values.shape != norms.values.shape or r.names != norms.names for r in rows):
            raise SystemExit(f"the passes {args.average} did not score the same rows of {s!r}")
        averaged[s] = LayerNorms(
            values=torch.stack([r.values for r in rows]).mean(0),
            names=norms.names,
            log_likelihood=torch.stack([r.log_likelihood for r in rows]).mean(0),
            ids=norms.ids,
        )
    return averaged, sum(p[1] for p in passes), sum(p[2] for p in passes)


def evaluate_run(run_dir: Path, args: argparse.Namespace) -> dict:
    """``{metric: {k: {"draws": [{"aurocs": ..., "selection": ...}], "seconds": ..., "samples": ...}}}``."""
    run = load_run(run_dir, args.overrides)
    dm = run.datamodule
    sets = {"fit": dm.val_dataloader(), "test": dm.test_dataloader(), **dm.ood_dataloaders()}
    cap = args.draws * args.max_samples
    rows = min(len(dm.val_set), cap) // args.draws  # validation rows per draw, as draw() splits them
    per_draw = args.max_samples // 2
    shifts = shift_loaders(dm.val_set, rows, per_draw, args.draws, dm.eval_batch_size) if args.shifts else {}
    out: dict = {}
    for name in args.metrics:
        metric: Metric | None = None  # fitted only when some group size's features are not cached
        fit_seconds = 0.0
        out[name] = {}
        for k in args.groups:
            scored = {**sets, **(shifts if k == 1 else {})}  # the selection is made at k = 1
            cache = cache_path(run_dir, args, name, k, args.tag)
            if args.average:
                norms, score_seconds, fit_seconds = averaged_features(run_dir, args, name, k)
            elif cache.exists():  # features of an earlier pass: only the detectors run again
                norms, score_seconds, fit_seconds = load_features(cache)
            else:
                if metric is None:
                    metric, fit_seconds = fitted_metric(name, run.model, dm.train_dataloader(), args)
                start = time.perf_counter()
                scoring = ScoringOptions(group_size=k, metric=metric, max_samples=cap)
                norms = {s: layer_norms_over(run.model, data, scoring, name=s) for s, data in scored.items()}
                score_seconds = time.perf_counter() - start
                cache.parent.mkdir(exist_ok=True)
                torch.save(({s: asdict(n) for s, n in norms.items()}, score_seconds, fit_seconds), cache)
            out[name][k] = {
                "draws": evaluate_draws(norms, args.draws),
                "seconds": {"fit_metric": fit_seconds, "score": score_seconds},
                "samples": {s: len(n) // args.draws for s, n in norms.items()},
            }
            print(
                f"{run_dir} {name} k={k}: metric fit {fit_seconds:.1f} s, scoring {score_seconds:.1f} s",
                flush=True,
            )
    return out


def mean_sd(values: Iterable[float]) -> tuple[float, float]:
    values = list(values)
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cell(values: Iterable[float]) -> str:
    mean, sd = mean_sd(values)
    return f"{mean:.3f} ± {sd:.3f}"


def model_of(run: str) -> str:
    """The model a run belongs to: ``runs/grid/vae_mnist/seed_1`` -> ``vae_mnist``; a run outside a
    seeds folder is its own model (its path), and a tag scored with overrides stays in the name."""
    path, _, tag = run.partition(" ")
    name = Path(path).parent.name if Path(path).name.startswith("seed_") else path
    return f"{name} {tag}".strip()


def by_model(results: dict) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for run, by_metric in results.items():
        grouped.setdefault(model_of(run), []).append(by_metric)
    return grouped


def entries(runs: list[dict], metric: str, k: int, key: str = "aurocs") -> list[dict]:
    """Every draw of every run (seed) of one model: ``[{set: {detector: auroc}}]``."""
    return [e[key] for r in runs if metric in r and k in r[metric] for e in r[metric][k]["draws"] if key in e]


def tables(results: dict) -> str:
    """Per model and group size: rows metric × detector, columns OOD sets, mean ± sd over seeds × draws."""
    lines = []
    for model, runs in by_model(results).items():
        metrics = list(runs[0])
        for k in sorted({k for r in runs for m in r.values() for k in m}):
            first = entries(runs, metrics[0], k)
            if not first:
                continue
            ood_sets = list(first[0])
            lines += [
                f"\n### {model}, k = {k} ({len(runs)} seeds × {len(first) // len(runs)} draws)\n",
                "| metric | detector | mean | " + " | ".join(ood_sets) + " |",
                "|---|---|---|" + "---|" * len(ood_sets),
            ]
            for metric in metrics:
                draws = entries(runs, metric, k)
                for detector in draws[0][ood_sets[0]] if draws else ():
                    if detector in BASELINE_METHODS and metric != metrics[0]:
                        continue  # the baselines do not depend on the metric: once per table
                    row = [cell(e[o][detector] for e in draws) for o in ood_sets]
                    mean = cell(statistics.fmean(e[o][detector] for o in ood_sets) for e in draws)
                    label = "–" if detector in BASELINE_METHODS else metric
                    lines.append(f"| {label} | {detector} | {mean} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def selection(results: dict, tolerance: float) -> tuple[str, tuple[str, str] | None]:
    """The protocol's choice of the default (metric, detector), from the in-distribution shifts only.

    Each pair's criterion is its AUROC averaged over shifts, draws and seeds of a model, then over
    models. Detectors are ranked on the metric scored for every model (``identity``); the best, or
    among those within ``tolerance`` of it the first registered, is chosen. A fitted metric replaces
    ``identity`` for that detector only if it beats it by more than ``tolerance`` on the models where
    it was scored."""
    per_model: dict[tuple[str, str], dict[str, float]] = {}
    for model, runs in by_model(results).items():
        for metric in runs[0]:
            draws = entries(runs, metric, 1, "selection")
            for detector in draws[0][next(iter(draws[0]))] if draws else ():
                if detector not in BASELINE_METHODS:
                    value = statistics.fmean(e[s][detector] for e in draws for s in e)
                    per_model.setdefault((metric, detector), {})[model] = value
    models = {m for values in per_model.values() for m in values}
    base = {
        p: statistics.fmean(v.values())
        for p, v in per_model.items()
        if p[0] == "identity" and set(v) == models
    }
    if not base:
        return "(no selection data: run with --shifts, identity metric)", None
    best = max(base.values())
    chosen = min(
        (p for p, v in base.items() if v >= best - tolerance), key=lambda pair: list(DETECTORS).index(pair[1])
    )
    lines = [f"| metric | detector | mean AUROC over the ID shifts ({len(models)} models) |", "|---|---|---|"]
    for pair, value in sorted(base.items(), key=lambda item: -item[1]):
        lines.append(f"| {pair[0]} | {pair[1]}{' **(chosen)**' if pair == chosen else ''} | {value:.3f} |")
    detector, winners = chosen[1], {}
    for (metric, name), values in per_model.items():
        if metric == "identity" or name != detector:
            continue
        fitted = statistics.fmean(values.values())
        plain = statistics.fmean(per_model[chosen][m] for m in values)
        if fitted > plain + tolerance:
            winners[metric] = fitted - plain
        verdict = "replaces identity" if metric in winners else "does not replace identity"
        lines.append(
            f"\n{metric} + {name} on {', '.join(values)}: {fitted:.3f}, identity {plain:.3f}: {verdict}"
        )
    if winners:
        chosen = (max(winners, key=winners.__getitem__), detector)
    return "\n".join(lines), chosen


def grid(results: dict, methods: list[tuple[str, str]], k: int) -> str:
    """One row per model and OOD set: AUROC mean ± sd over seeds × draws of each (metric, detector);
    ``–`` where a model was not scored under that metric."""
    header = " | ".join(f"{d} ({m})" if d not in BASELINE_METHODS else d for m, d in methods)
    lines = [f"| model | OOD set | {header} |", "|---|---|" + "---|" * len(methods)]
    for model, runs in by_model(results).items():
        draws = {m: entries(runs, m, k) for m in {m for m, _ in methods}}
        if not draws["identity"]:
            continue
        for ood in draws["identity"][0]:
            row = [cell(e[ood][d] for e in draws[m]) if draws[m] else "–" for m, d in methods]
            seeds = f"{len(runs)} seed" + ("s" if len(runs) > 1 else "")
            lines.append(f"| {model} ({seeds}) | {ood} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def load(path: Path) -> dict:
    """Results written by this script (JSON turns the group sizes into strings: back to ints)."""
    raw = json.loads(path.read_text())
    return {run: {m: {int(k): v for k, v in by_k.items()} for m, by_k in r.items()} for run, r in raw.items()}


def report(results: dict, args: argparse.Namespace) -> str:
    ranking, chosen = selection(results, args.tolerance)
    text = tables(results) + "\n\n### Selection (in-distribution shifts only)\n\n" + ranking
    chosen_pairs = [("identity", chosen[1]), chosen] if chosen else []
    methods = list(dict.fromkeys([("identity", "fim_gaussian"), *chosen_pairs, ("identity", "typicality")]))
    for k in args.groups:
        text += f"\n\n### Grid, k = {k}\n\n" + grid(results, methods, k)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", type=Path, help="run directories (config.yaml + checkpoints/)")
    parser.add_argument("--seeds", nargs="+", type=int, help="each run directory holds seed_<S>/ runs")
    parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS))
    parser.add_argument("--groups", nargs="+", type=int, default=[1, 5])
    parser.add_argument("--draws", type=int, default=1, help="disjoint draws of fit, test and OOD samples")
    parser.add_argument("--shifts", action="store_true", help="score the in-distribution shifts too")
    parser.add_argument("--tolerance", type=float, default=0.005, help="selection: ties within this")
    parser.add_argument("--fisher", choices=["empirical", "true"], default="empirical")
    parser.add_argument("--fisher-samples", type=int, default=1000)
    parser.add_argument("--max-samples", type=int, default=1000, help="per set and draw")
    parser.add_argument("--out", type=Path, default=Path("runs/ood_benchmark.json"))
    parser.add_argument("--tag", default="", help="names results and cached features scored with overrides")
    parser.add_argument("--collect", nargs="+", type=Path, help="only print the tables of these JSON files")
    parser.add_argument(
        "--average",
        nargs="+",
        help="evaluate the features of these tags ('' untagged) averaged row by row, under --tag",
    )
    args, unknown = parser.parse_known_args()  # the rest: train.py options, e.g. --data.root PATH
    args.overrides = [a for a in unknown if a != "--"]
    if args.average and not args.tag:
        parser.error("--average needs a --tag to file the averaged results under")
    if args.average and set(args.metrics) != {"identity"}:
        # a fitted metric is fitted anew in each pass: its features are not on one scale to average
        parser.error("--average needs --metrics identity (each pass fits its own metric)")
    if args.shifts and args.draws < 2:
        parser.error("--shifts needs --draws 2 or more (held-out validation rows come from another draw)")
    if args.collect:
        results: dict = {}
        for path in args.collect:  # files may hold other metrics or group sizes of a run: merge them
            for run, by_metric in load(path).items():
                for metric, by_k in by_metric.items():
                    results.setdefault(run, {}).setdefault(metric, {}).update(by_k)
        print(report(results, args))
        return
    results = load(args.out) if args.out.exists() else {}  # runs scored earlier keep their entries
    runs = [r / f"seed_{s}" for r in args.runs for s in args.seeds] if args.seeds else args.runs
    for run_dir in runs:
        results[f"{run_dir}{' ' + args.tag if args.tag else ''}"] = evaluate_run(run_dir, args)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    print(report(results, args))


if __name__ == "__main__":
    main()
