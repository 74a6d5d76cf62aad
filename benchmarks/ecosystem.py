"""The compatibility matrix: models fimcb did not write, and its own zoo, in one table.

    OMP_NUM_THREADS=1 python benchmarks/ecosystem.py [--threads 1 2] [--repeats 9] [--out docs/models.md]

For every model (the zoo at its CPU configs' sizes; transformers GPT-2, diffusers ``UNet2DModel``,
zuko MAF and NSF, normflows RealNVP; one small model for each pattern that escapes module hooks,
from ``tests/ecosystem_models.py`` at benchmark size): whether the hooks engine is exact (largest
deviation from a naive per-sample loop, relative to the sample's largest layer norm, in float64 and
float32, on the model's first batch and the next), the route of each layer type, and time and peak
memory of ``per_sample_layer_norms`` against one plain batched forward+backward of the summed
log-likelihood, interleaved in the same process at each thread count (median ratio, with the 25-75 %
range of the repeats). Memory is the rise of peak resident memory in a forked child, as a ratio.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
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

from fimcb.engine import describe_routes, per_sample_layer_norms  # noqa: E402
from fimcb.models import VAE, Diffusion, Glow, PixelCNN, Transformer  # noqa: E402


def _images(levels: int, shape: tuple[int, ...]) -> Callable[[torch.dtype], Tensor]:
    generator = torch.Generator().manual_seed(0)
    return lambda dtype: (torch.randint(0, levels, (64, *shape), generator=generator) / (levels - 1)).to(
        dtype
    )


def _zoo(make: Callable[[], nn.Module], inputs: Callable[[torch.dtype], Tensor]) -> Case:
    return Case(make, inputs, make, inputs)


FASHION = (1, 28, 28)
ZOO: dict[str, Case] = {
    "zoo: glow-digits": _zoo(
        lambda: Glow((1, 8, 8), 17, n_levels=2, n_steps=4, hidden_channels=32), _images(17, (1, 8, 8))
    ),
    "zoo: glow-fashionmnist": _zoo(
        lambda: Glow(FASHION, 256, n_levels=2, n_steps=8, hidden_channels=64), _images(256, FASHION)
    ),
    "zoo: vae-fashionmnist": _zoo(
        lambda: VAE(FASHION, 256, hidden_channels=32, latent_channels=8, n_downsample=2, n_res_blocks=1),
        _images(256, FASHION),
    ),
    "zoo: pixelcnn-fashionmnist": _zoo(
        lambda: PixelCNN(FASHION, 256, n_layers=5, hidden_channels=32, kernel_size=3, input_kernel_size=7),
        _images(256, FASHION),
    ),
    "zoo: diffusion-fashionmnist": _zoo(
        lambda: Diffusion(FASHION, 256, channels=8, channel_mults=(1, 2, 2), n_res_blocks=1, n_groups=8),
        _images(256, FASHION),
    ),
    "zoo: transformer-modadd": _zoo(
        lambda: Transformer(vocab_size=102, seq_len=5, prompt_len=4, d_model=128, n_layers=1, n_heads=4),
        lambda dtype: torch.randint(0, 97, (256, 5), generator=torch.Generator().manual_seed(0)),
    ),
    "reference: conv-autoencoder": _zoo(ConvAutoencoder, lambda dtype: torch.rand(64, *FASHION, dtype=dtype)),
}
MODELS: dict[str, Case] = {**ZOO, **LIBRARIES, **PATTERNS}


def plain(model: nn.Module, x: Tensor) -> None:
    """The baseline: one batched forward and backward of the summed log-likelihood."""
    torch.autograd.grad(model.log_likelihood(x).sum(), [p for p in model.parameters() if p.requires_grad])


def engine(model: nn.Module, x: Tensor) -> None:
    per_sample_layer_norms(model, x, engine="hooks")


def exactness(case: Case, dtype: torch.dtype) -> float:
    """Largest deviation from the naive loop over two engine calls (the checked first batch and the next),
    relative to each sample's largest layer norm, on 8 samples."""
    model, x = case.build(dtype, bench=True)
    x = x[:8]
    want, _ = naive_layer_norms(model, x)
    scale = want.abs().amax(dim=1, keepdim=True).clamp_min(1e-300)
    errors = [
        float(((per_sample_layer_norms(model, x, engine="hooks").values - want).abs() / scale).max())
        for _ in range(2)
    ]
    return max(errors)


def ratios(model: nn.Module, x: Tensor, repeats: int) -> list[float]:
    """Engine time over baseline time, interleaved."""
    for _ in range(2):  # the first batch of a model is captured with the tracker and checked
        engine(model, x)
        plain(model, x)
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        plain(model, x)
        middle = time.perf_counter()
        engine(model, x)
        out.append((time.perf_counter() - middle) / (middle - start))
    return out


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
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
