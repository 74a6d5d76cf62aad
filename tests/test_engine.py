"""The gradient engine against a naive per-sample ``backward()`` loop, and its guarantees."""

from __future__ import annotations

import logging

import pytest
import torch
from ecosystem_models import Functional
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from torch import nn
from toy_models import (
    BatchStatsNorm,
    ControlFlowModel,
    ConvEnergy,
    CustomLayerModel,
    Gate,
    InPlaceReLU,
    LinearFlow,
    MLPEnergy,
    NoLikelihood,
    OutsideForward,
    RandomConvNet,
    SequenceZoo,
    TiedModel,
    TokenBigram,
    naive_layer_norms,
)

import fimcb.engine.capture as capture_module
import fimcb.engine.factors as factors
import fimcb.engine.rules.conv as conv_rules
from fimcb import ModelProtocolError, per_sample_layer_norms
from fimcb.engine.capture import describe_routes
from fimcb.engine.factors import Dense, Factor, IndexSum, OuterSum
from fimcb.engine.rules import RULES, Call, Rule, register_rule
from fimcb.engine.rules.conv import ConvRoute
from fimcb.engine.rules.norm import SamplesInteractError
from fimcb.metrics import Diagonal, Identity, Metric
from fimcb.models import Glow

ENGINES = ["hooks", "func", "loop", "auto"]


def _cases() -> list[tuple[str, torch.nn.Module, torch.Tensor]]:
    torch.manual_seed(1)
    return [
        ("linear_flow", LinearFlow(6), torch.randn(9, 6)),
        ("conv", ConvEnergy(2), torch.randn(9, 2, 6, 6)),
        ("tokens", TokenBigram(7, 5), torch.randint(0, 7, (9, 9))),
        ("tied", TiedModel(6), torch.randn(9, 6)),
        ("sequence_zoo", SequenceZoo(6, 4), torch.randint(0, 6, (9, 7))),
        ("custom_layer", CustomLayerModel(5), torch.randn(9, 5)),
        (
            "glow",
            Glow(image_shape=(1, 4, 4), num_levels=17, n_levels=2, n_steps=2, hidden_channels=4),
            torch.randint(0, 17, (9, 1, 4, 4)) / 16,
        ),
    ]


