"""The protocol of the grokking seed study (``benchmarks/grokking.py``) on series with known answers."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "grokking.py"
spec = importlib.util.spec_from_file_location("grokking_analysis", SCRIPT)
assert spec is not None and spec.loader is not None
grokking = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = grokking  # dataclasses look their module up
spec.loader.exec_module(grokking)

STEPS = pd.Index(range(0, 2050, 50))


def test_events_of_a_signal_that_rises_then_falls() -> None:
    # flat at 1 until 500, up to 3 at 800, then down linearly to 0.5 at 1800, flat after
    values = np.interp(STEPS, [0, 500, 800, 1800, 2000], [1, 1, 3, 0.5, 0.5])
    found = grokking.events(pd.Series(values, index=STEPS), start=200, window=2)
    assert found["falls"] == 1.0 and found["turn"] == 800
    assert found["10%"] == 900  # 3 - 0.1 * 2.5 = 2.75, reached 100 steps after the peak
    assert found["50%"] == 1300  # 1.75


def test_events_of_a_rising_signal_and_of_too_short_a_window() -> None:
    values = np.interp(STEPS, [0, 1000, 1400, 2000], [0.0, 0.0, 1.0, 1.0])
    found = grokking.events(pd.Series(values, index=STEPS), start=0, window=5)
    assert found["falls"] == 0.0 and found["10%"] == 1050 and found["50%"] == 1200
    short = grokking.events(pd.Series(values, index=STEPS), start=1950, window=5)
    assert all(math.isnan(v) for v in short.values())


def test_on_grid_averages_the_steps_that_end_at_each_grid_step() -> None:
    series = pd.Series([1.0, 3.0, 10.0], index=[45, 50, 55])
    assert grokking.on_grid(series, pd.Index([50, 100])).tolist() == [2.0, 10.0]


@pytest.mark.parametrize("relative", [False, True])
def test_the_alarm_uses_only_the_past_and_resets_when_training_accuracy_drops(relative: bool) -> None:
    values = pd.Series(np.interp(STEPS, [0, 1000, 2000], [10.0, 10.0, 5.0]), index=STEPS)
    settled = pd.Series(1.0, index=STEPS)
    delta = 0.09 if relative else 0.9  # a fall of more than 0.9 from 10: at 1200, 200 steps into the fall
    assert grokking.first_alarm(values, settled, True, delta, relative) == 1200
    unsettled = settled.where(STEPS != 1150, 0.5)  # the running extreme restarts at 1200 (value 9)
    assert grokking.first_alarm(values, unsettled, True, delta, relative) == 1400
    assert math.isnan(grokking.first_alarm(values, settled, False, delta, relative))
    # the future does not matter: cutting the series after the alarm gives the same step
    assert grokking.first_alarm(values[:26], settled[:26], True, delta, relative) == 1200
