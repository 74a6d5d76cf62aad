"""The compatibility matrix: models fimcb did not write, and its own zoo, in one table.

    OMP_NUM_THREADS=1 python benchmarks/ecosystem.py [--threads 1 2] [--repeats 9] [--out docs/models.md]

For every model (the zoo at its CPU configs' sizes; transformers GPT-2, diffusers ``UNet2DModel``,
zuko MAF and NSF, normflows RealNVP; one small model for each pattern that escapes module hooks,
from ``tests/ecosystem_models.py`` at benchmark size): whether the hooks engine is exact (largest
deviation from a naive per-sample loop, relative to the sample's largest layer norm, in float64 and
float32, on the model's first three batches), the route of each layer type, and time and peak
memory of ``per_sample_layer_norms`` against one plain batched forward+backward of the summed
log-likelihood, interleaved in the same process at each thread count (median ratio, with the 25-75 %
range of the repeats). Memory is the rise of peak resident memory in a forked child, as a ratio.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import statistics
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the models the test suite checks, at benchmark size
sys.path.insert(0, str(ROOT / "benchmarks"))

from ecosystem_models import LIBRARIES, PATTERNS, Case  # noqa: E402
from engine import ConvAutoencoder, peak_rise  # noqa: E402
from toy_models import naive_layer_norms  # noqa: E402
from zoo_speed import FASHION, engine, plain, ratios  # noqa: E402
from zoo_speed import ZOO as ZOO_MODELS  # noqa: E402

from fimcb.engine import describe_routes, per_sample_layer_norms  # noqa: E402


def _zoo(make: Callable[[], nn.Module], inputs: Callable[[torch.dtype], Tensor]) -> Case:
    return Case(make, inputs, make, inputs)


ZOO: dict[str, Case] = {
    **{name: _zoo(make, inputs) for name, (make, inputs) in ZOO_MODELS.items()},
    "reference: conv-autoencoder": _zoo(ConvAutoencoder, lambda dtype: torch.rand(64, *FASHION, dtype=dtype)),
}
MODELS: dict[str, Case] = {**ZOO, **LIBRARIES, **PATTERNS}


def exactness(case: Case, dtype: torch.dtype) -> float:
    """Largest deviation from the naive loop over three engine calls (the checked first batch, the second,
    which checks the lighter capture, and the third, the first without checks), relative to each
    sample's largest layer norm, on 8 samples."""
    model, x = case.build(dtype, bench=True)
    x = x[:8]
    want, _ = naive_layer_norms(model, x)
    scale = want.abs().amax(dim=1, keepdim=True).clamp_min(1e-300)
    errors = [
        float(((per_sample_layer_norms(model, x, engine="hooks").values - want).abs() / scale).max())
        for _ in range(3)
    ]
    return max(errors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--models", nargs="*", default=None, help="a subset of the matrix, by name")
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    header = (
        "| model | parameters | exact: float64 / float32 error | routes | "
        + " | ".join(f"{t} thread{'s' if t > 1 else ''}: time, memory" for t in args.threads)
        + " |"
    )
    lines = [header, "|---|---|---|---|" + "---|" * len(args.threads)]
    print("\n".join(lines), flush=True)
    summary: dict[int, list[float]] = {t: [] for t in args.threads}
    memories: list[float] = []
    for name, case in MODELS.items():
        if args.models and name not in args.models:
            continue
        if case.library is not None and importlib.util.find_spec(case.library) is None:
            lines.append(
                f"| {name} | {case.library} not installed | | | "
                + " | ".join("" for _ in args.threads)
                + " |"
            )
            print(lines[-1], flush=True)
            continue
        torch.set_num_threads(1)
        errors = exactness(case, torch.float64), exactness(case, torch.float32)
        cells = []
        model, x = case.build(torch.float32, bench=True)
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        for threads in args.threads:
            torch.set_num_threads(threads)
            times = ratios(model, x, args.repeats)
            median = statistics.median(times)
            q1, _, q3 = statistics.quantiles(times, n=4)
            summary[threads].append(median)
            memory = ""
            if threads == args.threads[0]:
                ratio = peak_rise(partial(engine, model, x)) / max(peak_rise(partial(plain, model, x)), 1e-3)
                memories.append(ratio)
                memory = f", {ratio:.2f}×"
            cells.append(f"{median:.2f}× ({q1:.2f}–{q3:.2f}){memory}")
        exact = "yes" if errors[0] <= 1e-10 and errors[1] <= 1e-4 else "NO"
        row = (
            f"| {name} | {n_params:,} | {exact}: {errors[0]:.1e} / {errors[1]:.1e} | "
            f"{describe_routes(model)} | " + " | ".join(cells) + " |"
        )
        lines.append(row)
        print(row, flush=True)
    for threads, values in summary.items():
        if values:
            lines.append(
                f"\n{threads} thread(s): median time ratio {statistics.median(values):.2f}×, "
                f"largest {max(values):.2f}× over {len(values)} models"
            )
    if memories:
        lines.append(
            f"peak memory ratio: median {statistics.median(memories):.2f}×, largest {max(memories):.2f}×"
        )
    print("\n".join(lines[-len(summary) - 1 :]), flush=True)
    if args.out:
        Path(args.out).write_text(_preamble(args) + "\n".join(lines) + "\n")


def _preamble(args: argparse.Namespace) -> str:
    """What the generated page shows and how it was made (the page is rewritten whole by each run)."""
    threads = os.environ.get("OMP_NUM_THREADS")
    command = " ".join([*([f"OMP_NUM_THREADS={threads}"] if threads else []), "python", *sys.argv])
    return f"""# Compatibility matrix: models fimcb did not write, and its own zoo

Generated by `{command}`
on {datetime.date.today()} (torch {torch.__version__}, {os.cpu_count()} CPU cores); do not edit by hand.
What the numbers mean, and how they compare with the targets, is in [performance.md](performance.md).

- **exact**: the largest deviation of any per-sample layer norm from a naive loop of per-sample
  `backward()` calls, relative to the sample's largest layer norm, in float64 / float32 (targets
  1e-10 / 1e-4), over the model's first three batches (the first tracked and checked against
  autograd, the second checking the lighter capture, the third the first without checks; on models
  holding enough, that one reduces layers inside the backward).
- **routes**: how the hooks engine serves each layer type and each parameter used outside a ruled
  module (`fimcb.engine.describe_routes`): a layer rule (for a recurrent layer, its linear maps
  gathered over the time steps); an op rule or a batched pull-back for parameters used in plain torch
  code or in a layer without a rule; module-local `torch.func` for a layer whose rule failed; and any
  fallback with its reason.
- **time, memory**: `per_sample_layer_norms` against one plain batched forward and backward of the
  summed log-likelihood, interleaved in one process: the median time ratio over {args.repeats} repeats
  (25-75 % range), and the ratio of peak resident memory rises, each measured in a forked child that
  first returns the allocator's free memory and resets its peak (`benchmarks/engine.py:peak_rise`).
  Runs in separate processes differ by ±0.1 in time (the two cores are not equally loaded) and by up
  to ±0.15 in memory (what the allocator holds).

"""


if __name__ == "__main__":
    main()