def _assert_matches_naive(model, x, engine, group_size=1, chunk_size=None):
    """The engine's first batch of a model (checked, tracked) and its next one agree with a naive loop."""
    ref, ref_ll = naive_layer_norms(model, x, group_size)
    for _ in range(2):
        norms = per_sample_layer_norms(model, x, engine=engine, group_size=group_size, chunk_size=chunk_size)
        assert norms.values.shape == ref.shape
        torch.testing.assert_close(norms.values, ref, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(norms.log_likelihood, ref_ll, rtol=1e-5, atol=1e-5)
    return norms


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", range(len(_cases())), ids=[c[0] for c in _cases()])
@pytest.mark.parametrize("group_size", [1, 3])
def test_engines_equal_naive_loop(case: int, engine: str, group_size: int) -> None:
    _, model, x = _cases()[case]
    _assert_matches_naive(model, x, engine, group_size)


def test_names_follow_named_parameters_and_skip_frozen_and_shared() -> None:
    model = TiedModel(4)
    norms = per_sample_layer_norms(model, torch.randn(3, 4))
    assert norms.names == ("first.weight", "first.bias", "second.bias")
    assert norms.values.shape == (3, 3)


def test_chunking_does_not_change_results() -> None:
    model, x = LinearFlow(5), torch.randn(11, 5)
    full = per_sample_layer_norms(model, x, engine="func", chunk_size=64)
    chunked = per_sample_layer_norms(model, x, engine="func", chunk_size=3)
    torch.testing.assert_close(full.values, chunked.values)


@settings(max_examples=15, deadline=None)
@given(
    dim=st.integers(1, 6),
    widths=st.lists(st.integers(1, 7), min_size=0, max_size=3),
    activation=st.sampled_from(["tanh", "relu", "gelu"]),
    bias=st.booleans(),
    n_groups=st.integers(1, 4),
    group_size=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_random_architectures_match_naive_loop(
    dim, widths, activation, bias, n_groups, group_size, seed
) -> None:
    torch.manual_seed(seed)
    model = MLPEnergy(dim, widths, activation, bias)
    x = torch.randn(n_groups * group_size, dim)
    for engine in ("func", "loop"):
        _assert_matches_naive(model, x, engine, group_size)


layer_specs = st.tuples(
    st.sampled_from(["conv", "convT", "norm"]),
    st.integers(1, 4),  # output channels
    st.integers(1, 3),  # kernel
    st.integers(1, 2),  # stride
    st.integers(0, 2),  # padding
    st.integers(1, 2),  # dilation
)


@settings(max_examples=20, deadline=None)
@example(  # a transposed convolution that empties the feature map: every weight gets a zero gradient
    layers=[("conv", 1, 1, 1, 0, 1), ("conv", 1, 3, 1, 0, 2), ("convT", 1, 2, 1, 1, 1)],
    channels=1,
    side=5,
    bias=False,
    n_groups=1,
    group_size=2,
    seed=0,
)
@given(
    layers=st.lists(layer_specs, min_size=1, max_size=3),
    channels=st.integers(1, 3),
    side=st.integers(5, 8),
    bias=st.booleans(),
    n_groups=st.integers(1, 3),
    group_size=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_hooks_on_random_conv_architectures(layers, channels, side, bias, n_groups, group_size, seed) -> None:
    torch.manual_seed(seed)
    model = RandomConvNet(layers, channels, bias)
    x = torch.randn(n_groups * group_size, channels, side, side)
    try:  # materialise the lazy head; skip shapes that shrink to nothing, on the batch or on one group
        model.log_likelihood(x)  # (PyTorch refuses an empty transposed-convolution output at batch 1 only)
        model.log_likelihood(x[:group_size])
    except RuntimeError:
        assume(False)
    _assert_matches_naive(model, x, "hooks", group_size)


def _grouped_convs(dims: int, groups: int) -> tuple[nn.Module, torch.Tensor]:
    """A grouped (or depthwise) convolution, dilated and circularly padded, then a grouped transposed one
    with output padding, in ``dims`` dimensions."""
    conv = getattr(nn, f"Conv{dims}d")(2 * groups, 2 * groups, 3, padding=2, dilation=2, groups=groups,
                                        padding_mode="circular")  # fmt: skip
    up = getattr(nn, f"ConvTranspose{dims}d")(2 * groups, groups, 3, stride=2, padding=1, output_padding=1,
                                              groups=groups)  # fmt: skip
    model = Functional(
        lambda m, x: m.up(m.conv(x).tanh()).sin().flatten(1).sum(1),
        conv=conv,
        up=up,
    )
    return model.double(), torch.randn(5, 2 * groups, *(4,) * dims, dtype=torch.float64)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2])
def test_grouped_and_3d_convolutions_are_served_by_their_rule(dims: int, groups: int) -> None:
    """Depthwise and grouped convolutions (dilated, circular padding) and grouped transposed ones (output
    padding), in 1, 2 and 3 dimensions: exact against the naive loop, through the conv rules alone, also
    in groups of samples and under a diagonal metric."""
    model, x = _grouped_convs(dims, groups)
    _assert_matches_naive(model, x, "hooks")
    _assert_matches_naive(model, x, "hooks", group_size=5)
    assert describe_routes(model) == f"rule: Conv{dims}d(2), ConvTranspose{dims}d(2)"
    params = dict(model.named_parameters())
    fisher = {n: torch.rand_like(p) + 0.1 for n, p in params.items()}
    want = []
    for row in x:
        grads = torch.autograd.grad(model.log_likelihood(row[None]).sum(), list(params.values()))
        want.append(torch.stack([(g.pow(2) / fisher[n]).sum() for n, g in zip(params, grads, strict=True)]))
    got = per_sample_layer_norms(model, x, engine="hooks", metric=Diagonal(fisher, damping=0.0)).values
    torch.testing.assert_close(got, torch.stack(want))


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("running", [False, True])
def test_instance_norm_is_served_by_its_rule(dims: int, running: bool) -> None:
    """InstanceNorm with affine parameters, by each sample's own statistics or by (non-trivial) running
    ones in eval mode: exact against the naive loop, through its rule."""
    norm = getattr(nn, f"InstanceNorm{dims}d")(3, affine=True, track_running_stats=running)
    if running:
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    model = Functional(
        lambda m, x: m.n(m.c(x)).sin().flatten(1).sum(1), c=getattr(nn, f"Conv{dims}d")(2, 3, 1), n=norm
    )
    x = torch.randn(4, 2, *(5,) * dims)
    _assert_matches_naive(model.eval(), x, "hooks")
    assert describe_routes(model) == f"rule: Conv{dims}d(2), InstanceNorm{dims}d(2)"


class _RampTokens(nn.Module):
    """Positions embedded on ``arange(T)`` by a module, and a ramp ``arange(T) ⊗ w`` from a constant and a
    parameter: constants of ``T`` rows, which shapes alone take for per-sample rows where ``T`` is a
    multiple of the batch size."""

    def __init__(self, vocab: int = 9, dim: int = 4, max_len: int = 16) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.w = nn.Parameter(0.1 * torch.randn(dim))
        self.head = nn.Linear(dim, vocab)

    def log_likelihood(self, tokens: torch.Tensor) -> torch.Tensor:
        inputs = tokens[:, :-1]
        steps = torch.arange(inputs.shape[1])
        ramp = steps[:, None].to(self.w.dtype) * self.w
        h = torch.tanh(self.tok(inputs) + self.pos(steps) + ramp)
        return torch.log_softmax(self.head(h), -1).gather(-1, tokens[:, 1:, None]).squeeze(-1).sum(1)


def test_constants_whose_rows_match_a_later_batch_are_not_taken_for_samples() -> None:
    """Checked on a batch of 6 with 8 positions, then batches of 4, 8 and 2 (8 positions a multiple of
    each): every batch is exact, the plan's shape-based tracking corrected by what the checked batch
    found by data flow (with 8 = B, only a backward check can tell; it falls back, exactly)."""
    torch.manual_seed(0)
    model = _RampTokens().double().eval()
    for batch in (6, 6, 6, 4, 4, 8, 8, 2, 16, 6):
        x = torch.randint(0, 9, (batch, 9))
        want, _ = naive_layer_norms(model, x)
        got = per_sample_layer_norms(model, x, engine="hooks").values
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_auto_falls_back_to_loop_when_vmap_fails(caplog: pytest.LogCaptureFixture) -> None:
    """Data-dependent control flow per sample: the self-check refuses the hooks routes, ``vmap`` cannot run
    the model, so a per-sample loop serves its parameters (also on later batches)."""
    model, x = ControlFlowModel(4), torch.randn(5, 4)
    with caplog.at_level(logging.INFO, logger="fimcb"):
        _assert_matches_naive(model, x, "auto")
        _assert_matches_naive(model, x, "hooks")
    assert "a per-sample loop serves ['linear.weight', 'linear.bias']" in caplog.text
    assert "the func engine cannot handle" in caplog.text
    with pytest.raises(RuntimeError):
        per_sample_layer_norms(model, x, engine="func")


def test_hooks_serve_parameters_used_outside_their_module(caplog: pytest.LogCaptureFixture) -> None:
    """``x @ lin.weight`` beside ``lin(x)``: the matmul's op rule serves the outside use, the Linear's rule
    the inside one, with no fallback."""
    model, x = OutsideForward(4), torch.randn(6, 4)
    with caplog.at_level(logging.INFO, logger="fimcb"):
        _assert_matches_naive(model, x, "hooks")
    assert "op rule: lin.weight" in caplog.text and "torch.func for" not in caplog.text


def test_hooks_handle_outputs_modified_in_place() -> None:
    model, x = InPlaceReLU(), torch.randn(6, 1, 5, 5)
    model.log_likelihood(x)  # materialise the lazy layer
    _assert_matches_naive(model, x, "hooks", group_size=2)


@pytest.mark.parametrize("engine", ENGINES)
def test_batch_statistics_are_refused(engine: str) -> None:
    with pytest.raises(SamplesInteractError, match="samples interact"):
        per_sample_layer_norms(BatchStatsNorm(), torch.randn(4, 3), engine=engine)


def test_hooks_log_which_route_each_layer_takes(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="fimcb"):
        per_sample_layer_norms(CustomLayerModel(3), torch.randn(4, 3), engine="hooks")
        glow = Glow(image_shape=(1, 4, 4), num_levels=17, n_levels=1, n_steps=1, hidden_channels=4)
        per_sample_layer_norms(glow, torch.rand(3, 1, 4, 4), engine="hooks")
    # a layer without a rule is not a unit: its parameters are served where they are used
    assert "rule: Linear(2); op rule: gate.shift; batched pull-back: gate.log_gain" in caplog.text
    assert "rule: ActNorm(2), AffineCoupling" not in caplog.text  # containers own no parameters
    assert "rule: ActNorm(2), Conv2d(2), InvConv1x1(3), TopPrior(2)" in caplog.text


class BrokenRuleLinear(nn.Linear):
    """A linear layer whose rule fails: module-local ``torch.func`` serves it, exactly."""


@register_rule(BrokenRuleLinear)
class _FailingRule(Rule):
    def factors(self, call: Call) -> dict[str, Factor]:
        raise RuntimeError("this rule always fails")


def test_a_failing_rule_falls_back_to_module_local_torch_func(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = Functional(lambda m, x: m.l(x).tanh().sum(1), l=BrokenRuleLinear(3, 2)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    want, _ = naive_layer_norms(model, x)
    with caplog.at_level(logging.INFO, logger="fimcb"):
        got = per_sample_layer_norms(model, x, engine="hooks").values
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert "module-local torch.func: BrokenRuleLinear(2)" in caplog.text


def test_never_touches_grad_mode_or_rng() -> None:
    model = ConvEnergy(1)
    model.train()
    model.norm.eval()  # a mixed state must come back exactly
    flags = [m.training for m in model.modules()]
    x = torch.randn(4, 1, 6, 6)
    state = torch.get_rng_state()
    per_sample_layer_norms(model, x, engine="func")
    per_sample_layer_norms(model, x, engine="loop")
    assert all(p.grad is None for p in model.parameters())
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("engine", ["hooks", "func", "loop"])
def test_works_inside_gradient_free_contexts(context, engine: str) -> None:
    model, x = SequenceZoo(), torch.randint(0, 6, (4, 5))
    expected = per_sample_layer_norms(model, x, engine=engine).values
    with context():
        inside = per_sample_layer_norms(model, x.clone(), engine=engine)
    torch.testing.assert_close(inside.values, expected)


@pytest.mark.parametrize("engine", ["hooks", "func", "loop"])
def test_metric_hook_is_applied(engine: str) -> None:
    class Halved(Metric):
        def squared_norms(self, name, grads):
            return 0.5 * grads.flatten(1).pow(2).sum(1)

    model, x = SequenceZoo(), torch.randint(0, 6, (4, 5))
    torch.testing.assert_close(
        per_sample_layer_norms(model, x, metric=Halved(), engine=engine).values,
        0.5 * per_sample_layer_norms(model, x, engine=engine).values,
    )


@pytest.mark.parametrize("engine", ["hooks", "func", "loop"])
@pytest.mark.parametrize("case", ["conv", "tokens", "sequence_zoo", "custom_layer", "glow"])
@pytest.mark.parametrize("group_size", [1, 3])
def test_diagonal_metric_equals_weighted_naive_gradients(engine: str, case: str, group_size: int) -> None:
    model, x = next((m, x) for name, m, x in _cases() if name == case)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.rand_like(p) + 0.1 for n, p in params.items()}
    metric = Diagonal(fisher, damping=0.01)
    norms = per_sample_layer_norms(model, x, metric=metric, engine=engine, group_size=group_size)
    expected = []
    for start in range(0, len(x), group_size):
        ll = model.eval().log_likelihood(x[start : start + group_size]).sum()
        grads = torch.autograd.grad(ll, list(params.values()))
        expected.append(
            torch.stack([(g.pow(2) / (fisher[n] + 0.01)).sum() for n, g in zip(params, grads, strict=True)])
        )
    torch.testing.assert_close(norms.values, torch.stack(expected), rtol=1e-4, atol=1e-7)


def test_diagonal_metric_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="raise damping"):
        Diagonal({"w": torch.tensor([0.0, 1.0])}, damping=0.0)
    with pytest.raises(KeyError, match="no diagonal Fisher entry"):
        per_sample_layer_norms(LinearFlow(3), torch.randn(2, 3), metric=Diagonal({}), engine="func")


@settings(max_examples=30, deadline=None)
@given(
    g=st.integers(1, 3), t=st.integers(1, 6), p=st.integers(1, 5), q=st.integers(1, 5), rows=st.integers(1, 7)
)
def test_ghost_norms_equal_materialised_norms(g: int, t: int, p: int, q: int, rows: int) -> None:
    outer = OuterSum(torch.randn(g, t, p), torch.randn(g, t, q))
    dense = outer.dense(slice(None)).pow(2).sum((1, 2))
    ghost = outer.ghost_norms()
    if ghost is not None:
        torch.testing.assert_close(ghost, dense)
    torch.testing.assert_close(outer.squared_norms("w", Identity(), torch.Size([p, q])), dense)
    index = IndexSum(torch.randint(0, rows, (g, t)), torch.randn(g, t, q), rows)
    dense = index.dense(slice(None)).pow(2).sum((1, 2))
    torch.testing.assert_close(index.squared_norms("e", Identity(), torch.Size([rows, q])), dense)
    if index.ghost_norms() is not None:
        torch.testing.assert_close(index.ghost_norms(), dense)


def test_log_likelihood_override_reaches_parameters() -> None:
    model = NoLikelihood()
    x = torch.randn(4, 3)
    norms = per_sample_layer_norms(model, x, log_likelihood=lambda b: -model(b).pow(2).sum(1))
    ref = [
        torch.autograd.grad(-model(x[i : i + 1]).pow(2).sum(), model.linear.weight)[0].pow(2).sum()
        for i in range(4)
    ]
    torch.testing.assert_close(norms.values[:, 0], torch.stack(ref))


def test_clear_errors() -> None:
    with pytest.raises(ModelProtocolError, match="log_likelihood"):
        per_sample_layer_norms(NoLikelihood(), torch.randn(2, 3))
    model = LinearFlow(3)
    for engine in ("func", "loop"):
        with pytest.raises(ModelProtocolError, match=r"one value per sample"):
            per_sample_layer_norms(
                model,
                torch.randn(2, 3),
                log_likelihood=lambda b: model.log_likelihood(b).sum(),
                engine=engine,
            )
    with pytest.raises(ModelProtocolError, match=r"one value per sample"):
        per_sample_layer_norms(
            model, torch.randn(2, 3), log_likelihood=lambda b: model.log_likelihood(b).sum()
        )
    with pytest.raises(ValueError, match="no group of 3"):
        per_sample_layer_norms(model, torch.randn(2, 3), group_size=3)
    with pytest.raises(ValueError, match="engine must be one of"):
        per_sample_layer_norms(model, torch.randn(2, 3), engine="fast")  # type: ignore[arg-type]
    frozen = LinearFlow(3).requires_grad_(False)
    with pytest.raises(ModelProtocolError, match="requires grad"):
        per_sample_layer_norms(frozen, torch.randn(2, 3))


def test_remainder_of_groups_is_dropped_with_warning() -> None:
    with pytest.warns(UserWarning, match="dropping the last 1"):
        norms = per_sample_layer_norms(LinearFlow(3), torch.randn(7, 3), group_size=2)
    assert len(norms) == 3


def test_nonfinite_samples_give_nonfinite_rows_not_errors() -> None:
    model = LinearFlow(3)
    x = torch.randn(4, 3)
    x[2] = float("nan")
    norms = per_sample_layer_norms(model, x)
    assert norms.finite_rows().tolist() == [True, True, False, True]


def test_auto_times_the_exact_backends_once_and_keeps_the_faster(caplog: pytest.LogCaptureFixture) -> None:
    model, x = ConvEnergy(1), torch.randn(6, 1, 6, 6)
    with caplog.at_level(logging.INFO, logger="fimcb"):
        first = per_sample_layer_norms(model, x, engine="auto")
        second = per_sample_layer_norms(model, x, engine="auto")
    assert caplog.text.count("engine 'auto' uses") == 1 and "hooks" in caplog.text and "func" in caplog.text
    torch.testing.assert_close(first.values, second.values)


def test_chunk_size_follows_an_estimate_of_memory() -> None:
    """A model too large for a default-size chunk of per-sample gradients gets smaller chunks, down to one
    group at a time; measured on meta tensors, so nothing is allocated."""
    from fimcb.engine.func import DEFAULT_MEMORY_BUDGET, MAX_CHUNK, default_chunk_size

    def params(n_floats: int) -> dict[str, torch.nn.Parameter]:
        return {"w": torch.nn.Parameter(torch.empty(n_floats, device="meta"))}

    assert default_chunk_size(params(1000)) == MAX_CHUNK
    per_group = 4 * 4  # four float32 copies per gradient entry
    middle = DEFAULT_MEMORY_BUDGET // (per_group * 10)
    assert default_chunk_size(params(middle)) == 10
    assert default_chunk_size(params(10**10)) == 1  # 40 GB of gradients per sample: one at a time


def test_a_wrong_rule_is_caught_by_the_self_check_and_its_parameters_fall_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A user's rule that gets every parameter of the model wrong: the first batch's check names them and
    they are served by ``torch.func``; the result is exact."""

    @register_rule(Gate)
    class DoubledRule(Rule):
        def factors(self, call: Call) -> dict[str, Dense]:
            batch = call.grads[0].shape[0]
            return {n: Dense(torch.ones(batch, *p.shape)) for n, p in call.module.named_parameters()}

    class OnlyGate(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate = Gate(5)

        def log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
            h, extra = self.gate(x)
            return -0.5 * h.pow(2).sum(1) + extra

    try:
        model, x = OnlyGate(), torch.randn(9, 5)
        with caplog.at_level(logging.INFO, logger="fimcb"):
            _assert_matches_naive(model, x, "hooks")
        assert "torch.func fallback for gate." in caplog.text and "do not add up" in caplog.text
    finally:
        RULES.pop(Gate)


def test_merged_pull_backs_keep_every_operand() -> None:
    """Pull-backs by basis merge while small; a merge that lands on an earlier group's sources joins it."""
    sources = [torch.zeros(100), torch.zeros(100), torch.zeros(100000)]
    operand = {n: (torch.zeros(n), Dense(torch.zeros(1, n))) for n in (1, 2, 3, 4)}
    groups = {
        (frozenset({0, 1}), True): [operand[1]],
        (frozenset({2}), True): [operand[2]],  # too large to merge with the first
        (frozenset({0}), True): [operand[3]],
        (frozenset({1}), True): [operand[4]],  # merges with {0}: the sources of the first group
        (frozenset({0}), False): [operand[1]],  # per sample: never merged
    }
    merged = capture_module._merge_small(groups, sources)
    assert sorted(len(v) for v in merged.values()) == [1, 1, 3]
    assert [w.numel() for w, _ in merged[frozenset({0, 1}), True]] == [1, 3, 4]


@pytest.mark.parametrize("route", list(ConvRoute))
@pytest.mark.parametrize("group_size", [1, 3])
@pytest.mark.parametrize("memory", ["default", "tight"])
def test_every_conv_route_serves_diagonal_metrics_and_groups(
    route: ConvRoute, group_size: int, memory: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each way of norming a convolution (ghost, unfolded, grouped in blocks), forced, with a diagonal metric
    and groups: the weighted naive gradients; with a tight memory floor, every route unfolds or forms one
    sample at a time."""
    monkeypatch.setattr(conv_rules, "_fastest", lambda key, shape, make, ghost: make(route))
    if memory == "tight":
        monkeypatch.setattr(conv_rules, "UNFOLD_FLOOR", 1)
        monkeypatch.setattr(factors, "MATERIALISE_FLOOR", 1)
        parts: list[tuple[conv_rules.ConvFactor, slice]] = []
        part = conv_rules.ConvFactor._part
        monkeypatch.setattr(
            conv_rules.ConvFactor, "_part", lambda self, s: parts.append((self, s)) or part(self, s)
        )
    model, x = next((m, x) for name, m, x in _cases() if name == "conv")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.rand_like(p) + 0.1 for n, p in params.items()}
    for metric, weight in ((Diagonal(fisher, damping=0.01), fisher), (Identity(), None)):
        expected = []
        for start in range(0, len(x) - len(x) % group_size, group_size):
            ll = model.eval().log_likelihood(x[start : start + group_size]).sum()
            grads = torch.autograd.grad(ll, list(params.values()))
            expected.append(
                torch.stack(
                    [
                        (g.pow(2) / (weight[n] + 0.01) if weight else g.pow(2)).sum()
                        for n, g in zip(params, grads, strict=True)
                    ]
                )
            )
        for _ in range(3):  # checked, then lighter, then streamed
            norms = per_sample_layer_norms(model, x, metric=metric, engine="hooks", group_size=group_size)
            torch.testing.assert_close(norms.values, torch.stack(expected), rtol=1e-4, atol=1e-7)
    if memory == "tight" and route is not ConvRoute.GROUPED and group_size == 1:
        sizes = [(min(s.stop, f.n_groups) - s.start, f) for f, s in parts]
        assert any(n < f.n_groups for n, f in sizes)  # unfolded a few samples at a time
        for n, f in sizes:  # never more than the layer holds, but for a single sample
            assert n == 1 or n * f.rows.shape[1] * (f.rows.shape[2] + f.width) <= f.held
