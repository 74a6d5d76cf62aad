"""Peak memory of a convolution's norms by route: three 3x3 convolutions at 32x32, batch 64, every layer
forced onto one route (ghost, unfold, grouped), against one plain forward+backward.

    OMP_NUM_THREADS=1 python benchmarks/conv_memory.py [--batch 64] [--size 32]

Prints, for each route, the rise of peak resident memory of the plain pass and of
``per_sample_layer_norms`` (MiB, each in a forked child, ``engine.peak_rise``) and their ratio.
Routes are normally chosen by timing (``fimcb.engine.rules.conv._fastest``); forcing them shows what
each costs in memory, and that the unfolding ones stay within about what the layer holds.
"""

from __future__ import annotations

import argparse

import torch
from engine import peak_rise
from torch import Tensor, nn

import fimcb.engine.rules.conv as conv
from fimcb import per_sample_layer_norms


class ThreeConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(16, 32, 3, padding=1)
        self.b = nn.Conv2d(32, 32, 3, padding=1)
        self.c = nn.Conv2d(32, 3, 3, padding=1)

    def log_likelihood(self, x: Tensor) -> Tensor:
        return -self.c(torch.relu(self.b(torch.relu(self.a(x))))).pow(2).flatten(1).sum(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    fastest = conv._fastest
    for route in conv.ConvRoute:
        conv._fastest = lambda key, shape, make, ghost, route=route: make(route)
        torch.manual_seed(0)
        p, e = measure(ThreeConvs().eval(), torch.randn(args.batch, 16, args.size, args.size))
        print(f"{route.value:8s} plain {p:6.1f} MiB  engine {e:6.1f} MiB  ratio {e / p:.2f}", flush=True)
    conv._fastest = fastest


def measure(model: nn.Module, x: Tensor) -> tuple[float, float]:
    """Peak-memory rises (MiB) of a plain pass and of the engine, after the engine's checked batches."""

    def plain() -> None:
        torch.autograd.grad(model.log_likelihood(x).sum(), list(model.parameters()))

    def engine() -> None:
        per_sample_layer_norms(model, x, engine="hooks")

    for _ in range(3):  # checked, lighter, streamed
        engine()
        plain()
    return peak_rise(plain), peak_rise(engine)


if __name__ == "__main__":
    main()
