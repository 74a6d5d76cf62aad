"""Where a recurrent layer should run as PyTorch's kernel (fed its input part through an identity weight)
rather than unrolled step by step: the engine's time on an LSTM density over a sequence, by route, against
one plain forward+backward, in the same process.

    OMP_NUM_THREADS=1 python benchmarks/recurrent.py [--hidden 16 32 64 128 256] [--batch 64] [--repeats 9]

Prints, for each hidden size, ``B·G²`` (the identity product's work per step, ``G = 4·hidden``) and the
median time ratio of each route (25-75 % range); ``FUSED_MAX_WORK`` in ``fimcb/engine/rules/recurrent.py``
sits between the sizes where the kernel wins and where the unrolled recurrence does.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from ecosystem_models import RecurrentDensity
from zoo_speed import plain

from fimcb import per_sample_layer_norms
from fimcb.engine.rules import recurrent


def ratios(model: torch.nn.Module, x: torch.Tensor, fused: bool, repeats: int) -> list[float]:
    recurrent.FUSED_MAX_WORK = sys.maxsize if fused else -1

    def engine() -> None:
        per_sample_layer_norms(model, x, engine="hooks")

    for _ in range(3):
        engine()
        plain(model, x)
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        plain(model, x)
        middle = time.perf_counter()
        engine()
        out.append((time.perf_counter() - middle) / (middle - start))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    default = recurrent.FUSED_MAX_WORK
    print(f"LSTM density, batch {args.batch}, {args.steps} steps, 8 features; FUSED_MAX_WORK = {default}")
    for hidden in args.hidden:
        torch.manual_seed(0)
        model = RecurrentDensity(8, hidden).eval()
        x = torch.randn(args.batch, args.steps, 8)
        cells = []
        for fused in (True, False):
            r = sorted(ratios(model, x, fused, args.repeats))
            q = len(r) // 4
            cells.append(f"{statistics.median(r):.2f} ({r[q]:.2f}-{r[-1 - q]:.2f})")
        work = args.batch * (4 * hidden) ** 2
        print(f"hidden {hidden:4d}  B*G^2 {work:>11,}  kernel {cells[0]}  unrolled {cells[1]}", flush=True)
    recurrent.FUSED_MAX_WORK = default


if __name__ == "__main__":
    main()
