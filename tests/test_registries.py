"""Every registry (metrics, detectors, layer rules, unrolled forwards, op rules, dashboards) refuses to
replace an entry silently: registering the same class again is harmless, another class needs
``overwrite=True``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from fimcb.core.metric import METRICS, Identity, register_metric
from fimcb.detectors import DETECTORS, TotalNorm, register_detector
from fimcb.engine.rules import RULES, UNROLLED, register_rule, register_unrolled
from fimcb.engine.rules.ops import OP_RULES, register_op_rule
from fimcb.lightning import dashboards
from fimcb.lightning.dashboards import register_dashboard


class OtherIdentity(Identity):
    """Another metric under the identity's name."""


class OtherTotalNorm(TotalNorm):
    """Another detector under ``total_norm``."""


def _class_of(registry: dict[Any, Any], key: Any) -> Any:
    value = registry[key]
    return value if isinstance(value, type) else type(value)


def _rule_class(registry: dict[Any, Any], key: Any) -> type:
    return type("Other" + _class_of(registry, key).__name__, (_class_of(registry, key),), {})


# registry, key, register(cls, overwrite), a class of another name for that key
CASES: dict[str, tuple[dict[Any, Any], Any, Callable[[Any, bool], Any], Callable[[], type]]] = {
    "metric": (METRICS, "identity", lambda c, o: register_metric(c, overwrite=o), lambda: OtherIdentity),
    "detector": (
        DETECTORS,
        "total_norm",
        lambda c, o: register_detector(c, overwrite=o),
        lambda: OtherTotalNorm,
    ),
    "layer rule": (
        RULES,
        nn.Linear,
        lambda c, o: register_rule(nn.Linear, overwrite=o)(c),
        lambda: _rule_class(RULES, nn.Linear),
    ),
    "unrolled forward": (
        UNROLLED,
        nn.LSTM,
        lambda c, o: register_unrolled(nn.LSTM, overwrite=o)(c),
        lambda: _rule_class(UNROLLED, nn.LSTM),
    ),
    "op rule": (
        OP_RULES,
        torch.matmul,
        lambda c, o: register_op_rule(torch.matmul, overwrite=o)(c),
        lambda: _rule_class(OP_RULES, torch.matmul),
    ),
    "dashboard": (
        dashboards._REGISTRY,
        "WandbLogger",
        lambda c, o: register_dashboard("WandbLogger", c, overwrite=o),
        lambda: type("OtherDashboard", (dashboards.WandbDashboard,), {}),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_registries_refuse_silent_overwrites(case: str) -> None:
    registry, key, register, other = CASES[case]
    saved = registry[key]
    original = _class_of(registry, key)
    try:
        register(original, False)  # the same class again: harmless
        assert _class_of(registry, key) is original
        replacement = other()
        with pytest.raises(ValueError, match=r"already registered.*overwrite=True"):
            register(replacement, False)
        assert _class_of(registry, key) is original  # refused: nothing changed
        register(replacement, True)
        assert _class_of(registry, key) is replacement
    finally:
        registry[key] = saved


def test_a_refused_registration_under_several_keys_changes_none_of_them() -> None:
    class Other(type(OP_RULES[torch.matmul])):  # type: ignore[misc]
        pass

    saved = dict(OP_RULES)
    try:
        free = torch.special.xlog1py  # no op rule of ours: the first key is free, the second is taken
        assert free not in OP_RULES
        with pytest.raises(ValueError, match="already registered"):
            register_op_rule(free, torch.matmul)(Other)
        assert free not in OP_RULES and type(OP_RULES[torch.matmul]) is not Other
    finally:
        OP_RULES.clear()
        OP_RULES.update(saved)
