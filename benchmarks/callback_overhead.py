"""Wall-time cost of FIMNormCallback on a training run: the same config with and without it.

    OMP_NUM_THREADS=1 python benchmarks/callback_overhead.py --config configs/glow_fashionmnist.yaml \\
        -- --data.root ../shared/data

Runs ``train.py fit`` twice in subprocesses (the second with ``--trainer.callbacks=[]``), prints
both wall times and their ratio, the callback's own account of its seconds (tracking vs the
end-of-training evaluation) and the OOD table from the run's output.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(config: str, extra: list[str], with_callback: bool) -> tuple[float, str]:
    with tempfile.TemporaryDirectory() as out:
        command = [
            sys.executable,
            str(ROOT / "train.py"),
            "fit",
            "--config",
            config,
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.enable_checkpointing",
            "false",
            "--trainer.logger.init_args.save_dir",
            out,
            "--trainer.default_root_dir",
            out,
            *extra,
        ]
        if not with_callback:
            command.append("--trainer.callbacks=[]")
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
        return time.perf_counter() - start, done.stdout + done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/glow_fashionmnist.yaml")
    parser.add_argument("extra", nargs="*", help="more train.py arguments, after --")
    args = parser.parse_args()
    without, _ = run(args.config, args.extra, with_callback=False)
    with_cb, log = run(args.config, args.extra, with_callback=True)
    print(f"config: {args.config} {' '.join(args.extra)}")
    print(f"without callback: {without:.1f} s; with callback: {with_cb:.1f} s; ratio {with_cb / without:.3f}")
    account = re.search(r"FIMNormCallback took .*", log)
    print(account.group(0) if account else "(no account line in the output)")
    table = re.search(r"FIM-norm OOD detection.*?\n(.*?)\nwritten to", log, re.S)
    print(table.group(1) if table else "(no OOD table in the output)")


if __name__ == "__main__":
    main()
