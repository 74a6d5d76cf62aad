"""The zoo at its CPU configs' sizes, and its speed: hooks engine / plain forward+backward, one thread.

    OMP_NUM_THREADS=1 python benchmarks/zoo_speed.py [LABEL]

Uses only ``fimcb.per_sample_layer_norms`` and ``fimcb.models``, so the same script times any version of
fimcb. To compare with an earlier commit, alternate the two in separate processes::

    git worktree add /tmp/before 8c6c23e
    OMP_NUM_THREADS=1 PYTHONPATH=/tmp/before/src python benchmarks/zoo_speed.py before
    OMP_NUM_THREADS=1 python benchmarks/zoo_speed.py after

``benchmarks/ecosystem.py`` takes its zoo rows from :data:`ZOO`.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from fimcb import per_sample_layer_norms
from fimcb.models import VAE, Diffusion, Glow, PixelCNN, Transformer


def _images(levels: int, shape: tuple[int, ...]) -> Callable[[torch.dtype], Tensor]:
    generator = torch.Generator().manual_seed(0)
    return lambda dtype: (torch.randint(0, levels, (64, *shape), generator=generator) / (levels - 1)).to(
        dtype
    )


FASHION = (1, 28, 28)
#: name -> (make the model, its batch in a dtype)
ZOO: dict[str, tuple[Callable[[], nn.Module], Callable[[torch.dtype], Tensor]]] = {
    "zoo: glow-digits": (
        lambda: Glow((1, 8, 8), 17, n_levels=2, n_steps=4, hidden_channels=32),
        _images(17, (1, 8, 8)),
    ),
    "zoo: glow-fashionmnist": (
        lambda: Glow(FASHION, 256, n_levels=2, n_steps=8, hidden_channels=64),
        _images(256, FASHION),
    ),
    "zoo: vae-fashionmnist": (
        lambda: VAE(FASHION, 256, hidden_channels=32, latent_channels=8, n_downsample=2, n_res_blocks=1),
        _images(256, FASHION),
    ),
    "zoo: pixelcnn-fashionmnist": (
        lambda: PixelCNN(FASHION, 256, n_layers=5, hidden_channels=32, kernel_size=3, input_kernel_size=7),
        _images(256, FASHION),
    ),
    "zoo: diffusion-fashionmnist": (
        lambda: Diffusion(FASHION, 256, channels=8, channel_mults=(1, 2, 2), n_res_blocks=1, n_groups=8),
        _images(256, FASHION),
    ),
    "zoo: transformer-modadd": (
        lambda: Transformer(vocab_size=102, seq_len=5, prompt_len=4, d_model=128, n_layers=1, n_heads=4),
        lambda dtype: torch.randint(0, 97, (256, 5), generator=torch.Generator().manual_seed(0)),
    ),
}


def plain(model: nn.Module, x: Tensor) -> None:
    """The baseline: one batched forward and backward of the summed log-likelihood."""
    torch.autograd.grad(model.log_likelihood(x).sum(), [p for p in model.parameters() if p.requires_grad])


def engine(model: nn.Module, x: Tensor) -> None:
    per_sample_layer_norms(model, x, engine="hooks")


def ratios(model: nn.Module, x: Tensor, repeats: int = 11) -> list[float]:
    """Engine time over plain time, interleaved, after two warm-up calls of each (the first batch of a
    model is captured with the tracker and checked)."""
    for _ in range(2):
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
    label = sys.argv[1] if len(sys.argv) > 1 else "this"
    torch.set_num_threads(1)
    for name, (make, inputs) in ZOO.items():
        torch.manual_seed(0)
        median = statistics.median(ratios(make().eval(), inputs(torch.float32)))
        print(f"{label} {name} {median:.2f}", flush=True)


if __name__ == "__main__":
    main()
