"""Does the FIM-norm move before validation accuracy jumps, over seeds, and earlier than the baselines?

    bash benchmarks/grokking_runs.sh configs/grokking_modadd.yaml 0 1 2 3 4 5 6 7
    bash benchmarks/grokking_runs.sh configs/grokking_modsub.yaml 0 1 2 3 4 5 6 7 8 9
    python benchmarks/grokking.py runs/grokking_modadd/seed_* runs/grokking_modsub/seed_* \\
        --out docs/figures/grokking_seeds.png --json grokking.json

Implements the protocol of ``docs/grokking.md`` (fixed before the runs). Runs are grouped into
settings by their parent folder. Every signal is put on the 50-step grid of the tracking events (a
signal logged more often is averaged over the 50 steps ending at each grid step) and smoothed by a
trailing median over ``--window`` events. From the step at which training accuracy stays >= 95 %
(``settled``), each signal's turn (its extreme opposite its final value) and its 10 % / 50 % points
are found, and each is compared with validation accuracy's 10 % and 50 % points: the lead is the
target's step minus the signal's (positive: the signal moves first). The table gives, per setting and
signal, the median lead [min, max] and how many seeds lead. The online alarm (a training-only signal
moving by more than delta from its running extreme since training accuracy settled) is calibrated on
the first setting (the smallest delta with no alarm more than ``--early`` steps before validation
accuracy's 10 % point) and reported unchanged on every setting.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd

from fimcb.core.norms import LOG_FLOOR
from fimcb.run.history import load_history

matplotlib.use("Agg")
import matplotlib.pyplot as plt

GRID = 50
SETTLED = 0.95
ACC = "val accuracy"
FIM_TRAIN = "train-probe FIM-norm"
#: Training-only signals besides the FIM-norm, as logged by the model and ``fimcb.TrainingSignals``.
BASELINES = {
    "train loss": "train/nll_step",
    "weight norm": "signals/weight_norm",
    "head weight norm": "signals/weight_norm/head",
    "grad norm": "signals/grad_norm",
}
#: Signals that need held-out data, shown for reference.
HELD_OUT = {"val NLL": "val/nll"}
#: The signals of the online alarm (training-only); FIM-norms are logs, so moves are differences.
ALARM_SIGNALS = (FIM_TRAIN, *BASELINES)
#: Steps shown around validation accuracy's 50 % point in the aligned figure.
SPAN = (-3000, 2000)
#: The signals of the aligned figure.
FIGURE_SIGNALS = (ACC, FIM_TRAIN, "val-probe FIM-norm", *BASELINES)


def logged(metrics: pd.DataFrame, column: str) -> pd.Series:
    """One logged column over global steps (a training step logs the step count before its update;
    validation logs after it: both are shifted to the number of updates done, as the history is)."""
    if column not in metrics:
        raise SystemExit(f"metrics.csv has no column {column!r}; was the run made with its config?")
    series = metrics[["step", column]].dropna().groupby("step")[column].mean()
    series.index = series.index + 1
    return series


def on_grid(series: pd.Series, grid: pd.Index) -> pd.Series:
    """The mean of ``series`` over the ``GRID`` steps that end at each grid step (causal)."""
    blocks = np.ceil(series.index.to_numpy() / GRID).astype(int) * GRID
    return series.groupby(blocks).mean().reindex(grid)


def fim_medians(history_dir: Path) -> pd.DataFrame:
    """Median over each probe of the log total FIM-norm and of each layer's, by (split, step)."""
    frame = load_history(history_dir).to_dataframe()
    layers = [c for c in frame.columns if c.startswith("layer/")]
    logs = np.log(frame[["total", *layers]].clip(lower=LOG_FLOOR))
    logs[["split", "step"]] = frame[["split", "step"]]
    return logs.groupby(["split", "step"]).median()


class Unsettled(ValueError):
    """A run whose training accuracy is not above ``SETTLED`` at its end: it has no transition window."""


@dataclass
class Run:
    """One run on the grid: smoothed signals (columns), smoothed training accuracy, settled step."""

    name: str
    signals: pd.DataFrame
    train_acc: pd.Series
    settled: int


