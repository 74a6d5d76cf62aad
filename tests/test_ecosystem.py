"""Models fimcb did not write, in float64 and float32, against a naive per-sample loop: the patterns that
escape module hooks and tiny random-init configs of transformers, diffusers, zuko and normflows."""

from __future__ import annotations

import importlib.util
import logging
import os

import pytest
import torch
from ecosystem_models import LIBRARIES, PATTERNS, idioms
from toy_models import naive_layer_norms

from fimcb import per_sample_layer_norms

CASES = {**PATTERNS, **LIBRARIES}


def _build(name: str, dtype: torch.dtype):
    library = CASES[name].library
    if library is not None and importlib.util.find_spec(library) is None:
        if os.environ.get("FIMCB_REQUIRE_EXTRAS"):
            pytest.fail(f"{library} is not installed (pip install -e '.[test]')")
        pytest.skip(f"{library} is not installed")
    return CASES[name].build(dtype)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest deviation of a layer norm, relative to the largest layer norm of the same sample."""
    scale = want.abs().amax(dim=1, keepdim=True).clamp_min(1e-300)
    return float(((got - want).abs() / scale).max())


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("group_size", [1, 2])
def test_hooks_engine_is_exact_in_float64_without_fallback(
    name: str, group_size: int, caplog: pytest.LogCaptureFixture
) -> None:
    model, x = _build(name, torch.float64)
    want, want_ll = naive_layer_norms(model, x, group_size)
    with caplog.at_level(logging.INFO, logger="fimcb"):
        for _ in range(3):  # the first batch runs tracked and checked; the next ones as the check decided
            norms = per_sample_layer_norms(model, x, engine="hooks", group_size=group_size)
            assert _relative_error(norms.values, want) <= 1e-10
            torch.testing.assert_close(norms.log_likelihood, want_ll, rtol=1e-12, atol=1e-12)
    assert "fallback" not in caplog.text and "torch.func for" not in caplog.text, caplog.text


@pytest.mark.parametrize("name", list(CASES))
def test_hooks_engine_is_exact_in_float32(name: str) -> None:
    model, x = _build(name, torch.float32)
    want, _ = naive_layer_norms(model, x)
    for _ in range(2):
        assert _relative_error(per_sample_layer_norms(model, x, engine="hooks").values, want) <= 1e-4


@pytest.mark.parametrize("name", list(idioms()))
def test_hooks_engine_is_exact_on_other_layers_and_idioms(name: str) -> None:
    """Layers without a rule of ours (attention, recurrent, parametrised, bag and 3-d layers) and parameters
    used through torch functions: exact in float64, by whichever route serves them."""
    model, x = idioms()[name]
    model = model.double().eval()
    x = x.double() if x.is_floating_point() else x
    want, want_ll = naive_layer_norms(model, x)
    for _ in range(3):
        norms = per_sample_layer_norms(model, x, engine="hooks")
        assert _relative_error(norms.values, want) <= 1e-10
        torch.testing.assert_close(norms.log_likelihood, want_ll, rtol=1e-12, atol=1e-12)
