"""Train every model of the zoo on its CPU config, over seeds, and tabulate bits/dim, time and OOD AUROCs.

    OMP_NUM_THREADS=1 python benchmarks/zoo.py --seeds 0 1 2 --jobs 2 --out runs/zoo -- --data.root PATH

Each config × seed runs as ``train.py fit --seed_everything SEED`` in its own subprocess (``--jobs`` at
a time, one thread each), into ``OUT/<name>/seed_<SEED>``; the data splits do not depend on the seed.
Afterwards the script reads each run's ``ood_metrics.json`` (the callback's end-of-training
evaluation) and ``metrics.csv`` and prints a markdown table of AUROCs as mean ± sd over the seeds
(rows: model × method, columns: OOD sets) and one of bits/dim and wall time. ``--collect`` only
re-reads finished runs.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["glow", "vae", "pixelcnn", "diffusion"]


def config_path(name: str) -> Path:
    """``configs/<name>.yaml``, or the model's CPU config ``configs/<name>_fashionmnist.yaml``."""
    exact = ROOT / "configs" / f"{name}.yaml"
    return exact if exact.exists() else ROOT / "configs" / f"{name}_fashionmnist.yaml"


def run_dir(out: Path, name: str, seed: int) -> Path:
    return out / name / f"seed_{seed}"


def train(name: str, seed: int, out: Path, extra: list[str]) -> float:
    """Run one config and seed to completion; returns its wall time in seconds (also in ``wall_s.txt``)."""
    directory = run_dir(out, name, seed)
    shutil.rmtree(directory, ignore_errors=True)
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "fit",
        "--config",
        str(config_path(name)),
        "--seed_everything",
        str(seed),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger.init_args.save_dir",
        str(out),
        "--trainer.logger.init_args.name",
        name,
        "--trainer.logger.init_args.version",
        directory.name,
        "--trainer.default_root_dir",
        str(directory),
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    directory.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(out / name / f"train_seed_{seed}.log", "w") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True, cwd=ROOT, env=env)
    seconds = time.perf_counter() - start
    (directory / "wall_s.txt").write_text(f"{seconds:.1f}\n")
    print(f"{name} seed {seed}: {seconds / 60:.1f} min", flush=True)
    return seconds


def last_value(metrics_csv: Path, column: str) -> float | None:
    """The last non-empty value of ``column`` in a CSVLogger ``metrics.csv``."""
    value = None
    with open(metrics_csv) as f:
        for row in csv.DictReader(f):
            if row.get(column):
                value = float(row[column])
    return value


def mean_sd(values: list[float]) -> str:
    """``mean ± sd`` over seeds (sd 0 for one seed)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


def tables(out: Path, names: list[str], seeds: list[int]) -> str:
    """Markdown tables of every finished run under ``out``: mean ± sd over the seeds that finished."""
    results: dict[str, list[Path]] = {}
    for name in names:
        done = [run_dir(out, name, s) for s in seeds if (run_dir(out, name, s) / "ood_metrics.json").exists()]
        if done:
            results[name] = done
    if not results:
        return "(no finished runs)"
    ood_sets = list(json.loads((next(iter(results.values()))[0] / "ood_metrics.json").read_text()))
    lines = [
        "| model | seeds | method | " + " | ".join(ood_sets) + " |",
        "|---|---|---|" + "---|" * len(ood_sets),
    ]
    for name, directories in results.items():
        metrics = [json.loads((d / "ood_metrics.json").read_text()) for d in directories]
        for method in next(iter(metrics[0].values())):
            aurocs = [
                mean_sd([m[o][method]["auroc"] for m in metrics]) if o in metrics[0] else "–"
                for o in ood_sets
            ]
            lines.append(f"| {name} | {len(directories)} | {method} | " + " | ".join(aurocs) + " |")
    lines += ["", "| model | parameters | val bits/dim (nats/token) | wall time (min) |", "|---|---|---|---|"]
    for name, directories in results.items():
        bpd = [final_bpd(d) for d in directories]
        walls = [
            float((d / "wall_s.txt").read_text()) / 60 for d in directories if (d / "wall_s.txt").exists()
        ]
        bits = mean_sd([b for b in bpd if b is not None]) if any(b is not None for b in bpd) else "–"
        minutes = mean_sd(walls) if walls else "–"
        lines.append(f"| {name} | {parameter_count(directories[0])} | {bits} | {minutes} |")
    return "\n".join(lines)


def final_bpd(directory: Path) -> float | None:
    """The run's last validation bits/dim (nats/token for sequence models)."""
    bpd = last_value(directory / "metrics.csv", "val/bpd")
    return bpd if bpd is not None else last_value(directory / "metrics.csv", "val/nats_per_token")


def parameter_count(directory: Path) -> str:
    """Trainable parameters as Lightning's model summary printed them in the run's ``train.log``."""
    log = directory.parent / f"train_{directory.name}.log"
    text = log.read_text() if log.exists() else ""
    # Lightning's summary: "Trainable params: 185 K" (older releases: "185 K  Trainable params")
    found = re.search(r"Trainable params:\s*([\d.]+ ?[KMB]?)", text) or re.search(
        r"([\d.]+ ?[KMB]?)\s+Trainable params", text
    )
    return found.group(1).strip() if found else "–"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=CONFIGS, help="configs/<name>.yaml or configs/<name>_fashionmnist.yaml"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="training seeds (seed_everything)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (one CPU thread each)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "zoo")
    parser.add_argument("--collect", action="store_true", help="only tabulate finished runs")
    parser.add_argument("extra", nargs="*", help="more train.py arguments, after --")
    args = parser.parse_args()
    if not args.collect:
        runs = [(name, seed) for seed in args.seeds for name in args.models]
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda run: train(*run, args.out, args.extra), runs))
    print(tables(args.out, args.models, args.seeds))


if __name__ == "__main__":
    main()
