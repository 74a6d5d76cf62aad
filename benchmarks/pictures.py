"""Cost of the end-of-training pictures against the OOD evaluation they follow, on a finished run.

    OMP_NUM_THREADS=1 python benchmarks/pictures.py runs/zoo/glow/version_0 -- --data.root ../shared/data

Rebuilds the run (last checkpoint), runs the callback's evaluation (``evaluate_ood`` at the
callback's settings), then times each step of the pictures the callback adds after it: the most and
least novel samples with double-backprop saliency, the influence search over the training probe,
and the figures; prints seconds and each step's ratio to the evaluation, all in one process.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from finished_runs import load_run

from fimcb.evaluation.ood import evaluate_ood
from fimcb.viz.figures import png_bytes, run_figures
from fimcb.viz.novel_samples import FILE_NAME, collect_novel_samples, save_novel_samples

T = TypeVar("T")


def timed(seconds: dict[str, float], name: str, work: Callable[[], T]) -> T:
    """``work()``, its wall time recorded in ``seconds[name]``."""
    start = time.perf_counter()
    out = work()
    seconds[name] = time.perf_counter() - start
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("extra", nargs="*", help="train.py overrides, after --")
    args = parser.parse_args()
    run = load_run(args.run, args.extra)
    callback, dm, model = run.callback, run.datamodule, run.model
    loaders = {"test": dm.test_dataloader(), **dm.ood_dataloaders()}
    seconds: dict[str, float] = {}
    result = timed(
        seconds,
        "evaluation",
        lambda: evaluate_ood(
            model,
            dm.val_dataloader(),
            loaders["test"],
            dict(list(loaders.items())[1:]),
            options=callback.options,
        ),
    )
    generator = torch.Generator().manual_seed(0)
    train = dm.train_dataloader().dataset
    picks = torch.randperm(len(train), generator=generator)[: callback.influence_samples].tolist()
    train_x = torch.stack([train[i][0] for i in picks])

    def samples(saliency: bool, train_inputs: torch.Tensor | None) -> dict[str, Any]:
        return collect_novel_samples(
            model, result, loaders, k=callback.n_novel, saliency=saliency, train_inputs=train_inputs
        )

    timed(seconds, "novel samples (inputs only)", lambda: samples(False, None))
    timed(seconds, "novel samples + saliency", lambda: samples(True, None))
    full = timed(seconds, "novel samples + saliency + influence", lambda: samples(True, train_x))
    with tempfile.TemporaryDirectory() as out:
        out_dir = Path(out)
        result.save_scores(out_dir / "ood_scores.pt")
        save_novel_samples(full, out_dir / FILE_NAME)
        figures = timed(seconds, "figures (build)", lambda: run_figures(out_dir))
        timed(seconds, "figures (render PNG)", lambda: [png_bytes(f) for f in figures.values()])
    base = seconds["evaluation"]
    print(f"run: {args.run}; {callback.n_novel} samples per set and side, influence over {len(train_x)}")
    for name, value in seconds.items():
        print(f"{name:<40}{value:>8.1f} s{value / base:>8.2f} x evaluation")


if __name__ == "__main__":
    main()
