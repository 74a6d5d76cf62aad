"""Does the FIM-norm move before validation accuracy jumps? Milestones and a figure of a grokking run.

    python train.py fit --config configs/grokking_modadd.yaml
    python benchmarks/grokking.py runs/grokking_modadd/version_0 --out docs/figures/grokking.png

Reads the run's ``metrics.csv`` (CSVLogger: accuracy and NLL per split) and ``history/`` (per-sample
FIM-norms of the training and validation probes) and prints, for each signal, when it had covered
10 %, 50 % and 90 % of its change during the final transition: from ``--window`` events after the
step after which training accuracy stays above 95 % (after memorisation and the last loss spike,
which disturb every signal) to the end. Every signal is smoothed by the same trailing (causal)
median over ``--window`` events, so no signal sees its future. The change of a rising signal
(accuracy) is counted from its minimum in that window, that of a falling one (NLL, FIM-norms,
which may first rise) from its maximum; the step of that extreme is printed too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from fimcb.core.norms import LOG_FLOOR
from fimcb.run.history import load_history
from fimcb.viz.figures import training_dynamics

LEVELS = (0.1, 0.5, 0.9)


def logged(metrics: pd.DataFrame, column: str) -> pd.Series:
    """One logged column as a series over global steps (CSVLogger writes step = global step - 1)."""
    series = metrics[["step", column]].dropna().groupby("step")[column].mean()
    series.index = series.index + 1
    return series


def fim_median(history_dir: Path) -> pd.DataFrame:
    """Median over each probe of the log total FIM-norm and of each layer's log norm, per split and step."""
    frame = load_history(history_dir).to_dataframe()
    layers = [c for c in frame.columns if c.startswith("layer/")]
    logs = np.log(frame[["total", *layers]].clip(lower=LOG_FLOOR))
    logs[["split", "step"]] = frame[["split", "step"]]
    return logs.groupby(["split", "step"]).median()


def milestones(series: pd.Series, start: int, window: int, falls: bool) -> dict[str, float]:
    """Steps at which the smoothed ``series`` had covered each of ``LEVELS`` of its change after
    ``start``: from its extreme opposite the final value (max for a fall, min for a rise) to the final
    value; ``extreme_step`` is where that extreme is. The extreme is sought from ``window`` events
    after ``start`` on, when the smoothing window no longer holds values from before it."""
    smooth = series.rolling(window, min_periods=1).median()
    after = smooth[smooth.index >= start].iloc[window:]
    extreme_step = after.idxmax() if falls else after.idxmin()
    extreme, final = after[extreme_step], after.iloc[-1]
    tail = after[after.index >= extreme_step]
    out = {"extreme_step": int(extreme_step)}
    for level in LEVELS:
        target = extreme + level * (final - extreme)
        reached = tail[tail <= target] if falls else tail[tail >= target]
        out[f"{round(level * 100)}%"] = int(reached.index[0]) if len(reached) else float("nan")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path, help="run directory (with metrics.csv and history/)")
    parser.add_argument("--out", type=Path, help="write the figure here (PNG)")
    parser.add_argument("--json", type=Path, help="write the milestones here")
    parser.add_argument("--window", type=int, default=5, help="events in the trailing median")
    parser.add_argument("--log-steps", action="store_true", help="a logarithmic step axis in the figure")
    args = parser.parse_args()

    metrics = pd.read_csv(args.run / "metrics.csv")
    train_acc = logged(metrics, "train/acc_step")
    unsettled = train_acc[train_acc < 0.95]
    after = train_acc.index[train_acc.index > unsettled.index.max()] if len(unsettled) else train_acc.index
    if len(after) <= args.window:
        raise SystemExit(
            f"{args.run}: training accuracy stays above 95 % for at most {args.window} logged steps "
            "before the run ends; train longer (the config's max_steps) before looking for grokking"
        )
    settled = int(after[0])
    fim = fim_median(args.run / "history")
    signals = {
        "val accuracy (rise)": (logged(metrics, "val/acc"), False),
        "val NLL (fall)": (logged(metrics, "val/nll"), True),
    }
    for split in ("val", "train_probe"):
        for column in fim.columns:
            label = "total" if column == "total" else column.removeprefix("layer/")
            signals[f"{split} log FIM-norm {label} (fall)"] = (fim.loc[split][column], True)

    rows = {name: milestones(s, settled, args.window, falls) for name, (s, falls) in signals.items()}
    print(f"training accuracy >= 95% from step {settled} on\n")
    header = f"{'signal':<62}{'extreme':>9}" + "".join(f"{f'{round(v * 100)}%':>8}" for v in LEVELS)
    print(header + "\n" + "-" * len(header))
    for name, row in rows.items():
        cells = "".join(f"{row[f'{round(v * 100)}%']:>8}" for v in LEVELS)
        print(f"{name:<62}{row['extreme_step']:>9}{cells}")
    if args.json:
        args.json.write_text(json.dumps({"settled": settled, "milestones": rows}, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        figure = training_dynamics(
            load_history(args.run / "history"), args.run / "metrics.csv", args.log_steps
        )
        figure.savefig(args.out, dpi=120)
        print(f"\nfigure written to {args.out}")


if __name__ == "__main__":
    main()