def load_run(path: Path, window: int) -> Run:
    metrics = pd.read_csv(path / "metrics.csv")
    fim = fim_medians(path / "history")
    val_fim = fim.loc["val"]
    grid = val_fim.index
    columns: dict[str, pd.Series] = {ACC: logged(metrics, "val/acc").reindex(grid)}
    columns.update({name: logged(metrics, c).reindex(grid) for name, c in HELD_OUT.items()})
    columns.update({name: on_grid(logged(metrics, c), grid) for name, c in BASELINES.items()})
    columns[FIM_TRAIN] = fim.loc["train_probe"]["total"].reindex(grid)
    columns["val-probe FIM-norm"] = val_fim["total"]
    for layer in (c for c in fim.columns if c != "total"):
        columns[f"{FIM_TRAIN} {layer.removeprefix('layer/')}"] = fim.loc["train_probe"][layer].reindex(grid)
    signals = pd.DataFrame(columns).rolling(window, min_periods=1).median()
    raw_acc = logged(metrics, "train/acc_step")
    unsettled = raw_acc[raw_acc < SETTLED]
    if len(unsettled) and unsettled.index.max() == raw_acc.index.max():
        raise Unsettled(f"{path}: training accuracy is below {SETTLED:.0%} at the end of the run")
    settled_raw = (
        raw_acc.index[raw_acc.index > unsettled.index.max()][0] if len(unsettled) else raw_acc.index[0]
    )
    settled = int(np.ceil(settled_raw / GRID) * GRID)
    train_acc = on_grid(raw_acc, grid).rolling(window, min_periods=1).median()
    return Run(f"{path.parent.name}/{path.name}", signals, train_acc, settled)


def events(series: pd.Series, start: int, window: int) -> dict[str, float]:
    """The turn and the 10 % / 50 % points of ``series`` in the transition window (``window`` events
    after ``start`` to the end), and whether it falls (its final value below its value at the start)."""
    after = series[series.index >= start].iloc[window:].dropna()
    if len(after) < 2:
        return {"turn": np.nan, "10%": np.nan, "50%": np.nan, "falls": np.nan}
    falls = bool(after.iloc[-1] < after.iloc[0])
    turn = after.idxmax() if falls else after.idxmin()
    extreme, final = after[turn], after.iloc[-1]
    tail = after[after.index >= turn]
    out = {"turn": float(turn), "falls": float(falls)}
    for level in (0.1, 0.5):
        target = extreme + level * (final - extreme)
        reached = tail[tail <= target] if falls else tail[tail >= target]
        out[f"{round(level * 100)}%"] = float(reached.index[0]) if len(reached) else np.nan
    return out


def run_events(run: Run, window: int) -> dict[str, dict[str, float]]:
    return {name: events(run.signals[name], run.settled, window) for name in run.signals.columns}


def first_alarm(signal: pd.Series, train_acc: pd.Series, falls: bool, delta: float, relative: bool) -> float:
    """The first step at which ``signal`` has moved by more than ``delta`` (a fraction of the extreme
    if ``relative``) in its direction from its running extreme since training accuracy last rose to
    ``SETTLED``; NaN if it never does. Only past values are used at each step."""
    extreme = np.nan
    for step, value, acc in zip(signal.index, signal.to_numpy(), train_acc.to_numpy(), strict=True):
        if not acc >= SETTLED or np.isnan(value):
            extreme = np.nan
            continue
        extreme = value if np.isnan(extreme) else (max(extreme, value) if falls else min(extreme, value))
        move = (extreme - value) if falls else (value - extreme)
        if move > delta * (abs(extreme) if relative else 1.0):
            return float(step)
    return np.nan


def relative_moves(signal: str) -> bool:
    """Whether an alarm on ``signal`` measures moves as a fraction of its extreme (a baseline) or as a
    difference (the FIM-norm, a log)."""
    return signal != FIM_TRAIN


def summary(leads: Sequence[float]) -> str:
    """``median [min, max] k/n``: k of the n seeds with a defined lead that lead (> 0)."""
    values = np.asarray([v for v in leads if np.isfinite(v)])
    if not len(values):
        return "—"
    return (
        f"{np.median(values):+6.0f} [{values.min():+6.0f}, {values.max():+6.0f}] "
        f"{int((values > 0).sum())}/{len(values)}"
    )


