"""Speed and memory of per-sample layer norms, as ratios to one batched forward+backward.

    OMP_NUM_THREADS=1 python benchmarks/engine.py [--batches 16 64] [--repeats 5] [--out FILE]

For each model and batch size, every method runs in the same process as the baseline
(``autograd.grad`` of the summed log-likelihood over all parameters), interleaved with it, and the
median time ratio is printed. Peak memory is measured in a forked child per method: the rise of
its peak resident memory over what it held at the fork, as a ratio to the baseline's rise.
Outside implementations (BackPACK ``BatchL2Grad``, Opacus ``GradSampleModule``) run where they
support the model; install them for the benchmark only (``pip install backpack-for-pytorch opacus``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import os
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn

from fimcb import per_sample_layer_norms
from fimcb.models import Glow


class ConvAutoencoder(nn.Module):
    """A 0.46 M-parameter conv autoencoder with a unit-variance Gaussian decoder: the reference
    architecture outside tools support (plain Conv2d / ConvTranspose2d / Linear layers)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(), nn.Flatten(),
            nn.Linear(64 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 64 * 7 * 7), nn.ReLU(),
            nn.Unflatten(1, (64, 7, 7)), nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(32, 1, 4, 2, 1),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def log_likelihood(self, x: Tensor) -> Tensor:
        return -0.5 * (self(x) - x).pow(2).flatten(1).sum(1)


def models() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    return {
        "glow-digits (30 k)": (Glow((1, 8, 8), 17, n_levels=2, n_steps=4, hidden_channels=32), (1, 8, 8)),
        "glow-fashionmnist (153 k)": (
            Glow((1, 28, 28), 256, n_levels=2, n_steps=8, hidden_channels=64),
            (1, 28, 28),
        ),
        "conv-autoencoder (462 k)": (ConvAutoencoder(), (1, 28, 28)),
    }


def baseline(model: nn.Module, x: Tensor) -> None:
    torch.autograd.grad(-model.log_likelihood(x).sum(), [p for p in model.parameters() if p.requires_grad])


def fimcb_method(engine: str) -> Callable[[nn.Module, Tensor], None]:
    return lambda model, x: per_sample_layer_norms(model, x, engine=engine)  # type: ignore[arg-type]


def backpack_method() -> Callable[[nn.Module, Tensor], None] | None:
    try:
        from backpack import backpack, extend
        from backpack.extensions import BatchL2Grad
    except ImportError:
        return None

    extended: dict[int, nn.Module] = {}
    loss_fn = extend(nn.MSELoss(reduction="sum"))

    def run(model: nn.Module, x: Tensor) -> None:
        if not isinstance(model, ConvAutoencoder):
            raise NotImplementedError("BackPACK needs a Sequential of supported layers and a supported loss")
        if id(model) not in extended:  # on a copy: BackPACK leaves its hooks on the module it extends
            extended[id(model)] = extend(copy.deepcopy(model.net))
        net = extended[id(model)]
        loss = 0.5 * loss_fn(net(x), x)
        with backpack(BatchL2Grad()):
            loss.backward()
        [p.batch_l2 for p in net.parameters()]
        net.zero_grad(set_to_none=True)

    return run


def opacus_method() -> Callable[[nn.Module, Tensor], None] | None:
    try:
        from opacus import GradSampleModule
    except ImportError:
        return None
    wrapped: dict[int, nn.Module] = {}

    def run(model: nn.Module, x: Tensor) -> None:
        if id(model) not in wrapped:  # on a copy: Opacus leaves its hooks on the module it wraps
            wrapped[id(model)] = GradSampleModule(_Forward(copy.deepcopy(model)), loss_reduction="sum")
        module = wrapped[id(model)].train()  # Opacus captures activations in train mode only
        (-module(x).sum()).backward()
        [p.grad_sample.flatten(1).pow(2).sum(1) for p in module.parameters() if p.requires_grad]
        module.zero_grad(set_to_none=True)

    return run


class _Forward(nn.Module):
    """``forward = log_likelihood``, which is what Opacus differentiates."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.log_likelihood(x)


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _status_kib(field: str) -> int:
    """A field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in KiB."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1])


def _start_peak() -> int:
    """Prepare to measure a peak from here: memory the allocator keeps free is given back (glibc)
    and the peak resident size is reset to the current one (Linux), so that the rise counts what
    the measured call needs, not what the process happened to hold free before. Returns KiB now."""
    with contextlib.suppress(OSError):  # not glibc: memory held free may serve the call (understated)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:  # without a reset, the peak would be the parent's
        f.write("5")
    return _status_kib("VmRSS")


def peak_rise(fn: Callable[[], None]) -> float:
    """MiB by which ``fn`` raises peak resident memory, measured in a forked child."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            start = _start_peak()
            fn()
            rise = (_status_kib("VmHWM") - start) / 1024
        except Exception:
            rise = float("nan")
        os.write(write, str(rise).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    value = float(os.read(read, 64).decode())
    os.close(read)
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    methods: dict[str, Callable[[nn.Module, Tensor], None] | None] = {
        "fimcb hooks": fimcb_method("hooks"),
        "fimcb func": fimcb_method("func"),
        "fimcb loop": fimcb_method("loop"),
        "BackPACK BatchL2Grad": backpack_method(),
        "Opacus GradSampleModule": opacus_method(),
    }
    lines = [
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); time and peak-memory ratios to one "
        "batched forward+backward (median of interleaved repeats)",
        "",
        "| model | batch | baseline ms | " + " | ".join(f"{m} time / mem" for m in methods) + " |",
        "|---|---|---|" + "---|" * len(methods),
    ]
    print("\n".join(lines), flush=True)
    for name, (model, shape) in models().items():
        model.eval()
        for batch in args.batches:
            x = torch.rand(batch, *shape)
            base = partial(baseline, model, x)
            base()
            base_mem = peak_rise(base)
            cells = []
            base_times: list[float] = []
            for method in methods.values():
                if method is None:
                    cells.append("not installed")
                    continue
                run = partial(method, model, x)
                try:
                    run()
                except Exception as err:  # an outside tool that does not support the model
                    cells.append(f"n/a ({type(err).__name__})")
                    continue
                ratios = []
                for _ in range(args.repeats):
                    b = timed(base)
                    base_times.append(b)
                    ratios.append(timed(run) / b)
                cells.append(
                    f"{statistics.median(ratios):.2f}× / {peak_rise(run) / max(base_mem, 1e-3):.2f}×"
                )
            row = (
                f"| {name} | {batch} | {1000 * statistics.median(base_times):.1f} | "
                + " | ".join(cells)
                + " |"
            )
            lines.append(row)
            print(row, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
