"""Train every model of the zoo on its CPU config and tabulate bits/dim, time and OOD AUROCs.

    OMP_NUM_THREADS=1 python benchmarks/zoo.py --jobs 2 --out runs/zoo -- --data.root ../shared/data

Each config runs as ``train.py fit`` in its own subprocess (``--jobs`` at a time, one thread each),
into ``OUT/<name>/version_0``; afterwards the script reads each run's ``ood_metrics.json`` and
``metrics.csv`` and prints one markdown table of AUROCs (rows: model × method, columns: OOD sets)
and one of bits/dim and wall time. ``--collect`` only re-reads finished runs.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
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


def run_dir(out: Path, name: str) -> Path:
    return out / name / "version_0"


def train(name: str, out: Path, extra: list[str]) -> float:
    """Run one config to completion; returns its wall time in seconds (also written to ``wall_s.txt``)."""
    shutil.rmtree(out / name, ignore_errors=True)
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "fit",
        "--config",
        str(config_path(name)),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger.init_args.save_dir",
        str(out),
        "--trainer.logger.init_args.name",
        name,
        "--trainer.logger.init_args.version",
        "0",
        "--trainer.default_root_dir",
        str(out / name),
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    (out / name).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(out / name / "train.log", "w") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True, cwd=ROOT, env=env)
    seconds = time.perf_counter() - start
    (run_dir(out, name) / "wall_s.txt").write_text(f"{seconds:.1f}\n")
    print(f"{name}: {seconds / 60:.1f} min", flush=True)
    return seconds


def last_value(metrics_csv: Path, column: str) -> float | None:
    """The last non-empty value of ``column`` in a CSVLogger ``metrics.csv``."""
    value = None
    with open(metrics_csv) as f:
        for row in csv.DictReader(f):
            if row.get(column):
                value = float(row[column])
    return value


def tables(out: Path, names: list[str]) -> str:
    """Markdown tables of every finished run under ``out``."""
    results = {}
    for name in names:
        directory = run_dir(out, name)
        if (directory / "ood_metrics.json").exists():
            results[name] = directory
    if not results:
        return "(no finished runs)"
    ood_sets = list(json.loads((next(iter(results.values())) / "ood_metrics.json").read_text()))
    lines = ["| model | method | " + " | ".join(ood_sets) + " |", "|---|---|" + "---|" * len(ood_sets)]
    for name, directory in results.items():
        metrics = json.loads((directory / "ood_metrics.json").read_text())
        for method in next(iter(metrics.values())):
            aurocs = [f"{metrics[o][method]['auroc']:.3f}" if o in metrics else "–" for o in ood_sets]
            lines.append(f"| {name} | {method} | " + " | ".join(aurocs) + " |")
    lines += ["", "| model | parameters | val bits/dim (nats/token) | wall time |", "|---|---|---|---|"]
    for name, directory in results.items():
        bpd = last_value(directory / "metrics.csv", "val/bpd")
        if bpd is None:
            bpd = last_value(directory / "metrics.csv", "val/nats_per_token")
        wall = directory / "wall_s.txt"
        minutes = f"{float(wall.read_text()) / 60:.1f} min" if wall.exists() else "–"
        bits = f"{bpd:.3f}" if bpd is not None else "–"
        lines.append(f"| {name} | {parameter_count(directory)} | {bits} | {minutes} |")
    return "\n".join(lines)


def parameter_count(directory: Path) -> str:
    """Trainable parameters as Lightning's model summary printed them in the run's ``train.log``."""
    log = directory.parent / "train.log"
    found = re.search(r"([\d.]+ ?[KMB]?)\s+Trainable params", log.read_text()) if log.exists() else None
    return found.group(1).strip() if found else "–"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=CONFIGS, help="configs/<name>.yaml or configs/<name>_fashionmnist.yaml"
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (one CPU thread each)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "zoo")
    parser.add_argument("--collect", action="store_true", help="only tabulate finished runs")
    parser.add_argument("extra", nargs="*", help="more train.py arguments, after --")
    args = parser.parse_args()
    if not args.collect:
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda name: train(name, args.out, args.extra), args.models))
    print(tables(args.out, args.models))


if __name__ == "__main__":
    main()