LEADS: dict[str, tuple[str, str]] = {
    "turn → acc 50%": ("turn", "50%"),
    "10% → acc 10%": ("10%", "10%"),
    "10% → acc 50%": ("10%", "50%"),
}


def lead_table(
    found: list[dict[str, dict[str, float]]], names: Sequence[str]
) -> dict[str, dict[str, list[float]]]:
    """Per signal and comparison, the lead (target step - signal step) of each seed."""
    return {
        name: {
            label: [f[ACC][target] - f[name][event] for f in found]
            for label, (event, target) in LEADS.items()
        }
        for name in names
    }


def print_setting(setting: str, runs: list[Run], found: list[dict[str, dict[str, float]]], table) -> None:
    print(f"\n## {setting}: {len(runs)} seeds")
    for run, f in zip(runs, found, strict=True):
        print(
            f"  {run.name}: settled {run.settled}, val accuracy 10% at {f[ACC]['10%']:.0f}, "
            f"50% at {f[ACC]['50%']:.0f}"
        )
    header = f"{'signal':<58}" + "".join(f"{label:>32}" for label in LEADS)
    print("\nlead in steps (target - signal): median [min, max] seeds leading\n" + header)
    print("-" * len(header))
    for name, row in table.items():
        print(f"{name:<58}" + "".join(f"{summary(row[label]):>32}" for label in LEADS))


def calibrate(
    runs: list[Run], found: list[dict[str, dict[str, float]]], signal: str, early: int
) -> tuple[bool, float]:
    """The direction (majority over seeds) and the smallest delta of ``signal``'s alarm with no alarm
    more than ``early`` steps before validation accuracy's 10 % point on these runs."""
    falls = bool(np.nanmean([f[signal]["falls"] for f in found]) >= 0.5)
    relative = relative_moves(signal)
    for delta in np.geomspace(1e-3, 10.0, 161):
        fired = [first_alarm(r.signals[signal], r.train_acc, falls, delta, relative) for r in runs]
        if all(not (a < f[ACC]["10%"] - early) for a, f in zip(fired, found, strict=True)):
            return falls, float(delta)
    return falls, np.inf


def alarms(groups: dict[str, list[Run]], found: dict[str, list], early: int) -> dict[str, dict[str, object]]:
    """Calibrate each alarm signal on the first setting and report it on every setting."""
    first = next(iter(groups))
    report: dict[str, dict[str, object]] = {}
    print(f"\n## Online alarm: delta calibrated on {first} (no alarm > {early} steps before acc 10%)")
    header = f"{'signal':<24}{'delta':>8}{'setting':>20}{'lead over acc 10%':>32}{'lead over acc 50%':>32}"
    print(header + f"{'false':>7}{'silent':>8}\n" + "-" * (len(header) + 15))
    for signal in ALARM_SIGNALS:
        falls, delta = calibrate(groups[first], found[first], signal, early)
        relative = relative_moves(signal)
        report[signal] = {"falls": falls, "delta": delta, "relative": relative}
        for setting, runs in groups.items():
            fired = [first_alarm(r.signals[signal], r.train_acc, falls, delta, relative) for r in runs]
            acc10 = [f[ACC]["10%"] for f in found[setting]]
            acc50 = [f[ACC]["50%"] for f in found[setting]]
            false = sum(a < t - early for a, t in zip(fired, acc10, strict=True))
            silent = sum(not (a <= t) for a, t in zip(fired, acc50, strict=True))
            lead10 = [t - a for a, t in zip(fired, acc10, strict=True)]
            lead50 = [t - a for a, t in zip(fired, acc50, strict=True)]
            print(
                f"{signal:<24}{delta:>8.3g}{setting:>20}{summary(lead10):>32}{summary(lead50):>32}"
                f"{false:>7}{silent:>8}"
            )
            report[signal][setting] = {"fired": fired, "false": false, "silent": silent}
    return report


