"""The hooks engine's later batches reduce each layer while the backward pass runs (``_Stream``): the same
norms as a naive per-sample loop, whatever the graph looks like, and the layers' outputs and inputs are
not held beyond what the model's own backward holds."""

from __future__ import annotations

import importlib.util
import logging
import os
import weakref

import pytest
import torch
from ecosystem_models import LIBRARIES, PATTERNS
from torch import Tensor, nn
from toy_models import naive_layer_norms

import fimcb.engine.capture as capture_module
from fimcb import per_sample_layer_norms
from fimcb.engine.api import trainable_parameters
from fimcb.engine.capture import _Stream, capture
from fimcb.engine.factors import Factor
from fimcb.engine.rules import Call, Rule, register_rule
from fimcb.engine.rules.linear import linear_factors
from fimcb.engine.types import NormRequest
from fimcb.metrics import Identity

# The first batch runs tracked and checked, the second checks the lighter capture: streaming starts at
# the third.
FIRST_STREAMED = 3


@pytest.fixture(autouse=True)
def _stream_every_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """These models are tiny: stream their layers whatever they hold."""
    monkeypatch.setattr(capture_module, "STREAM_MIN_BYTES", 0)


class SometimesFailingLinear(nn.Linear):
    """A linear layer whose rule works until told to fail (``fail``)."""

    fail = False


@register_rule(SometimesFailingLinear)
class _SometimesFailingRule(Rule):
    reads_outputs = False

    def factors(self, call: Call) -> dict[str, Factor]:
        if call.module.fail:
            raise RuntimeError("failing now")
        return linear_factors(call.args[0], call.grads[0], "weight", "bias")


class Branchy(nn.Module):
    """Two layers on the data (nothing autograd is asked for lies behind them), an in-place ReLU on a layer's
    output, a layer called twice, one whose output the log-likelihood ignores, a layer whose rule may fail
    and a layer norm."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(6, 8)
        self.shared = nn.Linear(8, 8)
        self.ignored = nn.Linear(6, 3)
        self.flaky = SometimesFailingLinear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)

    def log_likelihood(self, x: Tensor) -> Tensor:
        h = torch.relu_(self.a(x)) + self.b(x).tanh()
        h = self.shared(self.shared(h).tanh())
        self.ignored(x)
        h = self.norm(self.flaky(h).tanh())
        return -0.5 * self.head(h).pow(2).sum(1)


def _identity_norms(request: NormRequest):
    def reduce(name: str, factor: Factor) -> Tensor:
        return factor.squared_norms(name, Identity(), request.params[name].shape)

    return reduce


def test_streamed_batches_match_the_naive_loop_and_stream_every_layer_called_once() -> None:
    torch.manual_seed(0)
    model = Branchy().double()
    x = torch.randn(5, 6, dtype=torch.float64)
    want, _ = naive_layer_norms(model, x)
    for _ in range(FIRST_STREAMED):
        got = per_sample_layer_norms(model, x, engine="hooks").values
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    params = trainable_parameters(model)
    request = NormRequest(model, model.log_likelihood, params, Identity())
    with torch.enable_grad():
        captured = capture(request, x, _identity_norms(request))
    once = {n for n in params if not n.startswith("shared.")}
    assert set(captured.norms) == once and set(captured.factors) == set(params) - once
    for i, name in enumerate(params):
        got = (
            captured.norms[name]
            if name in captured.norms
            else _identity_norms(request)(name, captured.factors[name])
        )
        torch.testing.assert_close(got, want[:, i], rtol=1e-10, atol=1e-12)


def test_a_rule_failing_during_the_backward_leaves_its_layer_to_the_usual_route() -> None:
    torch.manual_seed(1)
    model = Branchy().double()
    x = torch.randn(4, 6, dtype=torch.float64)
    want, _ = naive_layer_norms(model, x)
    for _ in range(FIRST_STREAMED - 1):
        per_sample_layer_norms(model, x, engine="hooks")
    model.flaky.fail = True  # from now on, module-local torch.func serves it after the backward
    try:
        for _ in range(2):
            got = per_sample_layer_norms(model, x, engine="hooks").values
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    finally:
        model.flaky.fail = False


@pytest.mark.parametrize("group_size", [1, 3])
def test_a_layers_output_is_not_held_once_the_model_is_done_with_it(group_size: int) -> None:
    """``tanh`` keeps its result, not its input, for the backward: a plain forward frees the linear layer's
    output as soon as ``tanh`` has run, and so must a streamed capture."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second = nn.Linear(4, 16), nn.Linear(16, 2)
            self.alive: list[bool] = []

        def log_likelihood(self, x: Tensor) -> Tensor:
            h = self.first(x)
            ref = weakref.ref(h)
            y = torch.tanh(h)
            del h
            self.alive.append(ref() is not None)
            return -self.second(y).pow(2).sum(1)

    torch.manual_seed(2)
    model = Model()
    x = torch.randn(6, 4)
    want, _ = naive_layer_norms(model, x, group_size)
    for _ in range(FIRST_STREAMED + 1):
        got = per_sample_layer_norms(model, x, engine="hooks", group_size=group_size).values
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # the naive loop's forwards hold nothing; the first engine batches hold what they check
    assert model.alive[-2:] == [False, False], model.alive


