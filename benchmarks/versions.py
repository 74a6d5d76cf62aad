"""Engine / plain time for chosen models of the compatibility matrix, under whichever fimcb is importable:
to compare two commits, alternate them in fresh processes pinned to one core (the two cores of a small
machine are not equally loaded, which moves ratios between processes by ±0.1)::

    git worktree add /tmp/before 1586bfd
    for round in 1 2; do
      PYTHONPATH=/tmp/before/src taskset -c 0 python benchmarks/versions.py before zuko_maf "zoo: glow-digits"
      taskset -c 0 python benchmarks/versions.py after zuko_maf "zoo: glow-digits"
    done

Prints ``LABEL MODEL RATIO``: the median over 9 interleaved repeats, after warm-up calls.
"""

from __future__ import annotations

import statistics
import sys

import torch
from ecosystem import MODELS
from zoo_speed import ratios

import fimcb


def main() -> None:
    label, names = sys.argv[1], sys.argv[2:]
    print(f"# {label}: fimcb from {fimcb.__file__}", flush=True)
    torch.set_num_threads(1)
    for name in names:
        model, x = MODELS[name].build(torch.float32, bench=True)
        print(f"{label} {name} {statistics.median(ratios(model, x, 9)):.2f}", flush=True)


if __name__ == "__main__":
    main()