def aligned(runs: list[Run], found: list[dict[str, dict[str, float]]], signal: str) -> pd.DataFrame:
    """``signal`` of each run on steps relative to validation accuracy's 50 % point (columns: runs),
    within ``SPAN`` of it, scaled to [0, 1] there; a baseline (which spans orders of magnitude) by its
    log."""
    columns = {}
    for run, f in zip(runs, found, strict=True):
        series = np.log(run.signals[signal]) if signal in BASELINES else run.signals[signal]
        series.index = series.index - f[ACC]["50%"]
        shown = series[(series.index >= SPAN[0]) & (series.index <= SPAN[1])]
        low, high = shown.min(), shown.max()
        columns[run.name] = (shown - low) / (high - low) if high > low else shown * 0.0
    return pd.DataFrame(columns)


def figure(groups: dict[str, list[Run]], found: dict[str, list], path: Path) -> None:
    """Median and interquartile band over seeds of each signal (each seed scaled to [0, 1] in the
    span shown), aligned at validation accuracy's 50 % point; one column per setting."""
    fig, axes = plt.subplots(
        len(FIGURE_SIGNALS),
        len(groups),
        figsize=(4.2 * len(groups), 1.5 * len(FIGURE_SIGNALS)),
        sharex=True,
        squeeze=False,
        layout="constrained",
    )
    for column, (setting, runs) in enumerate(groups.items()):
        for row, signal in enumerate(FIGURE_SIGNALS):
            ax = axes[row, column]
            frame = aligned(runs, found[setting], signal)
            quantiles = frame.quantile([0.25, 0.5, 0.75], axis=1).T
            ax.fill_between(quantiles.index, quantiles[0.25], quantiles[0.75], alpha=0.25, linewidth=0)
            ax.plot(quantiles.index, quantiles[0.5], linewidth=1.4)
            ax.axvline(0, color="grey", linewidth=0.8, linestyle="--")
            ax.set_xlim(*SPAN)
            ax.set_ylim(-0.05, 1.05)
            ax.tick_params(labelsize=7)
            if column == 0:
                label = f"log {signal}" if signal in BASELINES else signal
                ax.set_ylabel(label.replace(" ", "\n", 1), fontsize=7)
            if row == 0:
                ax.set_title(f"{setting} ({len(runs)} seeds)", fontsize=8)
        axes[-1, column].set_xlabel("steps from validation accuracy's 50 % point", fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"\nfigure written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", type=Path, nargs="+", help="run folders (metrics.csv and history/)")
    parser.add_argument("--window", type=int, default=5, help="events in the trailing median")
    parser.add_argument("--early", type=int, default=1000, help="an alarm this much before acc 10%% is false")
    parser.add_argument("--out", type=Path, help="write the aligned figure here (PNG)")
    parser.add_argument("--json", type=Path, help="write every run's events and the alarms here")
    args = parser.parse_args()

    groups: dict[str, list[Run]] = {}
    for path in args.runs:
        try:
            run = load_run(path, args.window)
        except Unsettled as err:  # reported, and left out of every statistic
            print(f"left out: {err}")
            continue
        groups.setdefault(path.parent.name, []).append(run)
    found = {s: [run_events(r, args.window) for r in runs] for s, runs in groups.items()}
    for setting, runs in groups.items():  # validation accuracy does not rise after training settles
        keep = [i for i, f in enumerate(found[setting]) if np.isfinite([f[ACC]["10%"], f[ACC]["50%"]]).all()]
        for i in sorted(set(range(len(runs))) - set(keep)):
            print(f"left out: {runs[i].name}: no rise of validation accuracy after step {runs[i].settled}")
        groups[setting] = [runs[i] for i in keep]
        found[setting] = [found[setting][i] for i in keep]
    for setting, runs in groups.items():
        names = [c for c in runs[0].signals.columns if c != ACC]
        print_setting(setting, runs, found[setting], lead_table(found[setting], names))
    report = alarms(groups, found, args.early)
    if args.json:
        events_by_run = {r.name: f for s in groups for r, f in zip(groups[s], found[s], strict=True)}
        args.json.write_text(json.dumps({"events": events_by_run, "alarms": report}, indent=1, default=str))
    if args.out:
        figure(groups, found, args.out)


if __name__ == "__main__":
    main()