def test_a_graph_that_changes_between_batches_is_walked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plan remembers which layers autograd must be asked for; when a later batch's graph leaves another
    one unreached (the first layer's output is skipped, so nothing asked-for lies behind the second), the
    batch is captured again after a new walk of the graph, exactly."""

    class Skipping(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second, self.head = nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 2)
            self.skip = False

        def log_likelihood(self, x: Tensor) -> Tensor:
            h = self.first(x).tanh()
            return -self.head(self.second(x if self.skip else h).tanh()).pow(2).sum(1)

    walks = []
    walk = _Stream._walk
    monkeypatch.setattr(_Stream, "_walk", lambda self, *a: walks.append(1) or walk(self, *a))
    torch.manual_seed(3)
    model = Skipping().double()
    x = torch.randn(4, 5, dtype=torch.float64)
    for skip, calls, walked in ((False, FIRST_STREAMED + 1, 1), (True, 2, 2)):
        model.skip = skip
        want, _ = naive_layer_norms(model, x)
        for _ in range(calls):
            got = per_sample_layer_norms(model, x, engine="hooks").values
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        assert len(walks) == walked


class ViewThenInPlace(nn.Module):
    """``nn.Linear`` on ``[B, T, d]`` returns a view of its result; the model then changes it in place (from
    the first batch, or from when ``later`` is set), which cuts the view's own node off the graph."""

    def __init__(self, first_in_place: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)
        self.in_place = first_in_place

    def log_likelihood(self, x: Tensor) -> Tensor:
        h = self.a(x)
        if self.in_place:
            h *= 2.0
            h.relu_()
        else:
            h = 2.0 * torch.relu(h)
        return -self.b(h).pow(2).sum((1, 2))


@pytest.mark.parametrize("from_the_start", [True, False])
def test_an_in_place_change_of_a_layers_view_output_keeps_its_gradient(
    from_the_start: bool, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(4)
    model = ViewThenInPlace(from_the_start).double()
    x = torch.randn(5, 6, 3, dtype=torch.float64)
    want, _ = naive_layer_norms(model, x)
    with caplog.at_level(logging.INFO, logger="fimcb"):
        for _ in range(FIRST_STREAMED):
            torch.testing.assert_close(per_sample_layer_norms(model, x, engine="hooks").values, want)
        model.in_place = True
        for _ in range(2):
            got = per_sample_layer_norms(model, x, engine="hooks").values
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert "fallback" not in caplog.text, caplog.text


def test_a_frozen_bias_beside_a_trained_weight() -> None:
    torch.manual_seed(5)
    model = Branchy().double()
    model.head.bias.requires_grad_(False)
    model.a.weight.requires_grad_(False)
    x = torch.randn(4, 6, dtype=torch.float64)
    want, _ = naive_layer_norms(model, x)
    for _ in range(FIRST_STREAMED + 1):
        got = per_sample_layer_norms(model, x, engine="hooks").values
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list({**PATTERNS, **LIBRARIES}))
def test_every_ecosystem_model_streamed_matches_the_naive_loop(name: str) -> None:
    case = {**PATTERNS, **LIBRARIES}[name]
    if case.library is not None and importlib.util.find_spec(case.library) is None:
        if os.environ.get("FIMCB_REQUIRE_EXTRAS"):
            pytest.fail(f"{case.library} is not installed (pip install -e '.[test]')")
        pytest.skip(f"{case.library} is not installed")
    model, x = case.build(torch.float64)
    want, _ = naive_layer_norms(model, x)
    for _ in range(FIRST_STREAMED + 1):
        got = per_sample_layer_norms(model, x, engine="hooks").values
        scale = want.abs().amax(dim=1, keepdim=True).clamp_min(1e-300)
        assert float(((got - want).abs() / scale).max()) <= 1e-10
